"""Clustering an embedding space and scoring the clusters against the classes.

Four scikit-learn methods look for the classes without seeing them:

- ``k-means``: k = the number of classes, on every point (Lloyd's algorithm; its k-means++ start
  is drawn from the sample when there are more points than that, since k-means++ costs k
  sequential passes over the data, and is k random points for very many classes);
- ``agglomerative``: Ward linkage cut at k clusters, on the sample (it needs O(n^2) memory);
- ``DBSCAN``: on the sample, ``eps`` chosen from the data: the ``eps_quantile`` quantile of each
  point's distance to its ``min_samples - 1``-th nearest other point, so that about that share of
  the points are core points (DBSCAN's ``min_samples`` counts the point itself). One ``eps`` for
  the whole space is DBSCAN's known limit: the default 0.5 finds the dense cores of overlapping
  classes and leaves much noise (on clean, well-separated blobs too: about a fifth of the points),
  while the k-distance curve's knee (about 0.9 on clean blobs) chains overlapping classes into
  one cluster; HDBSCAN adapts to the density instead;
- ``HDBSCAN``: on the sample, ``min_cluster_size`` = :data:`MIN_CLUSTER_SIZE`.

The points are given in the run's geometry (:func:`clustering_points`): for a run searched by
cosine similarity they are the unit vectors, whose Euclidean distance ``sqrt(2 - 2 cos)`` orders
pairs as the cosine does; every method and the silhouette use Euclidean distances between them.

Scores of a clustering (:func:`score`) over the points it clustered:

- NMI (arithmetic-mean normalisation) and ARI: scikit-learn's ``normalized_mutual_info_score``
  and ``adjusted_rand_score``;
- purity: the share of points whose cluster's most common class is their own;
- silhouette: scikit-learn's ``silhouette_score`` of the clusters (Euclidean), over the points of
  the sample, noise left out; None when fewer than 2 clusters (or fewer than 2 points per
  cluster on average) are left.

Noise (label -1 of DBSCAN and HDBSCAN) counts as one more cluster for NMI, ARI and purity, as
scikit-learn's functions count it when given the labels as they are; its share is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import retrieval.clustering
from retrieval.search import unit_rows

METHODS = ("k-means", "agglomerative", "DBSCAN", "HDBSCAN")

#: Points clustered by the O(n^2) methods and scored by the silhouette, by default.
DEFAULT_SAMPLE = 5000
#: DBSCAN: the neighbourhood size, and the share of points that ``eps`` makes core points.
MIN_SAMPLES = 5
EPS_QUANTILE = 0.5
#: HDBSCAN: the smallest group it calls a cluster (scikit-learn's default).
MIN_CLUSTER_SIZE = 5
#: k-means: Lloyd iterations at most (the start: see :func:`retrieval.clustering.kmeans`).
KMEANS_MAX_ITER = 100


@dataclass
class Clustering:
    """Cluster ids (n,) of the points ``indices`` (n,) of a set; -1 is noise."""

    method: str
    indices: np.ndarray
    clusters: np.ndarray
    parameters: dict = field(default_factory=dict)


def clustering_points(embeddings: np.ndarray, normalized: bool) -> np.ndarray:
    """The points (N, D) float32 the methods cluster: unit rows for a cosine run, else as given."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    return unit_rows(embeddings) if normalized else embeddings


