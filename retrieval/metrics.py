"""Retrieval metrics: mAP (of AP@r), Precision@1, Recall@k, MAP@R, R-precision and NMI.

Every retrieval metric is a function of one thing per query: the ranks of its relevant gallery
items (those of its class, the query itself excluded), ranked by :mod:`retrieval.search`'s rules
(cosine or negative Euclidean score, ties to the lower gallery index). With ``rank_1 < rank_2 <
... < rank_G`` the ranks of a query's G relevant items, and ``P(i)`` the precision at rank i
(``P(rank_m) = m / rank_m``):

- Recall@k: 1 if ``rank_1 <= k`` (any of the top k shares the query's class), else 0.
- Precision@1: 1 if ``rank_1 == 1``, else 0 (equal to Recall@1).
- AP@r: ``sum_{m: rank_m <= r} P(rank_m) / min(r, G)``; mAP is its mean. ``r=None``: all ranks.
  ``ap_denominator="found"`` divides by the relevant items found in the top r instead (what the
  original system did; it inflates mAP, a query with a single early hit scores 1).
- MAP@R (Musgrave et al. 2020, with R = G): ``sum_{m: rank_m <= R} P(rank_m) / R``.
- R-precision: ``#{m: rank_m <= R} / R``.

A query with G = 0 (its class has no other gallery item) has no defined AP or recall; as in
Musgrave et al. it is left out of every retrieval average and counted in ``n_excluded``.

NMI clusters the query embeddings with k-means (as many clusters as query classes,
:func:`retrieval.clustering.kmeans`) and compares the clusters with the classes: mutual
information over the arithmetic mean of the two entropies.

NMI clusters the query embeddings given to :func:`evaluate`; ``evaluation.py`` clusters the whole
query set instead (:func:`clustering_nmi`), so that NMI does not depend on the query sample.

How: only each query's relevant items need a rank, and a rank is 1 + the number of items ranked
above (a higher score, or an equal one and a lower index). Queries go in blocks of at most
:data:`BLOCK_ROWS` (fewer if ``memory_mb`` says so), one float32 matrix product a block for whole
gallery rows; equal gallery vectors get one score (:func:`retrieval.search.equal_rows`); the
query itself and the relevant items drop out of the row. Only the items scoring at least the
query's last relevant item can rank above any relevant item: one float32 comparison a score picks
those candidates out (a few hundred of 60,000 for typical embeddings), and each relevant item's
count is taken over them by ranking keys (:func:`_count_candidates`): rank_m = m + that count. A
query with more candidates than :data:`CANDIDATE_SHARE` of the gallery has its last relevant item
counted over the whole row instead, one comparison a score (the tie rule by gallery tiles, see
:func:`_count_above`), and the others over the candidates of the one before, or, after
:data:`CANDIDATE_PASSES` such passes, each over the whole row too. Classes of more than
:data:`COUNT_MAX_RELEVANT` relevant items are ranked by sorting the row's keys instead.
Everything is exact, ties to the lower gallery index; see the README's "Retrieval" section.
"""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from retrieval.clustering import kmeans, normalized_mutual_information
from retrieval.search import (
    DEFAULT_MEMORY_MB,
    EXCLUDED,
    block_rows,
    check_embeddings,
    equal_rows,
    exclude_keys,
    exclusion_mask,
    order_keys,
    pair_keys,
    similarity,
    tie_equal_rows,
)
from tfcbir import UserError
from tfcbir.cpus import available_cpus

#: The evaluation protocols: where queries and gallery come from (the CLIs build the sets).
PROTOCOLS = {
    "train_gallery": "queries from the test split, the training split as gallery",
    "leave_one_out": "one set is queries and gallery, each query left out of its own answers",
    "query_gallery": "explicit query and gallery lists",
}
AP_DENOMINATORS = ("min_r_g", "found")
DEFAULT_KS = (1, 2, 4, 8)

# Up to this many relevant items per query, counting the items above each one (G passes over
# the row) beats sorting the row (about 40 passes' worth for 60,000 items).
COUNT_MAX_RELEVANT = 32
# Buffers per (query, gallery item): float32 scores, and when ranking by sorting, int64 keys
# sorted in place; per (query, relevant item): keys, ranks, float64 precisions.
BYTES_PER_PAIR = 12
BYTES_PER_RELEVANT = 64
# Queries per block at most: a block's scores (B, N) stay in the caches while each relevant
# item's count passes over them.
BLOCK_ROWS = 512
# Gallery items per comparison of a count: a (B, tile) tile of scores and flags in the L2 cache.
COUNT_TILE = 8192
# A query's candidates (items scoring at least its last relevant item) are ranked on their own
# up to this share of the gallery (about 60 bytes each: up to 4 a gallery item); beyond it,
# counting over the whole row a relevant item at a time is as fast.
CANDIDATE_SHARE = 1 / 16
# Scores compared at once when picking candidates: their flags stay in the L2 cache.
CANDIDATE_CHUNK_PAIRS = 2**20
# Candidate passes a block at most: a query still crowded after them (exact ties all over, or
# embeddings without structure) has its other relevant items counted over the row, one pass each.
CANDIDATE_PASSES = 2


