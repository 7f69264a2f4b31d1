"""Metric-learning losses: a registry filled by one module per loss, and what the config needs.

``loss = losses.get({"name": "semi_hard_triplet", "margin": 0.2})`` gives a callable
``loss(labels (B,), embeddings (B, D))`` -> scalar float32. Each entry of :data:`LOSSES` declares
its parameters (the config's ``loss.*`` keys) and two facts the config checks:

- ``min_K``: the fewest images per class a batch must hold (pair and triplet losses need 2);
- ``min_P``: the fewest classes per batch (pair and triplet losses need negatives: 2);
- ``uses_proxies``: the loss learns one vector per class (a Keras layer whose
  ``trainable_variables`` train with the model); :func:`get` then needs ``num_classes``.

The README's "Losses" section gives the formulas, defaults and sources.
"""

from __future__ import annotations

from losses.base import LOSSES
from losses.distances import METRICS, cosine_similarities, pairwise_distances
from tfcbir import UserError
from tfcbir.params import validate

# Registration order is the order the config reference and error messages list.
# isort: off
from losses import semi_hard_triplet  # noqa: F401
from losses import angular  # noqa: F401
from losses import batch_hard_triplet  # noqa: F401
from losses import batch_all_triplet  # noqa: F401
from losses import contrastive  # noqa: F401
from losses import lifted_structure  # noqa: F401
from losses import npair  # noqa: F401
from losses import multi_similarity  # noqa: F401
from losses import ntxent  # noqa: F401
from losses import proxy_anchor  # noqa: F401
from losses import arcface  # noqa: F401
# isort: on

__all__ = [
    "LOSSES",
    "METRICS",
    "DEFAULT",
    "get",
    "check_batch",
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
