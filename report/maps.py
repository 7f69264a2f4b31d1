"""2-D maps of an embedding space: t-SNE (scikit-learn), and UMAP where ``umap-learn`` is installed.

Both take the points in the run's geometry (:func:`report.clustering.clustering_points`: unit
vectors for a cosine run) with Euclidean distances, and are seeded. t-SNE's cost grows with the
number of points, so the report maps a seeded sample of at most ``map_points`` of them.
"""

from __future__ import annotations

import importlib.util
import warnings
from contextlib import nullcontext

import numpy as np
from threadpoolctl import threadpool_limits

#: Points on a map by default; a larger set is subsampled (seeded) and the map says so.
DEFAULT_POINTS = 5000
PERPLEXITY = 30.0
ONE_THREAD_MAX = 1000  # maps up to this many points run t-SNE on one thread


def methods() -> list[str]:
    """The map methods available here: t-SNE always, UMAP where ``umap-learn`` is installed."""
    return ["t-SNE"] + (["UMAP"] if importlib.util.find_spec("umap") is not None else [])


def embed_2d(method: str, points: np.ndarray, seed: int) -> np.ndarray:
    """2-D coordinates (n, 2) float64 of points (n, D) by ``method`` (one of :func:`methods`)."""
    points = np.asarray(points, dtype=np.float32)
    n = len(points)
    if n < 4:  # too few for a neighbourhood: spread them on a line
        return np.stack([np.arange(n, dtype=np.float64), np.zeros(n)], axis=1)
    if method == "t-SNE":
        from sklearn.manifold import TSNE

        # scikit-learn needs perplexity < n; about n/3 keeps small sets from collapsing.
        perplexity = float(min(PERPLEXITY, max(1.0, (n - 1) / 3)))
        tsne = TSNE(
            n_components=2,
            perplexity=perplexity,
            init="pca",
            learning_rate="auto",
            metric="euclidean",
            random_state=seed,
        )
        # Each of t-SNE's 1,000 iterations synchronises its OpenMP threads: on a small map that
        # costs more than the work (seconds for 24 points on a busy 2-core machine).
        threads = threadpool_limits(1, user_api="openmp") if n <= ONE_THREAD_MAX else nullcontext()
        with threads:
            return tsne.fit_transform(points).astype(np.float64)
    if method == "UMAP":
        import umap

        with warnings.catch_warnings():  # umap warns that a seed turns off its parallelism
            warnings.simplefilter("ignore")
            reducer = umap.UMAP(
                n_components=2,
                n_neighbors=int(min(15, n - 1)),
                metric="euclidean",
                random_state=seed,
            )
            return np.asarray(reducer.fit_transform(points), dtype=np.float64)
    raise ValueError(f"unknown map method {method!r}; available here: {methods()}")
