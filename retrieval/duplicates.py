"""Near-duplicate groups of a gallery: connected components of the pairs scoring at or above a
threshold, found from each item's nearest neighbours in O(N k) searches, not O(N^2) pairs.

The score is the index's (:mod:`retrieval.search`: the cosine similarity for normalised
galleries, the negative Euclidean distance otherwise; higher is more alike), and a pair is a
duplicate when it scores >= the threshold, the rule of ``evaluation.py --verification``'s
same-item threshold (:mod:`retrieval.verification`).

How the pairs are found (:func:`duplicate_pairs`): every item searches the gallery for its k
nearest neighbours (itself left out). An item whose k-th neighbour still scores at or above the
threshold may have more duplicates than k, so it searches again with twice the k, until its last
neighbour falls below the threshold or k reaches ``max_k`` (default :data:`MAX_K`, or the
gallery's size). Below the cap the pairs are exactly those of a brute-force comparison of every
pair (with an exact index); an item still capped keeps only its ``max_k`` best pairs, which is
said in a warning. Groups usually stay whole even then: a group larger than ``max_k`` is still
connected through its members' neighbours, though nothing guarantees it. With a FAISS index the
neighbours are approximate, and so are the pairs.

The groups (:func:`duplicate_groups`) are the connected components of the pair graph
(``scipy.sparse.csgraph.connected_components``): a chain a~b, b~c is one group even when a and
c score below the threshold.
"""

from __future__ import annotations

import logging

import numpy as np

from retrieval.search import SearchIndex

log = logging.getLogger("tfcbir")

#: Each item's first search asks for this many neighbours.
DEFAULT_K = 10
#: The most neighbours one item's search grows to (k doubles up to it).
MAX_K = 1024


def duplicate_pairs(
    index: SearchIndex,
    embeddings: np.ndarray,
    threshold: float,
    *,
    k: int = DEFAULT_K,
    max_k: int = MAX_K,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pairs of gallery items (indexed by ``index``, whose rows are ``embeddings`` (N, D)) that
    score >= ``threshold``: ``pairs`` (P, 2) int64, each (i, j) with i < j once, sorted;
    ``scores`` (P,) float32, the best of the two directions' scores; and how many items were
    capped (their k reached ``max_k`` with the last neighbour still at or above the threshold:
    their pairs may be incomplete)."""
    n_items = len(embeddings)
    if k < 1 or max_k < 1:
        raise ValueError(f"k and max_k must be >= 1; got {k} and {max_k}")
    cap = min(max_k, n_items - 1)
    if cap < 1:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32), 0
    found_rows, found_items, found_scores = [], [], []
    rows, k, capped = np.arange(n_items), min(k, cap), 0
    while len(rows):
        scores, items = index.search(embeddings[rows], k, exclude=rows)
        close = (scores >= threshold) & (items >= 0)
        where_row, where_col = np.nonzero(close)
        found_rows.append(rows[where_row])
        found_items.append(items[where_row, where_col])
        found_scores.append(scores[where_row, where_col])
        # Rows whose every neighbour is a duplicate may hold more: search them again, wider.
        full = close[:, -1]
        if k == cap:
            capped = int(full.sum()) if cap < n_items - 1 else 0
            break
        rows, k = rows[full], min(2 * k, cap)
    return _symmetric_pairs(
        np.concatenate(found_rows), np.concatenate(found_items), np.concatenate(found_scores)
    ) + (capped,)


def _symmetric_pairs(
    rows: np.ndarray, items: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Directed hits (row -> item) as undirected pairs (i < j), each once with its best score.
    An item searched again finds its first neighbours again: the duplicates merge here too."""
    pairs = np.stack([np.minimum(rows, items), np.maximum(rows, items)], axis=1).astype(np.int64)
    if not len(pairs):
        return pairs.reshape(0, 2), scores.astype(np.float32)
    order = np.lexsort((-scores, pairs[:, 1], pairs[:, 0]))
    pairs, scores = pairs[order], scores[order]
    first = np.ones(len(pairs), dtype=bool)
    first[1:] = (pairs[1:] != pairs[:-1]).any(axis=1)
    return pairs[first], scores[first].astype(np.float32)


def groups_of_pairs(pairs: np.ndarray, n_items: int) -> list[np.ndarray]:
    """The connected components (with two items or more) of the graph of ``pairs`` (P, 2) over
    ``n_items`` items: each an ascending int64 array of item indices; largest first, then by
    their first item."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(pairs):
        return []
    graph = coo_matrix(
        (np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n_items, n_items)
    )
    _, component = connected_components(graph, directed=False)
    order = np.argsort(component, kind="stable")  # items ascending within each component
    starts = np.flatnonzero(np.r_[True, np.diff(component[order]) != 0])
    groups = [group for group in np.split(order, starts[1:]) if len(group) > 1]
    groups.sort(key=lambda group: (-len(group), int(group[0])))
    return [group.astype(np.int64) for group in groups]


def duplicate_groups(
    index: SearchIndex,
    embeddings: np.ndarray,
    threshold: float,
    *,
    k: int = DEFAULT_K,
    max_k: int = MAX_K,
) -> list[np.ndarray]:
    """Groups of near-duplicate gallery items: the connected components of the pairs that score
    >= ``threshold`` (:func:`duplicate_pairs`, which says how k grows up to ``max_k``). Each group
    is an ascending int64 array of gallery indices (two or more); largest group first, equal
    sizes by their first item. A warning says when some items reached the cap."""
    pairs, _, capped = duplicate_pairs(index, embeddings, threshold, k=k, max_k=max_k)
    if capped:
        log.warning(
            "%d items have more than %d neighbours scoring at or above %g: only their %d best "
            "pairs are used (groups may split where they hold no other link)",
            capped,
            max_k,
            threshold,
            max_k,
        )
    return groups_of_pairs(pairs, len(embeddings))
