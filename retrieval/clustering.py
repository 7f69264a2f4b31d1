"""k-means and NMI: the one clustering behind the evaluation's NMI and the report's k-means.

:func:`kmeans` is scikit-learn's ``KMeans`` (Lloyd's algorithm), seeded and started one way:
k-means++ (Arthur & Vassilvitskii 2007) drawn from the start points when that takes at most
:data:`KMEANS_PLUSPLUS_MAX_PAIRS` (start point, centre) pairs, since k-means++ costs k sequential
passes over them; beyond that, k distinct random start points (what FAISS's k-means, used by
Musgrave et al.'s benchmarker, does). One implementation everywhere, so that an NMI does not depend
on which optional packages are installed; Lloyd's iterations run on one thread, so that the same
points always give the same clusters.

:func:`normalized_mutual_information` is scikit-learn's ``normalized_mutual_info_score``
(arithmetic-mean normalisation): ``MI / ((H(true) + H(pred)) / 2)``.

scikit-learn is imported by the functions that use it (it is heavy); it is in requirements.txt,
since every evaluation computes NMI unless told not to.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from retrieval.search import check_embeddings

#: k-means++ seeding costs k sequential passes over the start points; above this many (start
#: point, centre) pairs, k distinct random start points are the initial centres instead.
KMEANS_PLUSPLUS_MAX_PAIRS = 2**24
#: Lloyd iterations at most, by default (scikit-learn also stops once the centres settle).
KMEANS_MAX_ITER = 100


@dataclass
class KMeansClusters:
    """A k-means clustering: cluster ids (N,) int64 of every point, and how it was found."""

    clusters: np.ndarray
    init: str  # "k-means++" or "random points"
    init_points: int  # the points the initial centres were drawn from
    iterations: int  # Lloyd iterations run


def kmeans(
    points: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    max_iter: int = KMEANS_MAX_ITER,
    start: np.ndarray | None = None,
) -> KMeansClusters:
    """k-means of points (N, D) into k clusters (k is cut to N), seeded and deterministic.

    start: indices (S,) of the points the initial centres are drawn from (a sample, to keep
    k-means++ cheap on large sets); every point when None or when S < k. Every point is
    clustered either way.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    points = check_embeddings(points, "embeddings")
    k = max(1, min(int(k), len(points)))
    start_points = points if start is None or len(start) < k else points[np.asarray(start)]
    centres, init = initial_centres(start_points, k, seed)
    model = KMeans(n_clusters=k, init=centres, n_init=1, max_iter=max_iter, random_state=seed)
    # One OpenMP thread: scikit-learn's threads add their partial centre sums in the order they
    # finish, so with several the centres (and, rarely, an assignment) change from run to run.
    with threadpool_limits(1, user_api="openmp"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate points can leave fewer clusters than k
        clusters = model.fit_predict(points)
    return KMeansClusters(clusters.astype(np.int64), init, len(start_points), int(model.n_iter_))


def initial_centres(start_points: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, str]:
    """k initial centres (k, D) drawn from start_points (S, D), S >= k, and how: k-means++ up to
    :data:`KMEANS_PLUSPLUS_MAX_PAIRS` (point, centre) pairs, k distinct random points beyond."""
    if len(start_points) * k <= KMEANS_PLUSPLUS_MAX_PAIRS:
        from sklearn.cluster import kmeans_plusplus

        centres, _ = kmeans_plusplus(start_points, k, random_state=seed)
        return centres, "k-means++"
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(start_points), size=k, replace=False))
    return start_points[chosen], "random points"


def normalized_mutual_information(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """NMI of two labelings (N,) with arithmetic-mean normalisation (scikit-learn's default).

    ``MI / ((H(true) + H(pred)) / 2)``; 1.0 when both labelings are a single cluster, 0.0 when
    the mutual information is 0.
    """
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(np.ravel(labels_true), np.ravel(labels_pred)))
