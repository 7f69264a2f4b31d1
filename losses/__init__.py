"""Metric-learning losses: the registry (:mod:`losses.catalog`) and what the config needs.

``loss = losses.get({"name": "semi_hard_triplet", "margin": 0.2})`` gives a callable
``loss(labels (B,), embeddings (B, D))`` -> scalar float32. Importing this package costs no
TensorFlow: the registry (names, parameters, batch needs, geometry) is plain data, and a loss's
implementation, one file per loss, is imported when :func:`get` builds it.

The README's "Losses" section gives the formulas, defaults and sources.
"""

from __future__ import annotations

import importlib

from losses.catalog import LOSSES, METRICS, metric_param
from tfcbir import UserError
from tfcbir.params import validate

__all__ = [
    "LOSSES",
    "METRICS",
    "DEFAULT",
    "get",
    "check_batch",
    "geometry",
    "metric_param",
    "pairwise_distances",
    "cosine_similarities",
]

DEFAULT = "semi_hard_triplet"


def get(params: dict, *, num_classes: int | None = None):
    """The loss ``params`` describes: ``{"name": ..., <its parameters>}`` (missing ones default).

    num_classes: the number of training classes, needed by losses that learn one vector per class.
    Raises UserError for an unknown name, a bad parameter (``loss.margin: -1 is below the
    minimum 0``) or a missing ``num_classes``.
    """
    params = dict(params or {})
    name = params.pop("name", DEFAULT)
    entry = LOSSES.get(name, "loss.name")
    values = validate(params, entry.params, "loss")
    if not entry.meta["uses_proxies"]:
        return entry.builder(**values)
    if num_classes is None or num_classes < 1:
        raise UserError(
            f"loss.name: {name} learns one vector per class and needs the number of "
            f"training classes (got {num_classes})"
        )
    return entry.builder(num_classes=int(num_classes), **values)


def check_batch(params: dict, P: int, K: int) -> None:
    """Raise UserError when the loss in ``params`` cannot learn from batches of P classes x K."""
    name = (params or {}).get("name", DEFAULT)
    entry = LOSSES.get(name, "loss.name")
    min_K, min_P = entry.meta["min_K"], entry.meta["min_P"]
    if min_K > K:
        raise UserError(
            f"loss.name: {name} needs K >= {min_K} images per class in a batch; "
            f"set train.batch.K >= {min_K}"
        )
    if min_P > P:
        raise UserError(
            f"loss.name: {name} needs P >= {min_P} classes in a batch (negatives); "
            f"set train.batch.P >= {min_P}"
        )


def geometry(params: dict) -> str:
    """How the loss in ``params`` compares embeddings: ``cosine`` (angles) or ``euclidean``.

    Losses on similarities (angular, npair, ntxent, multi_similarity, proxy_anchor, arcface) are
    ``cosine``; a distance-based loss follows its ``metric`` (``squared_euclidean`` ranks as
    ``euclidean`` does). A trained model is searched, validated and evaluated in this geometry.
    """
    name = (params or {}).get("name", DEFAULT)
    entry = LOSSES.get(name, "loss.name")
    if entry.meta["geometry"] == "cosine":
        return "cosine"
    metric = (params or {}).get("metric", entry.params["metric"].default)
    return "cosine" if metric == "cosine" else "euclidean"


def __getattr__(name: str):
    # The distance functions need TensorFlow: imported on first use, not with the registry.
    if name in ("pairwise_distances", "cosine_similarities"):
        return getattr(importlib.import_module("losses.distances"), name)
    raise AttributeError(f"module 'losses' has no attribute {name!r}")
