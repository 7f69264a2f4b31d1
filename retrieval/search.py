"""Nearest-neighbour search over a gallery of embeddings: scores, deterministic ranking, top-k.

Scores: the cosine similarity (a dot product) for normalised embeddings, the negative Euclidean
distance otherwise; higher is better in both. Ties are broken by gallery order (the lower gallery
index ranks first), so a ranking never depends on the block size, the BLAS or the sort algorithm.

Both rules live in :func:`order_keys`, which turns a row of float32 scores into int64 keys whose
plain integer order *is* the ranking: the score's bits in the high half (mapped so that integer
order equals float order) and the complement of the gallery index in the low half. Every key is
distinct, so ``argpartition`` / ``sort`` on the keys need no tie fix-ups at any boundary.

Work is done in blocks of query rows sized from a memory budget, so a search never holds more
than ``memory_mb`` of (queries x gallery) temporaries, whatever the gallery's size.

An index is anything with the :class:`SearchIndex` interface; :class:`ExactIndex` is the exact,
pure NumPy one. An approximate FAISS index with the same ``search`` lives in
:mod:`retrieval.faiss_index`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

#: The key of an excluded gallery item: below every real key, so it ranks last.
EXCLUDED = np.iinfo(np.int64).min

#: The default budget for one block's (queries x gallery) temporaries, in MiB.
DEFAULT_MEMORY_MB = 256


class SearchIndex(Protocol):
    """What the CLIs need from an index: its size, its score type and a top-k search."""

    normalized: bool

    def __len__(self) -> int: ...

    def search(
        self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...


def similarity(
    queries: np.ndarray,
    gallery: np.ndarray,
    *,
    normalized: bool,
    gallery_sq_norms: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Scores of queries (B, D) against the gallery (N, D): (B, N) float32, higher is better.

    normalized: cosine similarity (the dot product of unit vectors); otherwise the negative
    Euclidean distance, from ``|q|^2 + |g|^2 - 2 q.g`` (one matrix product) clipped at 0, since
    rounding can make the expansion slightly negative for (near-)identical vectors.
    gallery_sq_norms: (N,) precomputed ``|g|^2`` to save recomputing it for every block.
    out: a (B, N) float32 buffer to reuse (fresh large arrays cost page faults every block).
    """
    queries = np.asarray(queries, dtype=np.float32)
    scores = np.matmul(queries, np.asarray(gallery, dtype=np.float32).T, out=out)
    if normalized:
        return scores
    if gallery_sq_norms is None:
        gallery_sq_norms = np.einsum("nd,nd->n", gallery, gallery, dtype=np.float32)
    scores *= -2.0
    scores += gallery_sq_norms[None, :]
    scores += np.einsum("bd,bd->b", queries, queries)[:, None]
    np.maximum(scores, 0.0, out=scores)
    np.sqrt(scores, out=scores)
    np.negative(scores, out=scores)
    return scores


