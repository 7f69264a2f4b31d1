"""The original (TF1-era) system's configs, translated to the new form.

Old form::

    {"dataset": "bags_40",
     "model": {"name": "resnet_v1_50", "head": "direct_normalize", "input": 224, "crop": 256,
               "batch": {"P": 20, "K": 2},
               "fit": {"loss": "angular_loss", "alpha": 45, "optimizer": "adam",
                       "epochs": 2000, "lr": 0.0003, "decay_start_iteration": 1000}}}

``epochs`` counted iterations; ``input`` is the network's input size; ``crop`` is the size random
crops are taken from (a number or [h, w]) or a boolean. The translation is strict: unknown keys
are rejected like in the new form.
"""

from __future__ import annotations

from tfcbir import UserError
from tfcbir.params import Param, validate

LOSS_NAMES = {"angular_loss": "angular", "triplet_semihard_loss": "semi_hard_triplet"}
METRICS = {
    "euclidean": "euclidean",
    "L2": "euclidean",
    "squared_euclidean": "squared_euclidean",
    "squared-L2": "squared_euclidean",
    "cosine": "cosine",
    "angular": "cosine",
}
OPTIMIZERS = {"adam": "adam", "adamw": "adamw", "sgd": "sgd", "momentum": "sgd"}

_SIZE = (int, list)

FIT = {
    "loss": Param(str, "triplet_semihard_loss", choices=list(LOSS_NAMES)),
    "alpha": Param(float, 45.0, min=0, max=90, min_exclusive=True, max_exclusive=True),
    "margin": Param(float, 0.2, min=0),
    "metric": Param(str, "euclidean", choices=list(METRICS)),
    "optimizer": Param(str, "adam", choices=list(OPTIMIZERS)),
    "epochs": Param(int, 2000, min=1),
    "lr": Param(float, 3e-4, min=0, min_exclusive=True),
    "decay_start_iteration": Param(int, None, min=0, nullable=True),
}
MODEL = {
    "name": Param(str, "resnet_v1_50"),
    "head": Param(str, "direct_normalize"),
    "input": Param(_SIZE, 224),
    "crop": Param((bool, int, list), True),
    "embedding_dim": Param(int, 128, min=1),
    "weights": Param(str, "imagenet"),
}
BATCH = {"P": Param(int, 20, min=1), "K": Param(int, 2, min=1)}
TOP = {
    "dataset": Param(str, None),
    "seed": Param(int, 0, min=0),
    "name": Param(str, None, nullable=True),
}


def is_legacy(raw) -> bool:
    """Old configs name a ``dataset`` or keep training settings under ``model.fit``."""
    if not isinstance(raw, dict):
        return False
    model = raw.get("model")
    return "dataset" in raw or (isinstance(model, dict) and ("fit" in model or "batch" in model))


def translate(raw: dict) -> dict:
    """Return the new-form config equivalent to an old-form one (not yet validated)."""
    model_raw = dict(raw.get("model") or {})
    if not isinstance(raw.get("model", {}), dict):
        raise UserError("model: not a mapping")
    fit = validate(model_raw.pop("fit", None), FIT, "model.fit")
    batch = validate(model_raw.pop("batch", None), BATCH, "model.batch")
    model = validate(model_raw, MODEL, "model")
    top = validate({k: v for k, v in raw.items() if k != "model"}, TOP, "")
    if not top["dataset"]:
        raise UserError(
            "dataset: missing; give the data set's folder name under <data_dir>/datasets/"
        )

    image_size = _size(model["input"], "model.input")
    crop = model["crop"]
    if isinstance(crop, bool):
        resize = [round(s * 256 / 224) for s in image_size] if crop else None
    else:
        resize = _size(crop, "model.crop")
    loss_name = LOSS_NAMES[fit["loss"]]
    loss = {"name": loss_name}
    if loss_name == "angular":
        loss["alpha"] = fit["alpha"]
    else:
        loss["margin"] = fit["margin"]
        loss["metric"] = METRICS[fit["metric"]]
    if fit["decay_start_iteration"] is None:
        schedule = {"name": "constant"}
    else:
        schedule = {"name": "linear", "decay_start": fit["decay_start_iteration"]}
    new = {
        "seed": top["seed"],
        "data": {
            "root": f"datasets/{top['dataset']}",
            "image_size": image_size,
            "resize": resize,
            "augment": {"flip": True, "crop": resize is not None},
        },
        "model": {
            "backbone": model["name"],
            "weights": model["weights"],
            "head": model["head"],
            "embedding_dim": model["embedding_dim"],
        },
        "loss": loss,
        "train": {
            "batch": batch,
            "steps": fit["epochs"],
            "optimizer": {"name": OPTIMIZERS[fit["optimizer"]], "lr": fit["lr"]},
            "lr_schedule": schedule,
        },
    }
    if top["name"]:
        new = {"name": top["name"], **new}
    return new


def _size(value, key: str) -> list[int]:
    """224 -> [224, 224]; [224, 224] or [224, 224, 3] -> [224, 224]."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    if (
        isinstance(value, list)
        and len(value) in (2, 3)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return list(value[:2])
    raise UserError(f"{key}: {value!r} is not a size; give a number of pixels or [height, width]")