@dataclass
class QueryResults:
    """Per-query results (Q,) of :func:`query_results`; NaN / 0 where ``n_relevant == 0``."""

    n_relevant: np.ndarray  # G: gallery items of the query's class, the query excluded
    first_rank: np.ndarray  # rank (1-based) of the best relevant item; 0 when G == 0
    average_precision: np.ndarray  # AP@r
    map_at_r: np.ndarray  # MAP@R, R = G
    r_precision: np.ndarray  # R-precision, R = G

    @property
    def evaluated(self) -> np.ndarray:
        """(Q,) bool: the queries with at least one relevant item, which the averages use."""
        return self.n_relevant > 0


@dataclass
class Metrics:
    """Averages over the evaluated queries (those with a relevant item in the gallery)."""

    mean_average_precision: float  # mAP of AP@r
    precision_at_1: float
    recall_at_k: dict[int, float]
    map_at_r: float  # MAP@R
    r_precision: float
    nmi: float | None  # None when not computed
    n_queries: int
    n_excluded: int  # queries without a relevant item, left out of every average above
    r: int | None  # AP@r's r; None: the whole ranking
    ap_denominator: str
    per_query: QueryResults | None = field(default=None, repr=False)

    @property
    def n_evaluated(self) -> int:
        return self.n_queries - self.n_excluded

    def as_dict(self) -> dict:
        """Flat, JSON-ready, in the order reports show them. mAP is under its exact name,
        :func:`map_key` (``mAP@10`` for r = 10; ``mAP`` without a cut-off), and under ``mAP``
        (an alias, the same value)."""
        values = {map_key(self.r): self.mean_average_precision, "mAP": self.mean_average_precision}
        values["precision@1"] = self.precision_at_1
        values.update({f"recall@{k}": v for k, v in self.recall_at_k.items()})
        values.update({"MAP@R": self.map_at_r, "R-precision": self.r_precision})
        if self.nmi is not None:
            values["NMI"] = self.nmi
        values.update(
            {
                "queries": self.n_queries,
                "excluded_queries": self.n_excluded,
                "r": self.r,
                "ap_denominator": self.ap_denominator,
            }
        )
        return values


# The metrics that can select a model on validation images (train.validation.metric): name ->
# how messages write it.
SELECTION_METRICS = {"recall@1": "Recall@1", "map@r": "MAP@R"}


def selection_score(metrics: Metrics, name: str) -> float:
    """The value in ``metrics`` of the selection metric ``name`` (a key of
    :data:`SELECTION_METRICS`): Recall@1 or MAP@R."""
    return metrics.recall_at_k[1] if name == "recall@1" else metrics.map_at_r


def map_key(r: int | None) -> str:
    """The name of the mean of AP@r: ``mAP@<r>`` (``mAP@10``), or ``mAP`` for the whole ranking."""
    return "mAP" if r is None else f"mAP@{r}"


def evaluate(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    *,
    normalized: bool,
    exclude: np.ndarray | None = None,
    r: int | None = None,
    ks: tuple[int, ...] = DEFAULT_KS,
    ap_denominator: str = "min_r_g",
    nmi: bool = True,
    seed: int = 0,
    memory_mb: float = DEFAULT_MEMORY_MB,
    threads: int | None = None,
) -> Metrics:
    """All metrics of queries (Q, D) with labels (Q,) against a gallery (N, D) with labels (N,).

    exclude: (Q,) the gallery index of each query when queries are in the gallery
    (leave-one-out), -1 for none; or (Q, M) several distinct indices per query.
    r: AP@r's cut-off (None: the whole ranking). ks: the k of Recall@k.
    nmi: also cluster the queries and compute NMI (the slowest part for many classes).
    memory_mb: the budget of the temporaries, shared by ``threads`` (default: one per CPU,
    at most 8) that rank blocks of queries at once; the results do not depend on either.
    Raises UserError when no query has a relevant item (query and gallery classes disjoint).
    """
    results = query_results(
        queries,
        query_labels,
        gallery,
        gallery_labels,
        normalized=normalized,
        exclude=exclude,
        r=r,
        ap_denominator=ap_denominator,
        memory_mb=memory_mb,
        threads=threads,
    )
    metrics = summarize(results, r=r, ks=ks, ap_denominator=ap_denominator)
    if nmi:
        metrics.nmi = clustering_nmi(queries, query_labels, seed=seed)
    return metrics