def order_keys(scores: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Ranking keys (B, N) int64 of full gallery rows of scores (B, N) float32.

    ``key[b, i] > key[b, j]`` exactly when item i ranks before item j for query b: a higher score,
    or an equal score and ``i < j``. Column j must be gallery item j (full rows, not a subset).
    ``scores`` must be C-contiguous float32 and is overwritten (its bits become the high half of
    the keys). out: a (B, N) int64 buffer to reuse.
    """
    if scores.dtype != np.float32 or not scores.flags.c_contiguous:
        raise ValueError("order_keys needs C-contiguous float32 scores")
    scores += 0.0  # -0.0 + 0.0 == +0.0: equal scores must get equal bits
    bits = scores.view(np.int32)
    # IEEE floats order like sign-magnitude integers: flipping the 31 magnitude bits of the
    # negative ones makes two's-complement integer order equal float order.
    flip = bits >> 31
    flip &= 0x7FFFFFFF
    bits ^= flip
    keys = np.left_shift(bits, 32, dtype=np.int64, out=out)
    # Subtracting the index (< 2**32) keeps the score order and ranks lower indices first.
    keys -= np.arange(scores.shape[1], dtype=np.int64)
    return keys


def key_scores(keys: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The float32 scores back from keys (any shape) of the gallery items ``indices`` (same
    shape): :func:`order_keys` undone, so a search needs no copy of its scores."""
    ordered = ((keys + indices) >> 32).astype(np.int32)
    ordered ^= (ordered >> 31) & 0x7FFFFFFF  # the flip is its own inverse
    return ordered.view(np.float32)


def exclusion_mask(exclude: np.ndarray | None, n_queries: int, n_gallery: int) -> np.ndarray:
    """Normalise ``exclude`` to (Q, M) int64 gallery indices, -1 meaning none.

    exclude: None, (Q,) one gallery index per query (leave-one-out: the query itself), or (Q, M)
    several per query; -1 entries exclude nothing.
    """
    if exclude is None:
        return np.full((n_queries, 0), -1, dtype=np.int64)
    exclude = np.asarray(exclude, dtype=np.int64)
    if exclude.ndim == 1:
        exclude = exclude[:, None]
    if exclude.ndim != 2 or exclude.shape[0] != n_queries:
        raise ValueError(
            f"exclude has shape {exclude.shape}; expected ({n_queries},) or ({n_queries}, M)"
        )
    if exclude.size and (exclude.max() >= n_gallery or exclude.min() < -1):
        raise ValueError(f"exclude holds indices outside [-1, {n_gallery})")
    return exclude


def exclude_keys(keys: np.ndarray, exclude: np.ndarray) -> None:
    """Set the keys (B, N) of the excluded items (B, M) (-1: none) to :data:`EXCLUDED`, in place."""
    rows, cols = np.nonzero(exclude >= 0)
    keys[rows, exclude[rows, cols]] = EXCLUDED


def block_rows(n_gallery: int, bytes_per_pair: int, memory_mb: float) -> int:
    """How many query rows fit a ``memory_mb`` budget at ``bytes_per_pair`` per (query, item)."""
    return max(1, int(memory_mb * 2**20) // max(1, n_gallery * bytes_per_pair))


def check_embeddings(embeddings: np.ndarray, what: str) -> np.ndarray:
    """(N, D) float32, C-contiguous and finite (NaN would make every ranking meaningless)."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"{what} must be (N, D); got shape {embeddings.shape}")
    if not np.isfinite(embeddings).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return embeddings


class ExactIndex:
    """Exact search by blocked float32 matrix products; deterministic ties (lower index first).

    embeddings: (N, D) the gallery. normalized: whether its rows (and the queries') are unit
    vectors, which picks the score (cosine or negative Euclidean distance).
    memory_mb: budget of one block's temporaries (about 20 bytes per query x gallery pair).
    """

    # scores float32 (4) + keys int64 (8) + argpartition's int64 indices (8)
    BYTES_PER_PAIR = 20

    def __init__(
        self, embeddings: np.ndarray, normalized: bool, *, memory_mb: float = DEFAULT_MEMORY_MB
    ):
        self.embeddings = check_embeddings(embeddings, "gallery embeddings")
        self.normalized = bool(normalized)
        self.memory_mb = memory_mb
        self._sq_norms = (
            None
            if self.normalized
            else np.einsum("nd,nd->n", self.embeddings, self.embeddings, dtype=np.float32)
        )

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """Scores (B, N) float32 of queries (B, D) against the whole gallery."""
        return similarity(
            queries, self.embeddings, normalized=self.normalized, gallery_sq_norms=self._sq_norms
        )

    def search(
        self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k best gallery items of each query, best first.

        queries: (Q, D). exclude: None, (Q,) or (Q, M) gallery indices to leave out of each
        query's answers (-1: none), e.g. ``np.arange(N)`` for leave-one-out.
        Returns scores (Q, k) float32 and indices (Q, k) int64. Where fewer than k items are left
        (k > N, or exclusions), the tail is padded with index -1 and score -inf, as FAISS does.
        """
        queries = check_embeddings(queries, "queries")
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[1]}, the gallery {self.dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        n_queries, n_gallery = len(queries), len(self)
        exclude = exclusion_mask(exclude, n_queries, n_gallery)
        kept = min(k, n_gallery)
        out_scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
        out_indices = np.full((n_queries, k), -1, dtype=np.int64)
        step = block_rows(n_gallery, self.BYTES_PER_PAIR, self.memory_mb)
        for start in range(0, n_queries, step):
            block = slice(start, start + step)
            keys = order_keys(self.scores(queries[block]))
            exclude_keys(keys, exclude[block])
            if kept < n_gallery:
                # Keys are distinct, so the top `kept` set is unique: no ties at the boundary.
                top = np.argpartition(keys, n_gallery - kept, axis=1)[:, n_gallery - kept :]
            else:
                top = np.broadcast_to(np.arange(n_gallery), keys.shape)
            top_keys = np.take_along_axis(keys, top, axis=1)
            # Ascending sort reversed: negating keys would overflow at EXCLUDED.
            order = np.argsort(top_keys, axis=1)[:, ::-1]
            indices = np.take_along_axis(top, order, axis=1)
            valid = np.take_along_axis(top_keys, order, axis=1) != EXCLUDED
            out_indices[block, :kept] = np.where(valid, indices, -1)
            out_scores[block, :kept] = np.where(
                valid, key_scores(np.take_along_axis(keys, indices, axis=1), indices), -np.inf
            )
        return out_scores, out_indices
