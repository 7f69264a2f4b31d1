"""Metric-learning losses: the registry (:mod:`losses.catalog`) and what the config needs.

``loss = losses.get({"name": "semi_hard_triplet", "margin": 0.2})`` gives a callable
``loss(labels (B,), embeddings (B, D))`` -> scalar float32. The image-text losses of dual
encoders (``clip``, ``siglip``: :func:`is_image_text`) are called as ``loss(image_embeddings,
text_embeddings, groups)``; :func:`get_dual` adds the weighted image loss their ``image_loss``
names. Importing this package costs no TensorFlow: the registry (names, parameters, batch needs,
geometry) is plain data, and a loss's implementation is imported when :func:`get` builds it.

Losses are built from parts: a distance (:mod:`losses.distances`, the ``metric`` key), a miner
(:mod:`losses.miners`, the ``miner`` key) and a formula; the registered names are presets of
them (``{"name": "batch_all_triplet", "miner": "multi_similarity", "metric": "cosine"}``
composes the triplet formula with another miner and distance).

docs/losses.md gives the formulas, defaults and sources.
"""

from __future__ import annotations

import importlib

from losses.catalog import DISTANCES, LOSSES, METRICS, MINERS, check_miner_metric, metric_param
from tfcbir import UserError
from tfcbir.params import Param, check_value, fmt, validate

__all__ = [
    "LOSSES",
    "METRICS",
    "DISTANCES",
    "MINERS",
    "DEFAULT",
    "get",
    "get_dual",
    "resolve",
    "check_batch",
    "check_memory",
    "geometry",
    "image_loss_names",
    "is_image_text",
    "resolve_image_loss",
    "metric_param",
    "pairwise_distances",
    "cosine_similarities",
]

DEFAULT = "semi_hard_triplet"


def resolve(params: dict, path: str = "loss") -> dict:
    """The loss ``params`` describes, validated: ``{"name", <its parameters>}``, the missing ones
    at the catalog's defaults, the rules across its keys checked (``soft_margin`` and ``miner``),
    an image-text loss's ``image_loss`` resolved. UserError naming ``path.key``."""
    params = dict(params or {})
    name = params.pop("name", DEFAULT)
    entry = LOSSES.get(name, f"{path}.name")
    values = validate(params, entry.params, path)
    if "image_loss" in values and is_image_text({"name": name}):
        values["image_loss"] = resolve_image_loss(values["image_loss"], f"{path}.image_loss")
    if "check" in entry.meta:  # a rule across the loss's own keys
        entry.meta["check"](values, path)
    check_miner_metric(values, path)
    return {"name": name, **values}


def get(params: dict, *, num_classes: int | None = None):
    """The loss ``params`` describes: ``{"name": ..., <its parameters>}`` (missing ones default).

    num_classes: the number of training classes, needed by losses that learn one vector per class.
    Raises UserError for an unknown name, a bad parameter (``loss.margin: -1 is below the
    minimum 0``) or a missing ``num_classes``.
    """
    values = resolve(params)
    name = values.pop("name")
    entry = LOSSES.get(name)
    if is_image_text({"name": name}):
        values.pop("image_loss")  # get_dual builds it
    if not entry.meta["uses_proxies"]:
        return entry.builder(**values)
    if num_classes is None or num_classes < 1:
        raise UserError(
            f"loss.name: {name} learns one vector per class and needs the number of "
            f"training classes (got {num_classes})"
        )
    return entry.builder(num_classes=int(num_classes), **values)


def get_dual(params: dict, *, num_classes: int | None = None):
    """The image-text loss ``params`` describes, with its weighted ``image_loss`` (if any):
    a :class:`losses.dual.DualEncoderLoss`. num_classes: as for :func:`get` (image losses that
    learn one vector per class)."""
    from losses.dual import DualEncoderLoss

    params = dict(params or {})
    if not is_image_text(params):
        raise UserError(
            f"loss.name: {params.get('name', DEFAULT)} is an image loss; a dual encoder trains "
            f"with one of {', '.join(n for n in LOSSES.names() if is_image_text({'name': n}))}"
        )
    image = resolve_image_loss(params.get("image_loss"))
    pair = get({k: v for k, v in params.items() if k != "image_loss"})
    if image is None:
        return DualEncoderLoss(pair)
    weight = image.pop("weight")
    return DualEncoderLoss(pair, get(image, num_classes=num_classes), weight)


