"""Retrieval within one set, class by class: Recall@1, MAP@R and the nearest-neighbour confusion.

Each query image of the set searches the rest of the set (leave-one-out), scored by
:func:`retrieval.metrics.evaluate` (its per-query results) and searched by
:class:`retrieval.search.ExactIndex` for its nearest other image, both in the run's geometry. A
query whose class has no other image in the set has no defined Recall@1 or MAP@R and is left out
of every number here, the confusion matrix included, as the metrics leave it out. Both rank by
the same rules (ties to the lower index), so a class's Recall@1 is the diagonal share of its row
of the confusion matrix, up to float32 rounding between near-equal scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrieval.metrics import evaluate
from retrieval.search import ExactIndex

#: Queries (a seeded sample of the set) by default: each searches the whole set.
DEFAULT_QUERIES = 10_000


@dataclass
class ClassRetrieval:
    """Per-class leave-one-out retrieval within a set of C classes."""

    classes: list[str]  # (C,) class names
    images: np.ndarray  # (C,) images of each class in the set
    queries: np.ndarray  # (C,) evaluated queries of each class
    recall_at_1: np.ndarray  # (C,) float64; NaN where a class has no evaluated query
    map_at_r: np.ndarray  # (C,) float64; NaN likewise
    confusion: np.ndarray  # (C, C) int64: row the query's class, column its neighbour's class
    n_queries: int  # queries searched
    n_excluded: int  # of them, those without another image of their class
    recall_at_1_overall: float  # mean over the evaluated queries (not over classes)
    map_at_r_overall: float  # likewise

    def worst_first(self) -> np.ndarray:
        """Class indices with evaluated queries, worst Recall@1 first (ties: worst MAP@R, then
        name)."""
        known = np.flatnonzero(self.queries > 0)
        names = np.array(self.classes, dtype=object)[known]
        order = np.lexsort((names, self.map_at_r[known], self.recall_at_1[known]))
        return known[order]

    def most_confused(self, n: int = 20) -> list[dict]:
        """The n largest off-diagonal cells, largest first: query class, neighbour class, count
        and share of the query class's evaluated queries."""
        off = self.confusion.copy()
        np.fill_diagonal(off, 0)
        rows, columns = np.nonzero(off)
        counts = off[rows, columns]
        order = np.lexsort((columns, rows, -counts))[:n]
        return [
            {
                "query_class": self.classes[rows[i]],
                "neighbour_class": self.classes[columns[i]],
                "count": int(counts[i]),
                "share": float(counts[i] / self.queries[rows[i]]),
            }
            for i in order
        ]

    def as_rows(self) -> list[dict]:
        """One JSON-ready row per class, in class order."""
        return [
            {
                "class": name,
                "images": int(self.images[c]),
                "queries": int(self.queries[c]),
                "recall@1": _number(self.recall_at_1[c]),
                "MAP@R": _number(self.map_at_r[c]),
            }
            for c, name in enumerate(self.classes)
        ]


def class_retrieval(
    embeddings: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    *,
    normalized: bool,
    queries: np.ndarray,
) -> ClassRetrieval | None:
    """Per-class retrieval of the set (N, D) with labels (N,) in [0, C), ``queries`` (Q,) the
    indices of the images that query the rest of the set. None when no query has another image
    of its class in the set (nothing to measure)."""
    labels = np.asarray(labels, dtype=np.int64)
    queries = np.asarray(queries, dtype=np.int64)
    n_classes = len(classes)
    images = np.bincount(labels, minlength=n_classes)
    query_labels = labels[queries]
    if not np.any(images[query_labels] > 1):
        return None
    metrics = evaluate(
        embeddings[queries],
        query_labels,
        embeddings,
        labels,
        normalized=normalized,
        exclude=queries,
        ks=(1,),
        nmi=False,
    )
    results = metrics.per_query
    evaluated = results.evaluated
    _, nearest = ExactIndex(embeddings, normalized).search(
        embeddings[queries[evaluated]], 1, exclude=queries[evaluated]
    )
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (query_labels[evaluated], labels[nearest[:, 0]]), 1)
    counts = np.bincount(query_labels[evaluated], minlength=n_classes)
    hits = (results.first_rank[evaluated] == 1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.bincount(query_labels[evaluated], weights=hits, minlength=n_classes) / counts
        map_at_r = (
            np.bincount(
                query_labels[evaluated], weights=results.map_at_r[evaluated], minlength=n_classes
            )
            / counts
        )
    return ClassRetrieval(
        classes=list(classes),
        images=images,
        queries=counts,
        recall_at_1=recall,
        map_at_r=map_at_r,
        confusion=confusion,
        n_queries=len(queries),
        n_excluded=int(len(queries) - evaluated.sum()),
        recall_at_1_overall=float(hits.mean()),
        map_at_r_overall=float(results.map_at_r[evaluated].mean()),
    )


def _number(value: float) -> float | None:
    return None if np.isnan(value) else float(value)