def summarize(
    results: QueryResults, *, r: int | None, ks: tuple[int, ...], ap_denominator: str
) -> Metrics:
    """The averages over the queries with a relevant item (NMI: None); UserError when no
    query has one (query and gallery classes disjoint)."""
    evaluated = results.evaluated
    n_queries, n_evaluated = len(evaluated), int(evaluated.sum())
    if n_evaluated == 0:
        raise _no_relevant_item_error(n_queries)
    first_rank = results.first_rank[evaluated]
    return Metrics(
        mean_average_precision=float(results.average_precision[evaluated].mean()),
        precision_at_1=float((first_rank == 1).mean()),
        recall_at_k={int(k): float((first_rank <= k).mean()) for k in ks},
        map_at_r=float(results.map_at_r[evaluated].mean()),
        r_precision=float(results.r_precision[evaluated].mean()),
        nmi=None,
        n_queries=n_queries,
        n_excluded=n_queries - n_evaluated,
        r=r,
        ap_denominator=ap_denominator,
        per_query=results,
    )


def _no_relevant_item_error(n_queries: int) -> UserError:
    return UserError(
        f"none of the {n_queries} queries has an item of its class in the gallery, so "
        "retrieval metrics are undefined; for class-disjoint splits set eval.protocol "
        "to leave_one_out"
    )


def evaluate_leave_one_out(
    embeddings: np.ndarray, labels: np.ndarray, *, normalized: bool, **options
) -> Metrics:
    """:func:`evaluate` of a set (N, D) against itself, each query left out of its answers."""
    return evaluate(
        embeddings,
        labels,
        embeddings,
        labels,
        normalized=normalized,
        exclude=np.arange(len(embeddings)),
        **options,
    )


def query_results(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    *,
    normalized: bool,
    exclude: np.ndarray | None = None,
    r: int | None = None,
    ap_denominator: str = "min_r_g",
    memory_mb: float = DEFAULT_MEMORY_MB,
    threads: int | None = None,
) -> QueryResults:
    """Per-query G, first relevant rank, AP@r, MAP@R and R-precision; see :func:`evaluate`."""
    queries, query_labels, gallery, gallery_labels = _checked_inputs(
        queries, query_labels, gallery, gallery_labels, r, ap_denominator
    )
    n_queries, n_gallery = len(queries), len(gallery)
    exclude = exclusion_mask(exclude, n_queries, n_gallery)
    classes = _ClassMembers(gallery_labels)
    starts, n_members = classes.lookup(query_labels)
    # G: members of the query's class minus those excluded for it (the query itself).
    excluded_relevant = (exclude >= 0) & (
        gallery_labels[np.maximum(exclude, 0)] == query_labels[:, None]
    )
    n_relevant = n_members - excluded_relevant.sum(axis=1)
    results = QueryResults(
        n_relevant=n_relevant,
        first_rank=np.zeros(n_queries, dtype=np.int64),
        average_precision=np.full(n_queries, np.nan),
        map_at_r=np.full(n_queries, np.nan),
        r_precision=np.full(n_queries, np.nan),
    )
    sq_norms = None if normalized else np.einsum("nd,nd->n", gallery, gallery)
    tied_rows, tied_heads = equal_rows(gallery)  # equal vectors get one score: they tie
    # Blocks run on `threads` threads at once (NumPy's comparisons use one core each), each
    # with its share of the memory budget.
    threads = max(1, default_threads() if threads is None else int(threads))
    blocks = _query_blocks(n_members, n_relevant, n_gallery, memory_mb / threads)

    def rank_block(rows: np.ndarray, buffer: np.ndarray) -> None:
        scores = similarity(
            queries[rows],
            gallery,
            normalized=normalized,
            gallery_sq_norms=sq_norms,
            out=buffer[: len(rows)],
        )
        tie_equal_rows(scores, tied_rows, tied_heads)
        members = classes.gather(starts[rows], n_members[rows])
        if members.shape[1] <= COUNT_MAX_RELEVANT:
            ranks = _counted_ranks(scores, members, exclude[rows], n_relevant[rows])
        else:
            ranks = _sorted_ranks(scores, members, exclude[rows], n_relevant[rows])
        # Blocks hold distinct queries: each thread writes rows of its own.
        fill_results(results, rows, ranks, n_relevant[rows], r, n_gallery, ap_denominator)

    _run_blocks(rank_block, blocks, threads, n_gallery)
    return results