def is_image_text(params: dict) -> bool:
    """Whether the loss in ``params`` is an image-text loss (trains a dual encoder)."""
    name = (params or {}).get("name", DEFAULT)
    return LOSSES.get(name, "loss.name").meta.get("kind", "image") == "image_text"


def image_loss_names() -> list[str]:
    """The losses of image embeddings alone, in registry order."""
    return [name for name in LOSSES.names() if not is_image_text({"name": name})]


IMAGE_LOSS_WEIGHT = Param(
    float, 1.0, "Weight of the image loss in the sum.", min=0, min_exclusive=True
)


def resolve_image_loss(value, path: str = "loss.image_loss") -> dict | None:
    """An image-text loss's ``image_loss`` validated, its defaults filled:
    ``{"name", "weight", <the loss's parameters>}``, or None. UserError naming ``path.key``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise UserError(
            f'{path}: {fmt(value)} is not a mapping; give e.g. {{"name": "ntxent", "weight": 1}}'
        )
    if "name" not in value:
        raise UserError(f"{path}.name: missing; give one of {', '.join(image_loss_names())}")
    name = value["name"]
    LOSSES.get(name, f"{path}.name")  # an unknown name: the error names path.name
    if is_image_text({"name": name}):
        raise UserError(
            f"{path}.name: {name} is an image-text loss; give an image loss, one of "
            f"{', '.join(image_loss_names())}"
        )
    weight = check_value(
        value.get("weight", IMAGE_LOSS_WEIGHT.default), IMAGE_LOSS_WEIGHT, f"{path}.weight"
    )
    rest = {k: v for k, v in value.items() if k not in ("name", "weight")}
    resolved = resolve({"name": name, **rest}, path)
    if resolved.get("miner") == "distance_weighted":
        # Its draws follow the training step, which only the image task passes to its loss.
        raise UserError(
            f"{path}.miner: distance_weighted is for image losses trained alone; give the image "
            "loss of a dual encoder another miner"
        )
    return {"name": name, "weight": weight, **resolved}


def check_batch(params: dict, P: int, K: int, path: str = "loss") -> None:
    """Raise UserError when the loss in ``params`` (and an image-text loss's image loss) cannot
    learn from batches of P classes x K; the message names ``path`` (e.g. ``loss.image_loss``)."""
    name = (params or {}).get("name", DEFAULT)
    entry = LOSSES.get(name, f"{path}.name")
    min_K, min_P = entry.meta["min_K"], entry.meta["min_P"]
    if min_K > K:
        raise UserError(
            f"{path}.name: {name} needs K >= {min_K} images per class in a batch; "
            f"set train.batch.K >= {min_K}"
        )
    if min_P > P:
        raise UserError(
            f"{path}.name: {name} needs P >= {min_P} classes in a batch (negatives); "
            f"set train.batch.P >= {min_P}"
        )
    if is_image_text(params):
        image_path = f"{path}.image_loss"
        image = resolve_image_loss(params.get("image_loss"), image_path)
        if image is not None:
            check_batch(image, P, K, image_path)


def check_memory(params: dict, memory: dict, P: int, K: int, path: str = "train.memory") -> None:
    """Raise UserError when the loss in ``params`` cannot use the cross-batch memory ``memory``
    (``{"size", "start_step", "weight"}``, size 0: off) with batches of P x K."""
    if not memory["size"]:
        return
    name = (params or {}).get("name", DEFAULT)
    if not LOSSES.get(name, "loss.name").meta.get("takes_references"):
        takes = ", ".join(n for n in LOSSES.names() if LOSSES.get(n).meta.get("takes_references"))
        raise UserError(
            f"{path}.size: {name} compares the batch with itself only and cannot use a "
            f"cross-batch memory; set {path}.size: 0, or use one of {takes}"
        )
    if memory["size"] < P * K:
        raise UserError(
            f"{path}.size: {memory['size']} is smaller than a batch of P x K = {P * K} "
            f"embeddings; give at least {P * K}"
        )


def geometry(params: dict) -> str:
    """How the loss in ``params`` compares embeddings: ``cosine`` (angles) or ``euclidean``.

    Losses on similarities (angular, npair, ntxent, multi_similarity, proxy_anchor, arcface, and
    the image-text losses clip and siglip) are ``cosine``; a distance-based loss follows its
    ``metric`` (``squared_euclidean`` ranks as ``euclidean`` does). A trained model is searched,
    validated and evaluated in this geometry.
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
