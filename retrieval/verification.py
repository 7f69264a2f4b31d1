"""Verification: "are these two images the same item?" answered by a threshold on their score.

Every (query, gallery item) pair of an evaluation protocol is a same-class pair or a
different-class pair; its score is the search's (:func:`retrieval.search.similarity`: cosine
for normalised embeddings, the negative Euclidean distance otherwise; higher is more alike).
A threshold t calls a pair a match when its score is >= t, which gives

- the false match rate FMR(t): the share of different-class pairs scoring >= t;
- the true match rate TMR(t): the share of same-class pairs scoring >= t, and the false
  non-match rate FNMR(t) = 1 - TMR(t).

From these (:func:`verification_metrics`): the ROC AUC (the probability that a same-class pair
outscores a different-class one, ties counting one half: the Mann-Whitney statistic, equal to
the area under the ROC curve); the equal error rate (where FMR = FNMR, interpolated linearly
between the two ROC points that straddle it, and the threshold of the second); and the lowest
threshold whose FMR is at most a chosen rate (e.g. 1e-3), with the FMR and TMR it reaches. The
ROC points are one per distinct score, as scikit-learn's ``roc_curve(drop_intermediate=False)``
makes them, with the first at a threshold just above every score (FMR = TMR = 0).

Pairs (:func:`pair_scores`): all of them, unless a kind has more than ``max_pairs`` (default
:data:`DEFAULT_MAX_PAIRS`, a million: 4 MB of scores, and at an FMR of 1e-3 a thousand
different-class pairs above the threshold). Then that kind is a uniform sample of exactly
``max_pairs`` pairs without replacement, seeded: each pair gets a pseudo-random 64-bit key from
(seed, query, gallery item) and the smallest keys are kept, so the sample does not depend on
block sizes. When queries are gallery items (leave-one-out, ``exclude``), a query is not paired
with itself, and a pair of two query items is counted once (from the query of the lower
gallery index), not twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrieval.search import (
    DEFAULT_MEMORY_MB,
    block_rows,
    check_embeddings,
    exclusion_mask,
    similarity,
)
from tfcbir import UserError

#: The most pairs of each kind (same class, different class) kept; more are sampled.
DEFAULT_MAX_PAIRS = 1_000_000
DEFAULT_FALSE_MATCH_RATE = 1e-3
#: Bytes of temporaries per (query, gallery item) pair of a block: the score (4), masks (2),
#: and for each selected pair its two indices (16), key (8 and 8 more while mixing) and score.
BYTES_PER_PAIR = 48
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = 2**64 - 1


@dataclass
class PairScores:
    """The scores of the same-class pairs (S,) and different-class pairs (D,) float32 used (in
    no particular order), and how many pairs of each kind the protocol has (S and D or more)."""

    same: np.ndarray
    different: np.ndarray
    same_total: int
    different_total: int

    @property
    def sampled(self) -> bool:
        return len(self.same) < self.same_total or len(self.different) < self.different_total


class _SmallestKeys:
    """The scores of the ``bound`` pairs of smallest key seen so far (a seeded uniform sample
    without replacement), kept in at most 2 * bound entries between shrinks."""

    def __init__(self, bound: int):
        self.bound = bound
        self.total = 0
        self.cutoff = np.uint64(_MASK64)  # keys above it cannot be among the smallest
        self.keys = [np.zeros(0, dtype=np.uint64)]
        self.scores = [np.zeros(0, dtype=np.float32)]
        self.buffered = 0

    def add(self, keys: np.ndarray, scores: np.ndarray) -> None:
        self.total += len(keys)
        if self.total > self.bound:
            below = keys <= self.cutoff
            keys, scores = keys[below], scores[below]
        self.keys.append(keys)
        self.scores.append(scores)
        self.buffered += len(keys)
        if self.buffered > 2 * self.bound:
            self.shrink()

    def shrink(self) -> None:
        keys, scores = np.concatenate(self.keys), np.concatenate(self.scores)
        if len(keys) > self.bound:
            smallest = np.argpartition(keys, self.bound - 1)[: self.bound]
            keys, scores = keys[smallest], scores[smallest]
            self.cutoff = keys.max()
        self.keys, self.scores, self.buffered = [keys], [scores], len(keys)

    def result(self) -> np.ndarray:
        self.shrink()
        return self.scores[0].astype(np.float32, copy=False)


def pair_keys(queries: np.ndarray, items: np.ndarray, n_gallery: int, seed: int) -> np.ndarray:
    """Pseudo-random uint64 keys (P,) of the pairs (query index (P,), gallery index (P,)): the
    SplitMix64 finaliser of the pair's number, offset by the seed."""
    offset = np.uint64(((seed + 1) * _GOLDEN) & _MASK64)
    keys = queries.astype(np.uint64) * np.uint64(n_gallery) + items.astype(np.uint64)
    keys += offset  # NumPy's unsigned arrays wrap modulo 2^64: the arithmetic a hash wants
    keys ^= keys >> np.uint64(30)
    keys *= np.uint64(0xBF58476D1CE4E5B9)
    keys ^= keys >> np.uint64(27)
    keys *= np.uint64(0x94D049BB133111EB)
    keys ^= keys >> np.uint64(31)
    return keys


