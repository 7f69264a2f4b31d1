"""Nearest-neighbour search over a gallery of embeddings: scores, deterministic ranking, top-k.

Scores: the cosine similarity (a dot product) for normalised embeddings, the negative Euclidean
distance otherwise; higher is better in both. Ties are broken by gallery order (the lower gallery
index ranks first), so given the scores a ranking never depends on the block size or the sort
algorithm.

What holds of the scores themselves: they are float32 matrix products, and BLAS sums a dot
product in an order that depends on the CPU, the BLAS build, the shape of the block (one query is
a matrix-vector product) and the item's position in it (edge kernels), so a score can differ in
its last bit from one block to another. Hence:

- equal gallery vectors (bitwise, or equal as numbers: ``-0.0 == 0.0``) always get one score per
  query: :func:`equal_rows` finds them once, and every search copies the score of a group's first
  row to the others, so they tie and rank by gallery index, at any block size;
- when every dot product is exact in float32 (e.g. small integers), every score, ranking and metric
  is the same at every block size, on every machine;
- otherwise two *different* items whose scores are within about one float32 ulp (a relative
  6e-8) may swap places between block sizes or machines, and a metric changes when such a swap
  moves a relevant item across a cut-off.

Both rules live in :func:`order_keys`, which turns a row of float32 scores into int64 keys whose
plain integer order *is* the ranking: the score's bits in the high half (mapped so that integer
order equals float order) and the complement of the gallery index in the low half. Every key is
distinct, so ``argpartition`` / ``sort`` on the keys need no tie fix-ups at any boundary.

:class:`ExactIndex` searches a block of queries against one block of gallery items at a time
(one float32 matrix product each) and keeps each query's k best so far. A block is screened
before anything is sorted: the maximum of each run of :data:`CHUNK` items bounds what a run can
hold, the k-th largest run maximum is a score the block's own k-th best reaches, and the k-th
best so far must be beaten (strictly: later blocks hold higher indices, which lose ties). Only
the runs that pass are looked at item by item, and the few survivors are merged exactly by
(score, index). On 1M x 128 with k = 10 the screen costs about a tenth of the matrix product;
see ``benchmarks/search.py``. Large k (over 1/16 of the gallery) falls back to whole gallery
rows and an ``argpartition`` on their keys.

Blocks are sized from a memory budget, so a search never holds more than ``memory_mb`` of
(queries x gallery) temporaries, whatever the gallery's size.

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

#: Queries per block of :meth:`ExactIndex.search` (fewer if the memory budget says so): enough
#: for BLAS to run near its peak.
QUERY_BLOCK = 1024

#: (query, gallery item) pairs per block: 16 MiB of float32 scores, which the screen then reads
#: from the last-level cache (half a typical one). A query block of 1,000 takes gallery blocks of
#: about 4,000 items; a single query, up to 4M items at once.
BLOCK_PAIRS = 2**22

#: The longest run of gallery items that the screen of a block summarises by its maximum.
CHUNK = 64


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


def equal_rows(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows equal to another row of embeddings (N, D), as numbers (``-0.0 == 0.0``): ``rows``
    (M,) ascending, the indices of every row of a group of equal rows, and ``heads`` (M,) the
    lowest index of each one's group. Empty when all rows differ.

    Rows are hashed (exact integer arithmetic on their bits), and rows of equal hashes compared
    bit for bit, so the answer is exact; time O(N D), little memory beyond the rows."""
    n_rows, dim = embeddings.shape
    empty = np.zeros(0, dtype=np.int64)
    if n_rows < 2:
        return empty, empty
    multipliers = np.random.default_rng(0x5EED).integers(1, 2**62, size=dim, dtype=np.uint64)
    multipliers |= np.uint64(1)
    hashes = np.empty(n_rows, dtype=np.uint64)
    step = max(1, 2**16 // max(1, dim))
    for start in range(0, n_rows, step):
        bits = (embeddings[start : start + step] + np.float32(0.0)).view(np.uint32)
        # A random linear form of the bits, modulo 2^64 (NumPy's unsigned integers wrap).
        hashes[start : start + step] = (bits.astype(np.uint64) * multipliers).sum(axis=1)
    order = np.argsort(hashes, kind="stable")
    same = hashes[order[1:]] == hashes[order[:-1]]
    if not same.any():
        return empty, empty
    candidates = np.unique(np.concatenate([order[1:][same], order[:-1][same]]))
    # Equal hashes: compare the rows themselves (as bytes, after -0.0 -> +0.0).
    rows = np.ascontiguousarray(embeddings[candidates] + np.float32(0.0))
    _, group, counts = np.unique(
        rows.view(np.dtype((np.void, rows.dtype.itemsize * dim))).ravel(),
        return_inverse=True,
        return_counts=True,
    )
    group = group.ravel()
    kept = counts[group] > 1
    candidates, group = candidates[kept], group[kept]  # ascending still
    heads = np.full(len(counts), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(heads, group, candidates)
    return candidates.astype(np.int64), heads[group]


def tie_equal_rows(scores: np.ndarray, rows: np.ndarray, heads: np.ndarray) -> None:
    """Give the gallery items ``rows`` (M,) the scores of their ``heads`` (M,) (see
    :func:`equal_rows`), in place, in scores (B, N) of whole gallery rows."""
    if len(rows):
        scores[:, rows] = scores[:, heads]


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


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Each row (N, D) scaled to unit L2 norm (float32); an all-zero row stays zero."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, np.float32(1e-12))


def block_rows(n_gallery: int, bytes_per_pair: int, memory_mb: float) -> int:
    """How many query rows fit a ``memory_mb`` budget at ``bytes_per_pair`` per (query, item)."""
    return max(1, int(memory_mb * 2**20) // max(1, n_gallery * bytes_per_pair))


def check_embeddings(embeddings: np.ndarray, what: str) -> np.ndarray:
    """(N, D) float32, C-contiguous and finite (NaN would make every ranking meaningless)."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"{what} must be (N, D); got shape {embeddings.shape}")
    # In slices: a (N, D) bool temporary would be an eighth of a large gallery again.
    step = max(1, 2**20 // max(1, embeddings.shape[1]))
    for start in range(0, len(embeddings), step):
        if not np.isfinite(embeddings[start : start + step]).all():
            raise ValueError(f"{what} contain NaN or infinite values")
    return embeddings


def run_maxima(scores: np.ndarray, run: int) -> np.ndarray:
    """The maximum (ceil(W / run), B) of each run of ``run`` rows of scores (W, B); the last run
    may be shorter. Rows are gallery items: the maximum is a vertical (SIMD-friendly) one."""
    width, n_queries = scores.shape
    full = width // run
    maxima = np.empty((-(-width // run), n_queries), dtype=np.float32)
    if full:  # a view: splitting the first axis of a C-contiguous array needs no copy
        np.max(scores[: full * run].reshape(full, run, n_queries), axis=1, out=maxima[:full])
    if width % run:
        np.max(scores[full * run :], axis=0, out=maxima[full])
    return maxima


def pair_keys(scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Ranking keys (any shape) int64 of scores float32 and their gallery indices (same shape),
    as :func:`order_keys` makes them, for items that are not whole rows."""
    bits = (scores + np.float32(0.0)).view(np.int32)  # -0.0 -> +0.0
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (bits.astype(np.int64) << 32) - indices


def top_of_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns (B, k) of each row of scores (B, W) float32, best first, and their
    scores (B, k); ``scores`` is overwritten (it becomes keys). Needs 16 more bytes a score."""
    width = scores.shape[1]
    keys = order_keys(scores)
    if k < width:
        # Keys are distinct, so the top k set is unique: no ties at the boundary.
        top = np.argpartition(keys, width - k, axis=1)[:, width - k :]
    else:
        top = np.broadcast_to(np.arange(width), keys.shape)
    top_keys = np.take_along_axis(keys, top, axis=1)
    # Ascending sort reversed: negating keys would overflow at EXCLUDED.
    order = np.argsort(top_keys, axis=1)[:, ::-1]
    top = np.take_along_axis(top, order, axis=1)
    return top, key_scores(np.take_along_axis(top_keys, order, axis=1), top)


def merge_top(top_scores, top_indices, floor, rows, items, scores) -> None:
    """Merge candidates (rows, gallery indices, scores (C,)) into the running top k of each query
    (top_scores float32, top_indices int64 (B, k), best first, padded with -inf and -1) and its
    k-th best score ``floor`` (B,), all in place; exact by (score, index)."""
    k = top_scores.shape[1]
    merged, counts = np.unique(rows, return_counts=True)
    all_rows = np.concatenate([np.repeat(merged, k), rows])
    all_scores = np.concatenate([top_scores[merged].ravel(), scores])
    all_items = np.concatenate([top_indices[merged].ravel(), items])
    # By row, then key descending (no key is int64's minimum, so negating cannot overflow).
    order = np.lexsort((-pair_keys(all_scores, all_items), all_rows))
    sizes = counts + k
    take = order[(np.cumsum(sizes) - sizes)[:, None] + np.arange(k)]
    top_scores[merged] = all_scores[take]
    top_indices[merged] = all_items[take]
    floor[merged] = top_scores[merged, -1]


class ExactIndex:
    """Exact search by blocked float32 matrix products; deterministic ties (lower index first).

    embeddings: (N, D) the gallery. normalized: whether its rows (and the queries') are unit
    vectors, which picks the score (cosine or negative Euclidean distance). Equal gallery vectors
    get one score per query (that of their group's first row, :func:`equal_rows`), so they tie.
    memory_mb: budget of one block's temporaries (at most 24 bytes per query x gallery pair; a
    search with a small k usually needs little more than 4).
    """

    # The block's scores float32 (4), when a block is ranked whole (large k, or a block whose
    # screen lets too much through) + their row-major copy (4) + keys int64 (8) +
    # argpartition's int64 indices (8).
    BYTES_PER_PAIR = 24
    QUERY_BLOCK = QUERY_BLOCK
    BLOCK_PAIRS = BLOCK_PAIRS
    CHUNK = CHUNK

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
        # Equal vectors: rows (M,) ascending; their heads' distinct rows (R,) and which (M,).
        self._tied_rows, heads = equal_rows(self.embeddings)
        self._heads, self._head_of = np.unique(heads, return_inverse=True)

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """Scores (B, N) float32 of queries (B, D) against the whole gallery, as search's."""
        queries = check_embeddings(queries, "queries")
        scaled = self._scaled(queries)
        raw = self._block_scores(scaled, None, 0, len(self), heads=self._head_scores(scaled))
        sq_norms = self._query_sq_norms(queries)
        return self._finish(raw.T.copy(), None if sq_norms is None else sq_norms[:, None])

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
        out_scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
        out_indices = np.full((n_queries, k), -1, dtype=np.int64)
        if n_queries == 0 or n_gallery == 0:
            return out_scores, out_indices
        step = min(n_queries, self.QUERY_BLOCK)
        width = min(n_gallery, max(self.BLOCK_PAIRS // step, 16 * k))
        screened = 16 * k <= width  # else width == n_gallery: whole rows
        step = min(step, block_rows(width, self.BYTES_PER_PAIR, self.memory_mb))
        step = -(-n_queries // -(-n_queries // step))  # equal blocks: no thin last product
        buffer = np.empty(width * min(step, n_queries), dtype=np.float32)
        for start in range(0, n_queries, step):
            block = slice(start, start + step)
            rows, columns = np.nonzero(exclude[block] >= 0)
            excluded = (rows, exclude[block][rows, columns])
            search_block = self._search_screened if screened else self._search_rows
            search_block(
                queries[block], excluded, width, buffer, out_scores[block], out_indices[block]
            )
        return out_scores, out_indices

    # --- one block of queries (B, D); results written into top_scores, top_indices (B, k) ------

    def _search_rows(self, queries, excluded, width, buffer, top_scores, top_indices) -> None:
        """Whole gallery rows (width == N) ranked by their keys: for k > N / 16."""
        scaled = self._scaled(queries)
        heads = self._head_scores(scaled)
        raw = self._block_scores(scaled, excluded, 0, width, buffer, heads)
        kept = min(top_scores.shape[1], width)
        top, scores = self._block_top(raw, self._query_sq_norms(queries), kept)
        found = scores > -np.inf  # excluded items score -inf
        top_indices[:, :kept] = np.where(found, top, -1)
        top_scores[:, :kept] = np.where(found, scores, -np.inf)

    def _search_screened(self, queries, excluded, width, buffer, top_scores, top_indices) -> None:
        """Gallery blocks of ``width`` items in order, each screened, the survivors merged into
        the running top k."""
        k = top_scores.shape[1]
        run = max(1, min(self.CHUNK, width // (4 * k)))  # >= 4k runs in a full block
        sq_norms = self._query_sq_norms(queries)
        scaled = self._scaled(queries)
        heads = self._head_scores(scaled)
        # The k-th best score so far of each query (-inf while fewer than k are found).
        floor = np.full(len(queries), -np.inf, dtype=np.float32)
        for start in range(0, len(self), width):
            stop = min(start + width, len(self))
            raw = self._block_scores(scaled, excluded, start, stop, buffer, heads)
            maxima = run_maxima(raw, run)
            maxima = self._finish(maxima, None if sq_norms is None else sq_norms[None, :])
            # The block's k-th best score is at least its k-th largest run maximum (k distinct
            # items reach it), and an item must beat the k-th best so far: a tie loses to it.
            threshold = np.nextafter(floor, np.float32(np.inf))
            hit = maxima >= threshold
            # Once k good items are found few runs pass, and the bound would not help.
            if len(maxima) >= k and np.count_nonzero(hit) > k * len(floor):
                bound = np.partition(maxima, len(maxima) - k, axis=0)[-k]
                np.maximum(threshold, bound, out=threshold)
                hit = maxima >= threshold
            hit_runs, hit_rows = np.nonzero(hit)
            if len(hit_runs) * run > raw.size // 2:  # many ties, or an adversarial order
                top, scores = self._block_top(raw, sq_norms, min(k, len(raw)))
                rows, ranks = np.nonzero(scores >= threshold[:, None])
                items, scores = top[rows, ranks], scores[rows, ranks]
            else:
                items = hit_runs[:, None] * run + np.arange(run)  # (P, run)
                inside = items < len(raw)  # the last run may be shorter
                np.minimum(items, len(raw) - 1, out=items)
                scores = raw[items, hit_rows[:, None]]
                scores = self._finish(
                    scores, None if sq_norms is None else sq_norms[hit_rows, None]
                )
                inside &= scores >= threshold[hit_rows, None]
                hits, offsets = np.nonzero(inside)
                rows, items, scores = hit_rows[hits], items[hits, offsets], scores[hits, offsets]
            if len(rows):
                merge_top(top_scores, top_indices, floor, rows, items + start, scores)

    def _block_top(self, raw, sq_norms, k) -> tuple[np.ndarray, np.ndarray]:
        """The top k (B, k) block rows of each query and their scores from raw scores (W, B)."""
        scores = np.ascontiguousarray(raw.T)
        scores = self._finish(scores, None if sq_norms is None else sq_norms[:, None])
        return top_of_rows(scores, k)

    # --- scores ----------------------------------------------------------------------------------

    def _block_scores(self, scaled, excluded, start, stop, buffer=None, heads=None) -> np.ndarray:
        """Raw scores (stop - start, B) of gallery items [start, stop) against scaled queries
        (B, D), excluded (rows, gallery indices) at -inf, equal vectors given their head's raw
        score ``heads`` (R, B) (:meth:`_head_scores`). Gallery items are rows so that the
        screen's maxima are vertical; ``buffer`` is reused (fresh arrays page-fault)."""
        shape = (stop - start, len(scaled))
        out = None if buffer is None else buffer[: shape[0] * shape[1]].reshape(shape)
        raw = np.matmul(self.embeddings[start:stop], scaled.T, out=out)
        if not self.normalized:
            raw -= self._sq_norms[start:stop, None]
        if heads is not None:
            low, high = np.searchsorted(self._tied_rows, [start, stop])
            raw[self._tied_rows[low:high] - start] = heads[self._head_of[low:high]]
        if excluded is not None:
            rows, items = excluded
            inside = (items >= start) & (items < stop)
            raw[items[inside] - start, rows[inside]] = -np.inf
        return raw

    def _head_scores(self, scaled: np.ndarray) -> np.ndarray | None:
        """Raw scores (R, B) of the first row of each group of equal gallery vectors against
        scaled queries (B, D), which every member of the group gets; None when there are none."""
        if not len(self._heads):
            return None
        raw = np.matmul(self.embeddings[self._heads], scaled.T)
        if not self.normalized:
            raw -= self._sq_norms[self._heads, None]
        return raw

    def _scaled(self, queries: np.ndarray) -> np.ndarray:
        """The queries as the matrix product takes them. For the Euclidean distance, raw scores
        are ``2 q.g - |g|^2``, which order the items as the distance does (``|q|^2`` is the same
        for all of a query's items): one pass over a block instead of six. Doubling is exact, so
        (2q).g is bit for bit 2(q.g)."""
        return queries if self.normalized else queries * np.float32(2.0)

    def _query_sq_norms(self, queries: np.ndarray) -> np.ndarray | None:
        """``|q|^2`` (B,) of queries (B, D); None when normalised (no use for it)."""
        return None if self.normalized else np.einsum("bd,bd->b", queries, queries)

    def _finish(self, raw: np.ndarray, sq_norms: np.ndarray | None) -> np.ndarray:
        """Scores from raw scores (any shape), in place. The negative distance is
        ``-sqrt(max(|q|^2 - raw, 0))`` (rounding can make it slightly negative for identical
        vectors): a non-decreasing function of raw, so the maximum of raw scores is the raw
        score of the maximum score. sq_norms: ``|q|^2`` broadcastable to raw; None when
        normalised (then raw scores are the scores)."""
        if self.normalized:
            return raw
        np.subtract(sq_norms, raw, out=raw)
        np.maximum(raw, 0.0, out=raw)
        np.sqrt(raw, out=raw)
        np.negative(raw, out=raw)
        return raw