def sample_indices(n: int, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of ``limit`` of ``n`` items (all of them when n <= limit)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Share (0..1] of points whose cluster's most common class is their own class.

    labels, clusters: (N,) integers; every distinct cluster id (-1 included) is one cluster.
    """
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    if labels.shape != clusters.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and clusters {clusters.shape} must be (N,) alike")
    if len(labels) == 0:
        raise ValueError("purity of no points is undefined")
    _, label_ids = np.unique(labels, return_inverse=True)
    _, cluster_ids = np.unique(clusters, return_inverse=True)
    table = np.zeros((cluster_ids.max() + 1, label_ids.max() + 1), dtype=np.int64)
    np.add.at(table, (cluster_ids, label_ids), 1)
    return float(table.max(axis=1).sum() / len(labels))


def silhouette(points: np.ndarray, clusters: np.ndarray, seed: int = 0) -> float | None:
    """Mean silhouette (Euclidean) of points (n, D) grouped by ``clusters`` (n,), -1 (noise) left
    out; None where it is undefined or says nothing (fewer than 2 clusters, or fewer than 2
    points per cluster on average)."""
    from sklearn.metrics import silhouette_score

    kept = np.asarray(clusters) >= 0
    points, clusters = points[kept], np.asarray(clusters)[kept]
    n_clusters = len(np.unique(clusters))
    if n_clusters < 2 or len(points) < 2 * n_clusters:
        return None
    return float(silhouette_score(points, clusters, metric="euclidean", random_state=seed))


def score(
    clustering: Clustering, labels: np.ndarray, points: np.ndarray, sample: np.ndarray, seed: int
) -> dict:
    """NMI, ARI, purity over the clustered points, silhouette over those in ``sample``.

    labels: (N,) the classes of the whole set; points: (N, D) as clustered; sample: indices into
    the set of the points the silhouette uses (those of them that were clustered).
    """
    from sklearn.metrics import adjusted_rand_score

    truth = labels[clustering.indices]
    clusters = clustering.clusters
    in_sample = np.isin(clustering.indices, sample)
    return {
        "points": int(len(clusters)),
        "clusters": int(len(np.unique(clusters[clusters >= 0]))),
        "noise": float(np.mean(clusters < 0)),
        "NMI": retrieval.clustering.normalized_mutual_information(truth, clusters),
        "ARI": float(adjusted_rand_score(truth, clusters)),
        "purity": purity(truth, clusters),
        "silhouette": silhouette(
            points[clustering.indices[in_sample]], clusters[in_sample], seed=seed
        ),
        "parameters": clustering.parameters,
    }


def run_method(
    method: str,
    points: np.ndarray,
    n_clusters: int,
    sample: np.ndarray,
    seed: int,
    *,
    eps_quantile: float = EPS_QUANTILE,
) -> Clustering:
    """Cluster the points (N, D) with ``method`` (one of :data:`METHODS`); see the module
    docstring for what each one clusters and how it is parameterised."""
    if method == "k-means":
        return kmeans(points, n_clusters, sample, seed)
    subset = points[sample]
    if method == "agglomerative":
        from sklearn.cluster import AgglomerativeClustering

        k = max(1, min(n_clusters, len(subset)))
        clusters = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(subset)
        return Clustering(method, sample, clusters, {"n_clusters": k, "linkage": "ward"})
    if method == "DBSCAN":
        from sklearn.cluster import DBSCAN

        min_samples = min(MIN_SAMPLES, len(subset))
        eps = dbscan_eps(subset, min_samples, eps_quantile)
        clusters = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(subset)
        parameters = {"eps": eps, "min_samples": min_samples, "eps_quantile": eps_quantile}
        return Clustering(method, sample, clusters, parameters)
    if method == "HDBSCAN":
        from sklearn.cluster import HDBSCAN

        size = max(2, min(MIN_CLUSTER_SIZE, len(subset)))
        if len(subset) < 2:
            return Clustering(method, sample, np.full(len(subset), -1), {"min_cluster_size": size})
        clusters = HDBSCAN(min_cluster_size=size, copy=True).fit_predict(subset)
        return Clustering(method, sample, clusters, {"min_cluster_size": size})
    raise ValueError(f"unknown clustering method {method!r}; one of {METHODS}")


def kmeans(points: np.ndarray, n_clusters: int, sample: np.ndarray, seed: int) -> Clustering:
    """k-means of every point (N, D) into ``n_clusters`` (at most :data:`KMEANS_MAX_ITER`
    iterations), started by k-means++ on the points of ``sample``, or, when that would take more
    than :data:`~retrieval.clustering.KMEANS_PLUSPLUS_MAX_PAIRS` (point, centre) pairs, by k
    distinct random points (:func:`retrieval.clustering.kmeans`)."""
    k = max(1, min(n_clusters, len(points)))
    found = retrieval.clustering.kmeans(
        points, k, seed=seed, max_iter=KMEANS_MAX_ITER, start=sample
    )
    parameters = {
        "n_clusters": k,
        "init": found.init,
        "init_points": found.init_points,
        "iterations": found.iterations,
    }
    return Clustering("k-means", np.arange(len(points)), found.clusters, parameters)


def dbscan_eps(points: np.ndarray, min_samples: int, quantile: float) -> float:
    """The ``quantile`` of each point's distance to its ``min_samples - 1``-th nearest other point
    (points (n, D), Euclidean): with this ``eps`` about that share of the points have
    ``min_samples`` points (themselves included) within reach, DBSCAN's core points."""
    from sklearn.neighbors import NearestNeighbors

    if min_samples < 2 or len(points) < 2:
        return float("inf") if len(points) < 2 else 0.0
    neighbours = NearestNeighbors(n_neighbors=min(min_samples, len(points)), algorithm="brute")
    distances, _ = neighbours.fit(points).kneighbors(points)
    # Column 0 is the point itself (distance 0), column j its j-th nearest other point.
    reach = distances[:, -1]
    eps = float(np.quantile(reach, quantile))
    # DBSCAN's test is distance <= eps; 0 would make every point noise unless duplicated.
    return eps if eps > 0 else float(np.finfo(np.float32).eps)