def pair_scores(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    *,
    normalized: bool,
    exclude: np.ndarray | None = None,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    seed: int = 0,
    memory_mb: float = DEFAULT_MEMORY_MB,
) -> PairScores:
    """Scores of the same-class and different-class pairs of queries (Q, D) with labels (Q,)
    and a gallery (N, D) with labels (N,), at most ``max_pairs`` of each kind (see the module
    docstring). exclude: (Q,) the gallery index of each query that is a gallery item
    (leave-one-out), -1 for none. Blocks of queries hold at most ``memory_mb`` of temporaries.
    """
    queries = check_embeddings(queries, "queries")
    gallery = check_embeddings(gallery, "gallery embeddings")
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    n_queries, n_gallery = len(queries), len(gallery)
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"queries have dimension {queries.shape[1]}, the gallery {gallery.shape[1]}"
        )
    if query_labels.shape != (n_queries,) or gallery_labels.shape != (n_gallery,):
        raise ValueError(
            f"{n_queries} queries and {n_gallery} gallery items, but labels of shapes "
            f"{query_labels.shape} and {gallery_labels.shape}"
        )
    if max_pairs < 1:
        raise UserError(f"max pairs {max_pairs}: give at least 1 (default {DEFAULT_MAX_PAIRS})")
    if exclude is not None and np.ndim(exclude) != 1:
        raise ValueError("exclude must be (Q,): the gallery index of each query, -1 for none")
    own = exclusion_mask(exclude, n_queries, n_gallery)[:, 0] if exclude is not None else None
    same, different = _SmallestKeys(max_pairs), _SmallestKeys(max_pairs)
    step = block_rows(n_gallery, BYTES_PER_PAIR, memory_mb)
    for start in range(0, n_queries, step):
        block = slice(start, start + step)
        scores = similarity(queries[block], gallery, normalized=normalized)
        paired = _paired(own[block] if own is not None else None, own, scores.shape)
        same_class = query_labels[block, None] == gallery_labels[None, :]
        for sample, kind in ((same, same_class & paired), (different, ~same_class & paired)):
            rows, items = np.nonzero(kind)
            sample.add(pair_keys(rows + start, items, n_gallery, seed), scores[rows, items])
    return PairScores(same.result(), different.result(), same.total, different.total)


def _paired(block_own: np.ndarray | None, own: np.ndarray | None, shape) -> np.ndarray:
    """(B, N) bool: the pairs a block of queries counts. A query is not paired with its own
    gallery item; of two queries that are both gallery items, only the query of the lower
    gallery index counts their pair."""
    paired = np.ones(shape, dtype=bool)
    if block_own is None or not (block_own >= 0).any():
        return paired
    is_own = np.zeros(shape[1], dtype=bool)
    is_own[own[own >= 0]] = True
    rows = np.flatnonzero(block_own >= 0)
    counted_before = is_own[None, :] & (np.arange(shape[1])[None, :] < block_own[rows, None])
    paired[rows] &= ~counted_before
    paired[rows, block_own[rows]] = False
    return paired


# --- the metrics ----------------------------------------------------------------------------------


def roc_auc(same: np.ndarray, different: np.ndarray) -> float:
    """The area under the ROC curve of scores of same-class pairs (S,) and different-class
    pairs (D,): P(same > different) + P(same == different) / 2, from average ranks."""
    scores = np.concatenate([same, different]).astype(np.float64)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0  # 1-based rank of a tied group's middle
    rank_sum = average_rank[inverse.ravel()[: len(same)]].sum()
    n_same, n_different = len(same), len(different)
    return float((rank_sum - n_same * (n_same + 1) / 2.0) / (n_same * n_different))