def _checked_inputs(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    r: int | None,
    ap_denominator: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Queries (Q, D) and gallery (N, D) as float32, labels (Q,) and (N,) as int64, checked
    against each other; ValueError for shapes, dimensions, ``r`` or ``ap_denominator`` that do
    not fit."""
    queries = check_embeddings(queries, "query embeddings")
    gallery = check_embeddings(gallery, "gallery embeddings")
    query_labels = _labels(query_labels, len(queries), "query labels")
    gallery_labels = _labels(gallery_labels, len(gallery), "gallery labels")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"queries have dimension {queries.shape[1]}, the gallery {gallery.shape[1]}"
        )
    if ap_denominator not in AP_DENOMINATORS:
        raise ValueError(f"ap_denominator must be one of {AP_DENOMINATORS}; got {ap_denominator!r}")
    if r is not None and r < 1:
        raise ValueError(f"r must be >= 1 or None; got {r}")
    return queries, query_labels, gallery, gallery_labels


def _query_blocks(
    n_members: np.ndarray, n_relevant: np.ndarray, n_gallery: int, memory_mb: float
) -> list[np.ndarray]:
    """The queries with a relevant item, in blocks of rows (B,) that fit ``memory_mb`` each.

    Blocks group queries of similar class sizes (C, the members of the query's class), so the
    per-block (B, C) arrays stay narrow."""
    order = np.argsort(n_members, kind="stable")
    order = order[n_relevant[order] > 0]
    blocks = []
    position = 0
    while position < len(order):
        size = _block_size(n_gallery, n_members, order, position, memory_mb)
        blocks.append(order[position : position + size])
        position += size
    return blocks


def _run_blocks(rank_block, blocks: list[np.ndarray], threads: int, n_gallery: int) -> None:
    """``rank_block(rows, buffer)`` for every block, on up to ``threads`` threads.

    Each thread has a (B, N) float32 score buffer of its own, B the largest block's rows, reused
    block after block (fresh (B, N) arrays would page-fault every time).
    """
    threads = min(threads, len(blocks))
    most_rows = max((len(rows) for rows in blocks), default=0)
    buffers: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(threads):
        buffers.put(np.empty((most_rows, n_gallery), dtype=np.float32))

    def rank_with_a_buffer(rows: np.ndarray) -> None:
        buffer = buffers.get()
        try:
            rank_block(rows, buffer)
        finally:
            buffers.put(buffer)

    if threads <= 1:
        for rows in blocks:
            rank_with_a_buffer(rows)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for done in pool.map(rank_with_a_buffer, blocks):
                del done


def default_threads() -> int:
    """Threads for the metrics: the CPUs this process may use (at most 8)."""
    return min(8, available_cpus())


def _labels(labels: np.ndarray, n: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{what} have shape {labels.shape}; expected ({n},)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} must be integers; got {labels.dtype}")
    return labels.astype(np.int64, copy=False)


class _ClassMembers:
    """The gallery indices of each class, ascending, as slices of one index array."""

    def __init__(self, gallery_labels: np.ndarray):
        self.order = np.argsort(gallery_labels, kind="stable")
        self.classes, self.starts, self.counts = np.unique(
            gallery_labels[self.order], return_index=True, return_counts=True
        )

    def lookup(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, count) into ``order`` of each label's members; count 0 for unknown labels."""
        position = np.clip(np.searchsorted(self.classes, labels), 0, len(self.classes) - 1)
        known = self.classes[position] == labels
        return self.starts[position], np.where(known, self.counts[position], 0)

    def gather(self, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """(B, max count) member indices, padded with -1."""
        offsets = np.arange(counts.max())
        valid = offsets[None, :] < counts[:, None]
        positions = np.where(valid, starts[:, None] + offsets[None, :], 0)
        return np.where(valid, self.order[positions], -1)


def _rows_for(n_gallery: int, width: int, memory_mb: float) -> int:
    """Query rows that fit the budget when each holds N gallery pairs and ``width`` relevant,
    at most :data:`BLOCK_ROWS`."""
    rows = block_rows(1, n_gallery * BYTES_PER_PAIR + width * BYTES_PER_RELEVANT, memory_mb)
    return min(rows, BLOCK_ROWS)


def _block_size(
    n_gallery: int, n_members: np.ndarray, order: np.ndarray, position: int, memory_mb: float
) -> int:
    """Query rows for the block starting at ``position`` of ``order`` (sorted by class size, so
    the block's last row is its widest)."""
    first_guess = _rows_for(n_gallery, int(n_members[order[position]]), memory_mb)
    last = order[min(position + first_guess, len(order)) - 1]
    return min(first_guess, _rows_for(n_gallery, int(n_members[last]), memory_mb))


def _relevant_in_order(
    scores: np.ndarray, members: np.ndarray, exclude: np.ndarray, n_relevant: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The relevant items of each query, best first: their scores and gallery indices (B, C')
    (C' = the largest G), from scores (B, N) and class members (B, C) padded with -1. Excluded
    members (``exclude`` (B, M)) and padding sort last (score -inf, index -1)."""
    valid = members >= 0
    if exclude.shape[1]:
        valid &= ~(members[:, :, None] == exclude[:, None, :]).any(axis=2)
    items = np.where(valid, members, -1)
    member_scores = np.take_along_axis(scores, np.maximum(items, 0), axis=1)
    keys = np.where(valid, pair_keys(member_scores, items), EXCLUDED)
    order = np.argsort(keys, axis=1)[:, ::-1][:, : n_relevant.max()]
    return np.take_along_axis(member_scores, order, axis=1), np.take_along_axis(
        items, order, axis=1
    )


def _counted_ranks(
    scores: np.ndarray, members: np.ndarray, exclude: np.ndarray, n_relevant: np.ndarray
) -> np.ndarray:
    """Ranks (B, C') of each query's relevant items, best first, from scores (B, N) (overwritten)
    by counting the other items above each: ``rank_m = m + #{other items ranked above it}``.

    Only the items scoring at least a relevant item's score can rank above it: those candidates
    of the query's last relevant item are picked out (:func:`_candidates`) and every relevant
    item's count is taken over them (:func:`_count_candidates`). A query with more candidates
    than :data:`CANDIDATE_SHARE` of the gallery has its last relevant item counted over the
    whole row (:func:`_count_above`) and starts again from the one before, whose candidates are
    fewer; after :data:`CANDIDATE_PASSES` passes, every item left is counted over the row.
    Columns at or beyond a row's G are padding (rank N + 1)."""
    n_rows, n_gallery = scores.shape
    thresholds, positions = _relevant_in_order(scores, members, exclude, n_relevant)
    # Only the other items are counted: the query itself (excluded) and the relevant items
    # drop to -inf (the relevant ones above an item are m - 1 by construction).
    excluded_rows, excluded_columns = np.nonzero(exclude >= 0)
    scores[excluded_rows, exclude[excluded_rows, excluded_columns]] = -np.inf
    relevant_rows, relevant_columns = np.nonzero(positions >= 0)
    scores[relevant_rows, positions[relevant_rows, relevant_columns]] = -np.inf
    # Padding below every item, so that no item ranks under it.
    relevant_keys = np.where(positions >= 0, pair_keys(thresholds, positions), EXCLUDED)
    ranks = np.full(thresholds.shape, n_gallery + 1, dtype=np.int64)
    most = int(n_gallery * CANDIDATE_SHARE)
    flags = None
    # The rows still to rank, and of each the column of its last relevant item not yet ranked.
    rows, last = np.arange(n_rows), n_relevant - 1
    for attempt in range(CANDIDATE_PASSES):
        if not len(rows):
            break
        rows, last = _rank_by_candidates(scores, rows, last, relevant_keys, thresholds, ranks, most)
        # Crowded rows: their last relevant item counted over the row; after the last pass
        # (many exact ties, or no structure), every one left.
        for _ in range(1 if attempt < CANDIDATE_PASSES - 1 else ranks.shape[1]):
            if not len(rows):
                break
            if flags is None:
                flags = np.empty((n_rows, _count_tile(n_gallery)), dtype=bool)
            counts = _count_above(
                scores, rows, thresholds[rows, last], positions[rows, last], flags
            )
            ranks[rows, last] = counts + last + 1
            rows, last = rows[last > 0], last[last > 0] - 1
    return ranks


def _rank_by_candidates(
    scores: np.ndarray,
    rows: np.ndarray,
    last: np.ndarray,
    relevant_keys: np.ndarray,
    thresholds: np.ndarray,
    ranks: np.ndarray,
    most: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank the relevant items ``0..last[s]`` (keys ``relevant_keys``, scores ``thresholds``
    (B, C'), best first) of the queries ``rows`` (S,) of scores (B, N) over their candidates,
    into ``ranks`` (B, C'); except the rows with more than ``most`` candidates, returned with
    their ``last`` (crowded rows, and their last columns), left as they were."""
    columns = np.arange(ranks.shape[1])
    found, items, crowded = _candidates(scores, rows, thresholds[rows, last], most)
    within = columns[None, :] <= last[:, None]
    keys = np.where(within, relevant_keys[rows], EXCLUDED)
    above = _count_candidates(scores, rows, found, items, keys)
    done = within & ~crowded[:, None]
    ranks[rows[:, None], columns[None, :]] = np.where(done, above + columns + 1, ranks[rows])
    return rows[crowded], last[crowded]


def _candidates(
    scores: np.ndarray, rows: np.ndarray, lowest: np.ndarray, most: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The items of the rows ``rows`` (S,) of scores (B, N) at or above each one's ``lowest``
    (S,), row by row in gallery order: their rows as positions in ``rows`` (K,) and their gallery
    indices (K,); and (S,) bool: the rows with more than ``most`` of them, whose items are left
    out (so K <= S * most).

    Rows are compared a few at a time (:data:`CANDIDATE_CHUNK_PAIRS` scores), so the flags stay
    in the caches while their indices are read off."""
    n_gallery = scores.shape[1]
    step = max(1, CANDIDATE_CHUNK_PAIRS // max(1, n_gallery))
    flags = np.empty((min(step, len(rows)), n_gallery), dtype=bool)
    found, crowded = [], np.zeros(len(rows), dtype=bool)
    for start in range(0, len(rows), step):
        stop = min(start + step, len(rows))
        chunk = flags[: stop - start]
        first, final = rows[start], rows[stop - 1]
        # Consecutive rows (the usual case): a view, not a copy.
        part = (
            scores[first : final + 1]
            if final - first == stop - start - 1
            else scores[rows[start:stop]]
        )
        np.greater_equal(part, lowest[start:stop, None], out=chunk)
        flat = _flat_true(chunk)
        # Each row's share of the flat indices: where its first index would go.
        bounds = np.searchsorted(flat, np.arange(stop - start + 1) * n_gallery)
        counts = np.diff(bounds)
        many = counts > most
        if many.any():
            crowded[start:stop] = many
            flat = flat[np.repeat(~many, counts)]
        found.append(flat + start * n_gallery)
    positions, items = np.divmod(np.concatenate(found), n_gallery)
    return positions, items, crowded


def _flat_true(flags: np.ndarray) -> np.ndarray:
    """``np.flatnonzero`` of bool flags (any shape) that are mostly False, ascending (K,) int64,
    at about twice its speed: the flags packed 8 to a byte, and only the bytes not zero looked
    into."""
    packed = np.packbits(flags.reshape(-1))  # first flag in the high bit; the tail padded False
    hot = np.flatnonzero(packed != 0)
    bits = np.flatnonzero(np.unpackbits(packed[hot]).view(bool))
    return (hot[bits >> 3] << 3) + (bits & 7)


def _count_candidates(
    scores: np.ndarray,
    rows: np.ndarray,
    found: np.ndarray,
    items: np.ndarray,
    relevant_keys: np.ndarray,
) -> np.ndarray:
    """For each row ``rows[s]`` (S,) of scores (B, N) and each of its relevant items (S, C') of
    ranking keys ``relevant_keys`` (best first, descending; :data:`EXCLUDED` for none): how many
    of its candidates (``found`` (K,), positions in ``rows`` ascending, and their gallery indices
    ``items`` (K,)) rank above it. (S, C') int64.

    A candidate ranks above the relevant items ``j, j + 1, ...`` of its row, j the number of
    relevant keys above its own key (keys are distinct: the tie rule is in them), so the count
    above item m is the number of the row's candidates with ``j <= m``: a histogram of j per
    row, summed up."""
    n_rows, width = relevant_keys.shape
    keys = pair_keys(scores[rows[found], items], items)
    # j, kept directly as the histogram's bin: row * (C' + 1) + j.
    bins = found * (width + 1)
    # Each row's keys repeated for its candidates (``found`` is ascending): a copy, not a gather.
    per_row = np.bincount(found, minlength=n_rows)
    for column_keys in np.ascontiguousarray(relevant_keys.T):
        bins += np.repeat(column_keys, per_row) > keys
    histogram = np.bincount(bins, minlength=n_rows * (width + 1)).reshape(n_rows, width + 1)
    return np.cumsum(histogram[:, :width], axis=1)


def _count_above(
    scores: np.ndarray,
    rows: np.ndarray,
    thresholds: np.ndarray,
    positions: np.ndarray,
    flags: np.ndarray,
) -> np.ndarray:
    """For each query ``rows[i]`` of scores (B, N): the number of items ranked above an item of
    score ``thresholds[i]`` and gallery index ``positions[i]``, i.e. with a higher score, or an
    equal one and a lower index. (S,) int64.

    One float32 comparison a score, in gallery tiles: a tile wholly before the item counts the
    scores >= the threshold (``> nextafter(t, -inf)``), a tile after it or holding it those >
    the threshold; in the tile holding it, the scores equal to the threshold (compared once
    more, a tile a row) that lie before it are added. ``flags`` is a (B, tile) bool buffer.
    """
    n_gallery = scores.shape[1]
    # Every row: compare in place (rows not asked for get +inf, so count nothing); a few rows:
    # a copy of theirs.
    if 2 * len(rows) >= len(scores):
        block = scores
        exact = np.full(len(scores), np.inf, dtype=np.float32)
        exact[rows] = thresholds
        where = np.full(len(scores), n_gallery, dtype=np.int64)
        where[rows] = positions
    else:
        block, exact, where = scores[rows], thresholds, positions
    below = np.nextafter(exact, np.float32(-np.inf))
    counts = np.zeros(len(block), dtype=np.int64)
    tile = flags.shape[1]
    for start in range(0, n_gallery, tile):
        stop = min(start + tile, n_gallery)
        threshold = np.where(where >= stop, below, exact)[:, None]
        found = flags[: len(block), : stop - start]
        np.greater(block[:, start:stop], threshold, out=found)
        in_tile = found.view(np.uint8).sum(axis=1, dtype=np.int32)
        counts += in_tile
        split = np.flatnonzero((where >= start) & (where < stop))
        if len(split):  # the tile holding the item: equal scores before it rank above it
            part = block[split, start:stop]
            tied = np.count_nonzero(part >= exact[split, None], axis=1) - in_tile[split]
            split, part = split[tied > 0], part[tied > 0]  # rare: an exact tie
            if len(split):
                ties = part == exact[split, None]
                ties &= np.arange(start, stop)[None, :] < where[split, None]
                counts[split] += np.count_nonzero(ties, axis=1)
    return counts if block is not scores else counts[rows]


def _count_tile(n_gallery: int) -> int:
    """Gallery items per comparison of :func:`_count_above`: a sixteenth of the gallery, so that
    the tile holding each item (compared twice) adds a sixteenth, within [1024, COUNT_TILE]."""
    return int(min(n_gallery, max(1024, min(COUNT_TILE, n_gallery // 16))))


def _sorted_ranks(
    scores: np.ndarray, members: np.ndarray, exclude: np.ndarray, n_relevant: np.ndarray
) -> np.ndarray:
    """Ranks (B, C') of each query's relevant items, best first, read off its sorted row of
    ranking keys: for large classes, where counting would take C' passes over the row."""
    keys = order_keys(scores)
    exclude_keys(keys, exclude)
    member_keys = np.where(
        members >= 0, np.take_along_axis(keys, np.maximum(members, 0), axis=1), EXCLUDED
    )
    member_keys = np.sort(member_keys, axis=1)[:, ::-1][:, : n_relevant.max()]
    keys.sort(axis=1)
    n_rows, n_gallery = keys.shape
    ranks = np.zeros(member_keys.shape, dtype=np.int64)
    for row in range(n_rows):
        relevant = member_keys[row, : n_relevant[row]]
        above = n_gallery - np.searchsorted(keys[row], relevant, side="right")
        ranks[row, : n_relevant[row]] = 1 + above
    return ranks


def fill_results(
    results: QueryResults,
    rows: np.ndarray,
    ranks: np.ndarray,
    n_relevant: np.ndarray,
    r: int | None,
    n_gallery: int,
    ap_denominator: str,
) -> None:
    """Write the per-query metrics of ``rows`` from the ranks (B, C) of their relevant items."""
    m = np.arange(1, ranks.shape[1] + 1)
    valid = m[None, :] <= n_relevant[:, None]
    precision = np.divide(m[None, :], ranks, out=np.zeros(ranks.shape), where=valid)
    cutoff = n_gallery if r is None else r
    in_top_r = valid & (ranks <= cutoff)
    if ap_denominator == "min_r_g":
        denominator = np.minimum(cutoff, n_relevant)
    else:  # "found": the original system's; no relevant item found scores 0
        denominator = np.maximum(in_top_r.sum(axis=1), 1)
    results.average_precision[rows] = (precision * in_top_r).sum(axis=1) / denominator
    in_top_g = valid & (ranks <= n_relevant[:, None])
    results.map_at_r[rows] = (precision * in_top_g).sum(axis=1) / n_relevant
    results.r_precision[rows] = in_top_g.sum(axis=1) / n_relevant
    results.first_rank[rows] = ranks[:, 0]


# --- metrics of ranked lists (re-ranked answers) ------------------------------------------------


def checked_labels(query_labels, gallery_labels, n_queries: int, n_gallery: int):
    query_labels = np.asarray(query_labels, dtype=np.int64)
    gallery_labels = np.asarray(gallery_labels, dtype=np.int64)
    if query_labels.shape != (n_queries,) or gallery_labels.shape != (n_gallery,):
        raise ValueError(
            f"labels of shapes {query_labels.shape} and {gallery_labels.shape} for "
            f"{n_queries} queries and {n_gallery} gallery items"
        )
    return query_labels, gallery_labels


def relevant_counts(
    query_labels: np.ndarray, gallery_labels: np.ndarray, exclude: np.ndarray | None
) -> np.ndarray:
    """G (Q,): the gallery items of each query's class, less those excluded for it."""
    classes, counts = np.unique(gallery_labels, return_counts=True)
    position = np.clip(np.searchsorted(classes, query_labels), 0, len(classes) - 1)
    members = np.where(classes[position] == query_labels, counts[position], 0)
    exclude = exclusion_mask(exclude, len(query_labels), len(gallery_labels))
    excluded = (exclude >= 0) & (gallery_labels[np.maximum(exclude, 0)] == query_labels[:, None])
    return members - excluded.sum(axis=1)


def ranked_metrics(
    indices: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    *,
    exclude: np.ndarray | None = None,
    r: int | None = None,
    ks: tuple[int, ...] = DEFAULT_KS,
    ap_denominator: str = "min_r_g",
) -> Metrics:
    """:func:`evaluate`'s metrics (NMI: None) of ranked answers: gallery
    indices (Q, L) best first (-1: padding), found with ``exclude`` (None, (Q,) or (Q, M)) left
    out, and the labels (Q,) and (N,); the definitions above.

    A relevant item missing from a list ranks below it. That is exact when each query's list
    holds all its G relevant items or reaches max(r, max(ks), G): ValueError otherwise. Only
    ``first_rank`` of a query none of whose relevant items is listed is then not its rank but
    N + 1 (beyond every cut-off, as the metrics need).
    """
    if ap_denominator not in AP_DENOMINATORS:
        raise ValueError(f"ap_denominator must be one of {AP_DENOMINATORS}; got {ap_denominator!r}")
    if r is not None and r < 1:
        raise ValueError(f"r must be >= 1 or None; got {r}")
    indices = np.asarray(indices, dtype=np.int64)
    n_queries, length = indices.shape
    query_labels, gallery_labels = checked_labels(
        query_labels, gallery_labels, n_queries, len(gallery_labels)
    )
    n_gallery = len(gallery_labels)
    n_relevant = relevant_counts(query_labels, gallery_labels, exclude)
    relevant = (indices >= 0) & (gallery_labels[np.maximum(indices, 0)] == query_labels[:, None])
    found = relevant.sum(axis=1)
    deep_enough = r is not None and length >= np.maximum(max(r, *ks), n_relevant)
    if not np.all((found >= n_relevant) | deep_enough):
        raise ValueError(
            "ranked lists too short for exact metrics: each needs all its relevant items or "
            "max(r, max(ks), G) answers"
        )
    if exclude is not None:
        left_out = exclusion_mask(exclude, n_queries, n_gallery)
        if ((indices[:, :, None] == left_out[:, None, :]) & (indices[:, :, None] >= 0)).any():
            raise ValueError("the ranked lists hold items that exclude leaves out")
    results = QueryResults(
        n_relevant=n_relevant,
        first_rank=np.zeros(n_queries, dtype=np.int64),
        average_precision=np.full(n_queries, np.nan),
        map_at_r=np.full(n_queries, np.nan),
        r_precision=np.full(n_queries, np.nan),
    )
    evaluated = np.flatnonzero(n_relevant > 0)
    step = max(1, 2**22 // max(1, length))
    for start in range(0, len(evaluated), step):
        rows = evaluated[start : start + step]
        ranks = relevant_ranks(relevant[rows], n_relevant[rows], n_gallery)
        fill_results(results, rows, ranks, n_relevant[rows], r, n_gallery, ap_denominator)
    return summarize(results, r=r, ks=ks, ap_denominator=ap_denominator)


def relevant_ranks(relevant: np.ndarray, n_relevant: np.ndarray, n_gallery: int) -> np.ndarray:
    """Ranks (B, max G) of each row's relevant items, best first, from the flags (B, L) of its
    ranked list; those not listed get N + 1 (beyond every cut-off)."""
    ranks = np.full((len(relevant), int(n_relevant.max())), n_gallery + 1, dtype=np.int64)
    rows, columns = np.nonzero(relevant)
    starts = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(relevant)))[:-1]])
    ranks[rows, np.arange(len(rows)) - starts[rows]] = columns + 1
    return ranks


# --- clustering quality -------------------------------------------------------------------------


def clustering_nmi(
    embeddings: np.ndarray, labels: np.ndarray, *, seed: int = 0, max_iter: int = 20
) -> float:
    """NMI between the classes (N,) and a k-means clustering of the embeddings (N, D) into as
    many clusters as there are classes (:func:`retrieval.clustering.kmeans`, seeded by ``seed``,
    at most ``max_iter`` iterations)."""
    n_classes = len(np.unique(labels))
    found = kmeans(embeddings, n_classes, seed=seed, max_iter=max_iter)
    return normalized_mutual_information(labels, found.clusters)