def roc_points(same: np.ndarray, different: np.ndarray) -> tuple[np.ndarray, ...]:
    """The ROC curve: thresholds (M,) descending, one per distinct score after a first one
    just above every score, and the false match rate and true match rate (M,) of each (a pair
    matches when its score is >= the threshold)."""
    same = np.sort(np.asarray(same, dtype=np.float32))
    different = np.sort(np.asarray(different, dtype=np.float32))
    distinct = np.unique(np.concatenate([same, different]))[::-1]
    above_all = np.nextafter(distinct[0], np.float32(np.inf))
    thresholds = np.concatenate([[above_all], distinct]).astype(np.float32)
    false_matches = len(different) - np.searchsorted(different, thresholds, side="left")
    true_matches = len(same) - np.searchsorted(same, thresholds, side="left")
    return thresholds, false_matches / len(different), true_matches / len(same)


def equal_error_rate(thresholds, false_match, true_match) -> tuple[float, float]:
    """(EER, threshold) of ROC points (:func:`roc_points`): where the false match rate meets
    the false non-match rate, linear between the last point where FMR < FNMR and the next,
    whose threshold is returned."""
    gap = (1.0 - true_match) - false_match  # FNMR - FMR: 1 at the first point, -1 at the last
    after = int(np.argmax(gap <= 0))
    before = after - 1
    share = gap[before] / (gap[before] - gap[after])
    rate = false_match[before] + share * (false_match[after] - false_match[before])
    return float(rate), float(thresholds[after])


def threshold_at(thresholds, false_match, true_match, rate: float) -> tuple[float, float, float]:
    """(threshold, its FMR, its TMR) of ROC points: the lowest threshold whose false match
    rate is at most ``rate`` (the first point, above every score, when none is)."""
    point = int(np.flatnonzero(false_match <= rate)[-1])
    return float(thresholds[point]), float(false_match[point]), float(true_match[point])


def check_rate(false_match_rate: float) -> None:
    """UserError unless the false match rate lies strictly between 0 and 1."""
    if not 0.0 < false_match_rate < 1.0:
        raise UserError(
            f"false match rate {false_match_rate:g}: give a rate between 0 and 1, e.g. 0.001"
        )


def verification_metrics(
    pairs: PairScores, *, false_match_rate: float = DEFAULT_FALSE_MATCH_RATE
) -> dict:
    """ROC AUC, equal error rate and the threshold at ``false_match_rate`` of the pairs, with
    the pair counts: a flat dict ready for JSON. UserError when a kind of pair is missing."""
    check_rate(false_match_rate)
    if not len(pairs.same):
        raise UserError(
            "no two images share a class among the queries and the gallery: verification "
            "needs same-class pairs"
        )
    if not len(pairs.different):
        raise UserError(
            "every image is of one class: verification needs pairs of different classes"
        )
    points = roc_points(pairs.same, pairs.different)
    eer, eer_threshold = equal_error_rate(*points)
    threshold, reached, true_match = threshold_at(*points, false_match_rate)
    return {
        "roc_auc": roc_auc(pairs.same, pairs.different),
        "eer": eer,
        "eer_threshold": eer_threshold,
        "false_match_rate_target": false_match_rate,
        "threshold": threshold,
        "false_match_rate": reached,
        "true_match_rate": true_match,
        "false_matches": int(np.count_nonzero(pairs.different >= np.float32(threshold))),
        "same_class_pairs": int(len(pairs.same)),
        "different_class_pairs": int(len(pairs.different)),
        "same_class_pairs_total": int(pairs.same_total),
        "different_class_pairs_total": int(pairs.different_total),
        "sampled": pairs.sampled,
    }


def verify(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    *,
    normalized: bool,
    exclude: np.ndarray | None = None,
    false_match_rate: float = DEFAULT_FALSE_MATCH_RATE,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    seed: int = 0,
    memory_mb: float = DEFAULT_MEMORY_MB,
) -> dict:
    """:func:`verification_metrics` of :func:`pair_scores` (same arguments), with the score,
    ``max_pairs`` and ``seed`` it used: what ``evaluation.py --verification`` saves."""
    check_rate(false_match_rate)  # before the pairs, which may take a while
    pairs = pair_scores(
        queries,
        query_labels,
        gallery,
        gallery_labels,
        normalized=normalized,
        exclude=exclude,
        max_pairs=max_pairs,
        seed=seed,
        memory_mb=memory_mb,
    )
    result = verification_metrics(pairs, false_match_rate=false_match_rate)
    result.update(
        {
            "score": "cosine" if normalized else "negative Euclidean distance",
            "max_pairs": max_pairs,
            "seed": seed,
        }
    )
    return result
