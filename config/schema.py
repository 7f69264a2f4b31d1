"""The training config's schema: every key, its default and what is allowed.

The schema is data: nested dicts of :class:`tfcbir.params.Param`. ``loss`` is special: its keys
are the chosen loss's own parameters, declared where the loss is registered (``losses/``), so a
new loss needs no change here. :func:`reference` renders the whole schema as docs/config.md's table.
"""

from __future__ import annotations

import re

import losses
import nets
from datasets.augment import DEFAULTS, PRESETS
from datasets.captions import CAPTIONS_FILE, GROUP_BY, check_template
from datasets.lists import CLASS_ORDERS, LAYOUTS, SPLIT_KINDS, VALIDATION_SOURCES
from retrieval.metrics import SELECTION_METRICS
from tfcbir import UserError
from tfcbir.params import REQUIRED, Param, check_value, did_you_mean, fmt, validate

SPLIT_MODES = ["auto", *SPLIT_KINDS]
DATA_FORMATS = ["auto", *LAYOUTS]
OPTIMIZERS = ["adam", "adamw", "sgd"]
LR_SCHEDULES = ["constant", "linear", "cosine"]
PROTOCOLS = ["auto", "train_gallery", "leave_one_out", "query_gallery"]


def _name_ok(value: str) -> str | None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
        return "is not a usable folder name; use letters, digits, '.', '_' and '-'"
    return None


def _templates_ok(value: list) -> str | None:
    if not value:
        return "is empty; give at least one template such as 'a photo of a {class}.', or null"
    for template in value:
        problem = check_template(template)
        if problem:
            return f"holds {template!r}, which {problem}"
    return None


def _range_ok(low: float, high: float | None):
    """A check that a [min, max] pair lies in (low, high] with min <= max."""

    def check(value: list) -> str | None:
        first, second = value
        if first <= low or (high is not None and second > high) or first > second:
            bound = f" <= {high:g}" if high is not None else ""
            return f"is not [min, max] with {low:g} < min <= max{bound}"
        return None

    return check


def _size_pair(default, doc, nullable=False):
    return Param(list, default, doc, item=int, length=2, min=16, max=4096, nullable=nullable)


SCHEMA: dict = {
    "name": Param(
        str,
        None,
        "Run name: the folder under <data_dir>/trainings/. Default: the "
        "config file's name without its suffix.",
        nullable=True,
        check=_name_ok,
    ),
    "seed": Param(int, 0, "Seeds Python, NumPy and TensorFlow, the split and the batches.", min=0),
    "data": {
        "root": Param(
            str,
            REQUIRED,
            "Data set folder (one sub-folder per class, train/ and test/ folders, "
            "x_train.csv and x_test.csv lists, or a benchmark archive as distributed: see "
            "Data sets), relative to data_dir or absolute.",
        ),
        "format": Param(
            str,
            "auto",
            "Layout of data.root: auto (detected from the files present), class_folders, "
            "split_folders (train/ and test/), csv, or a benchmark archive: cub200 "
            "(CUB-200-2011), cars196, sop (Stanford Online Products), inshop (In-shop "
            "Clothes).",
            choices=DATA_FORMATS,
        ),
        "split": {
            "by": Param(
                str,
                "auto",
                "How train and test are made: auto (the layout's own: folders, CSV lists "
                "or a benchmark's protocol if present, else images), images (stratified), "
                "classes (class-disjoint), folders, csv, protocol (a benchmark archive's "
                "fixed split), none (all train).",
                choices=SPLIT_MODES,
            ),
            "test_fraction": Param(
                float,
                0.2,
                "by=images: share of each class's images held out for test.",
                min=0,
                max=1,
                min_exclusive=True,
                max_exclusive=True,
            ),
            "train_classes": Param(
                float,
                0.5,
                "by=classes: share of the classes used for training; the rest are test classes.",
                min=0,
                max=1,
                min_exclusive=True,
                max_exclusive=True,
            ),
            "order": Param(
                str,
                "random",
                "by=classes: which classes train: random (a seeded draw) or sorted (the first "
                "in sorted name order: the CUB-200-2011 and Cars196 protocol when folder names "
                "sort by class number, e.g. 001.Black_footed_Albatross).",
                choices=CLASS_ORDERS,
            ),
        },
        "image_size": _size_pair([224, 224], "[height, width] fed to the network."),
        "resize": _size_pair(
            [256, 256],
            "[height, width] images are resized to before the "
            "crop (random when training, centre when embedding); null: resize "
            "straight to image_size.",
            nullable=True,
        ),
        "augment": {
            "preset": Param(
                str,
                None,
                "Training augmentation by name: none (centre crop, nothing random), light "
                "(random resized crop of area 0.5-1, flips, colour jitter 0.1) or strong "
                "(resized crop of area 0.08-1, flips, jitter 0.4/0.4/0.4/0.1, grayscale 0.2, "
                "RandAugment 2 ops at magnitude 9); it sets every key below, and keys written "
                "beside it override it (docs/training.md). null: each key's own default.",
                choices=list(PRESETS),
                nullable=True,
                allowed_text="one of none, light, strong, or null",
            ),
            "flip": Param(bool, True, "Random horizontal flips when training."),
            "crop": Param(
                bool,
                True,
                "Random crops of image_size from resize when training (false: the centre); "
                "unused with resized_crop.",
            ),
            "resized_crop": Param(
                bool,
                False,
                "Random resized crops (torchvision's RandomResizedCrop) of the decoded image "
                "(resize, or image_size) to image_size, in place of crop.",
            ),
            "scale": Param(
                list,
                DEFAULTS["scale"],
                "resized_crop: [min, max] share of the image's area a crop covers.",
                item=float,
                length=2,
                check=_range_ok(0, 1),
                allowed_text="[min, max] with 0 < min <= max <= 1",
            ),
            "ratio": Param(
                list,
                DEFAULTS["ratio"],
                "resized_crop: [min, max] aspect ratio (width / height) of a crop, drawn "
                "log-uniformly.",
                item=float,
                length=2,
                check=_range_ok(0, None),
                allowed_text="[min, max] with 0 < min <= max",
            ),
            "brightness": Param(
                float, 0.0, "Colour jitter: brightness factor in [1 - x, 1 + x]; 0: off.", min=0
            ),
            "contrast": Param(
                float, 0.0, "Colour jitter: contrast factor in [1 - x, 1 + x]; 0: off.", min=0
            ),
            "saturation": Param(
                float, 0.0, "Colour jitter: saturation factor in [1 - x, 1 + x]; 0: off.", min=0
            ),
            "hue": Param(
                float, 0.0, "Colour jitter: hue shift in [-x, x] of a turn; 0: off.", min=0, max=0.5
            ),
            "grayscale": Param(
                float, 0.0, "Probability that a training image is made grey.", min=0, max=1
            ),
            "randaugment_ops": Param(
                int,
                0,
                "RandAugment: ops applied to each training image, drawn from rotate, shear_x, "
                "shear_y, translate_x, translate_y, posterize, solarize, autocontrast, equalize "
                "and sharpness; 0: off.",
                min=0,
                max=10,
            ),
            "randaugment_magnitude": Param(
                int, 9, "RandAugment: strength of each op, 0 (none) to 30 (most).", min=0, max=30
            ),
        },
        "cache_gb": Param(
            float,
            4.0,
            "Decoded training images are kept in memory up to this "
            "size (decoded once); larger sets are decoded batch by batch.",
            min=0,
        ),
        "captions": {
            "file": Param(
                str,
                CAPTIONS_FILE,
                "Image-caption pairs for a text tower: a CSV file in the data root (header "
                "path,caption; paths relative to the data root; several rows per image "
                "allowed), used when it exists.",
            ),
            "templates": Param(
                list,
                None,
                "Captions made from class names for the images without a row in the file, "
                'e.g. ["a photo of a {class}."] ({class}: the folder name, _ and - read as '
                "spaces); also the class prompts of evaluation.py --text-queries (there "
                'default ["a photo of a {class}."]). null: none.',
                item=str,
                nullable=True,
                check=_templates_ok,
            ),
            "group_by": Param(
                str,
                "auto",
                "Pairs of one group are not negatives of each other in an image-text loss, "
                "and are matches in its validation: image (captions of one image, or the same "
                "words), class (of one class); auto: class when every caption comes from the "
                "templates, else image (resolved on the training captions; validation groups "
                "alike).",
                choices=GROUP_BY,
            ),
        },
    },
    "model": {**nets.PARAMS, "text": nets.TEXT_PARAMS},
    "loss": {
        "name": Param(
            str,
            "semi_hard_triplet",
            "Metric-learning loss; its parameters sit beside it (see Losses).",
            choices=losses.LOSSES.names,
        ),
    },
    "train": {
        "batch": {
            "P": Param(int, 20, "Classes per batch.", min=1),
            "K": Param(
                int,
                2,
                "Images per class in a batch (a class with fewer is sampled with replacement).",
                min=1,
            ),
        },
        "steps": Param(int, 2000, "Training steps (batches).", min=1),
        "optimizer": {
            "name": Param(str, "adam", "Optimizer.", choices=OPTIMIZERS),
            "lr": Param(float, 3e-4, "Peak learning rate.", min=0, min_exclusive=True),
            "momentum": Param(
                float, 0.9, "sgd only: momentum (Nesterov off).", min=0, max=1, max_exclusive=True
            ),
            "weight_decay": Param(
                float,
                None,
                "Decoupled weight decay; null: none, or 0.004 for adamw.",
                min=0,
                nullable=True,
            ),
            "clipnorm": Param(
                float,
                None,
                "Clip each gradient to this norm; null: no clipping.",
                min=0,
                min_exclusive=True,
                nullable=True,
            ),
            "backbone_lr_multiplier": Param(
                float,
                1.0,
                "Discriminative learning rates: the backbone's variables train at lr times this "
                "(e.g. 0.1), the head at lr (a loss's class vectors at their own multiple).",
                min=0,
                min_exclusive=True,
            ),
            "layer_decay": Param(
                float,
                None,
                "hub: towers: layer-wise learning-rate decay (BEiT, timm): transformer block i "
                "of L (from 0) trains at decay^(L - i), the embeddings at decay^(L + 1), the "
                "layers after the last block and the head at 1 (times backbone_lr_multiplier "
                "for the backbone's). null or 1: no decay.",
                min=0,
                max=1,
                min_exclusive=True,
                nullable=True,
            ),
        },
        "lr_schedule": {
            "name": Param(
                str,
                "constant",
                "constant; linear: decays to ~0 at the last step, "
                "starting at decay_start; cosine: cosine decay from decay_start to the "
                "last step.",
                choices=LR_SCHEDULES,
            ),
            "decay_start": Param(int, 0, "linear/cosine: the step where decay begins.", min=0),
            "warmup_steps": Param(int, 0, "Linear warm-up from 0 over this many steps.", min=0),
            "final_lr_fraction": Param(
                float,
                0.0,
                "linear/cosine: the learning rate at the last step, as a fraction of lr.",
                min=0,
                max=1,
            ),
        },
        "checkpoint_every": Param(int, 100, "Save a checkpoint every this many steps.", min=1),
        "keep_checkpoints": Param(int, 3, "How many recent checkpoints to keep.", min=1),
        "validate_every": Param(
            int,
            500,
            "Measure the validation score (train.validation.metric) every this many steps; "
            "0: never (the last weights are then the model).",
            min=0,
        ),
        "validation": {
            "source": Param(
                str,
                "auto",
                "Images that select the model (best.weights.h5): auto and holdout: held out of the "
                "training split (a share of each class's images; whole classes when the split "
                "is class-disjoint), never the test split; test: the test split (its metrics "
                "are then optimistic, with a warning); none. The run's config.json records "
                "the resolved source.",
                choices=VALIDATION_SOURCES,
            ),
            "holdout": Param(
                float,
                0.1,
                "Share held out of training for validation: of each class's images, or of the "
                "classes for a class-disjoint split.",
                min=0,
                max=1,
                min_exclusive=True,
                max_exclusive=True,
            ),
            "max_images": Param(
                int, 1000, "Validation uses at most this many images (seeded sample).", min=2
            ),
            "metric": Param(
                str,
                "recall@1",
                "The validation score that selects the best weights: recall@1, or map@r "
                "(MAP@R: ranks the whole class, not only the first answer; logged as "
                "val_map@r in metrics.csv and best.json).",
                choices=list(SELECTION_METRICS),
            ),
        },
        "log_every": Param(
            int,
            10,
            "Write loss and learning rate to the CSV and TensorBoard every this many steps.",
            min=1,
        ),
        "distribute": Param(
            str,
            "none",
            "none; mirrored: every local GPU (tf.distribute.MirroredStrategy); "
            "multi_worker: several machines described by TF_CONFIG. Each replica gets "
            "P / replicas whole classes; the loss sees the whole batch.",
            choices=["none", "mirrored", "multi_worker"],
        ),
        "mixed_precision": Param(
            bool,
            False,
            "mixed_float16 on GPUs (embeddings and loss stay "
            "float32); ignored with a warning without a GPU.",
        ),
        "ema": Param(
            (dict, bool),
            None,
            "An exponential moving average of the model's weights (BatchNorm statistics too), "
            "updated after each step as timm's ModelEmaV3: null or false: none; true: the "
            "defaults; {decay: 0.9998, warmup: true, warmup_gamma: 1.0, warmup_power: 0.667}. "
            "Validation scores the average as well; the better becomes best.weights.h5 "
            "(docs/training.md).",
            nullable=True,
            allowed_text="null, false, true, or {decay, warmup, warmup_gamma, warmup_power}",
        ),
        "freeze_backbone_steps": Param(
            int,
            0,
            "A warm-up stage: for this many first steps only the head (and the loss's own "
            "variables) train; the backbone's weights and BatchNorm statistics stay fixed.",
            min=0,
        ),
        "memory": {
            "size": Param(
                int,
                0,
                "Cross-batch memory (XBM, Wang et al. 2020): the last this many training "
                "embeddings (no gradient) serve as extra references of a pair-based loss "
                "(triplet, contrastive, multi_similarity, npair); at least P x K. 0: off.",
                min=0,
            ),
            "start_step": Param(
                int,
                0,
                "The memory fills from this step (0-based) on; before it, it stays empty.",
                min=0,
            ),
            "weight": Param(
                float,
                1.0,
                "Weight of the loss against the memory, added to the batch's own loss.",
                min=0,
                min_exclusive=True,
            ),
        },
    },
    "eval": {
        "protocol": Param(
            str,
            "auto",
            "auto: query_gallery for a data set with its own query and gallery "
            "lists (In-shop), leave_one_out for class-disjoint splits, else "
            "train_gallery; train_gallery: test queries against the training "
            "split; leave_one_out: the test split against itself; query_gallery: "
            "explicit lists (eval.query_list and eval.gallery_list, or In-shop's).",
            choices=PROTOCOLS,
        ),
        "query_list": Param(
            str, None, "query_gallery: CSV list of queries (label,path).", nullable=True
        ),
        "gallery_list": Param(
            str, None, "query_gallery: CSV list of the gallery (label,path).", nullable=True
        ),
        "rerank": Param(
            (str, dict),
            "none",
            "Query-time re-ranking of evaluation.py, test.py, cbir.py and serve.py: none, "
            "alpha_qe, dba, dba_alpha_qe (Radenovic et al.) or k_reciprocal (Zhong et al.), "
            "by name (its defaults) or as {method: ..., its parameters} (docs/retrieval.md); "
            "its parameters are checked when it is used.",
            allowed_text="none, alpha_qe, dba, dba_alpha_qe, k_reciprocal, or {method: ..., ...}",
        ),
    },
    "index": {
        "type": Param(
            str,
            "exact",
            "Search index of the gallery: exact (blocked matrix "
            "products, memory-bounded) or a FAISS index factory string such as "
            "IVF4096,Flat, HNSW32 or IVF4096,PQ32 (needs faiss-cpu), built by embed.py.",
        ),
        "search_parameters": Param(
            str,
            "",
            "Search parameters: FAISS's, e.g. nprobe=64 or efSearch=128; LanceDB's, e.g. "
            "nprobes=20,refine_factor=10 (ef for HNSW); empty: the index's defaults.",
        ),
        "backend": Param(
            str,
            "hdf5",
            "Where galleries live: hdf5 (a file per set under the run, searched exactly or "
            "with FAISS) or lancedb (one table per set in the LanceDB database at index.uri: "
            "searched, filtered and updated in the engine; docs/scaling.md).",
            choices=["hdf5", "lancedb"],
        ),
        "uri": Param(
            str,
            "",
            "The LanceDB database (index.backend lancedb): a local folder (relative to "
            "data_dir) or an object-store URI such as s3://bucket/galleries that many "
            "servers read; empty: <run>/lancedb.",
        ),
        "build_parameters": Param(
            str,
            "",
            "LanceDB index parameters, e.g. num_partitions=256,num_sub_vectors=16 (IVF_PQ) or "
            "m=20,ef_construction=300 (HNSW); empty: LanceDB's defaults, num_partitions "
            "sqrt(N).",
        ),
    },
}

#: index.type with index.backend lancedb: no ANN index (a flat, exact search) or LanceDB's.
LANCE_INDEX_TYPES = (
    "exact",
    "IVF_FLAT",
    "IVF_SQ",
    "IVF_PQ",
    "IVF_HNSW_SQ",
    "IVF_HNSW_PQ",
    "IVF_HNSW_FLAT",
)

# train.ema as a mapping: timm's ModelEmaV3 parameters (min_decay 0, update_after_step 0).
EMA_PARAMS = {
    "decay": Param(float, 0.9998, "The largest decay.", min=0, max=1, max_exclusive=True),
    "warmup": Param(bool, True, "Ramp the decay up: 1 - (1 + t / warmup_gamma) ^ -warmup_power."),
    "warmup_gamma": Param(float, 1.0, "Warm-up: the step scale.", min=0, min_exclusive=True),
    "warmup_power": Param(float, 2 / 3, "Warm-up: the power.", min=0, min_exclusive=True),
}


def ema_settings(value, path: str = "train.ema") -> dict | None:
    """``train.ema`` with its defaults filled in (a mapping of :data:`EMA_PARAMS`), or None
    for no average (null or false)."""
    if value is None or value is False:
        return None
    return validate({} if value is True else value, EMA_PARAMS, path)


# Keys whose change does not change what a resumed run computes.
RESUMABLE_CHANGES = {
    "train.steps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.validate_every",
    "train.log_every",
    "data.cache_gb",
    "eval",
    "index",
}


def resolve(raw: dict) -> dict:
    """Validate a (new-form) config mapping; return it with every default filled in."""
    if not isinstance(raw, dict):
        raise UserError(f"the config is {fmt(raw)}, not a mapping of sections")
    loss_raw = raw.get("loss", {})
    raw = _with_augment_preset({k: v for k, v in raw.items() if k != "loss"})
    config = _validate_section(raw, {k: v for k, v in SCHEMA.items() if k != "loss"}, "")
    config["loss"] = resolve_loss(loss_raw)
    _check_cross_keys(config)
    return config


def _with_augment_preset(raw: dict) -> dict:
    """``raw`` with ``data.augment.preset`` expanded: the preset's value for every augmentation
    key not written beside it (so a resolved config says what it does, and resolves again to
    itself)."""
    data = raw.get("data")
    augment = data.get("augment") if isinstance(data, dict) else None
    if not isinstance(augment, dict) or augment.get("preset") is None:
        return raw
    spec = SCHEMA["data"]["augment"]["preset"]
    preset = check_value(augment["preset"], spec, "data.augment.preset")
    augment = {**PRESETS[preset], **augment}
    return {**raw, "data": {**data, "augment": augment}}


def resolve_loss(loss_raw) -> dict:
    if not isinstance(loss_raw, dict):
        raise UserError(
            f"loss: {fmt(loss_raw)} is not a mapping; give e.g. "
            '{"name": "semi_hard_triplet", "margin": 0.2}'
        )
    name = check_value(
        loss_raw.get("name", SCHEMA["loss"]["name"].default), SCHEMA["loss"]["name"], "loss.name"
    )
    return losses.resolve({**loss_raw, "name": name})


def _validate_section(values, spec: dict, path: str) -> dict:
    flat = {k: v for k, v in spec.items() if isinstance(v, Param)}
    sections = {k: v for k, v in spec.items() if isinstance(v, dict)}
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"{path}: {fmt(values)} is not a mapping; give keys {', '.join(spec)}")
    unknown = [k for k in values if k not in spec]
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise UserError(
            f"{where}: unknown key; allowed keys are {', '.join(spec)}"
            + did_you_mean(unknown[0], list(spec))
        )
    out = validate({k: v for k, v in values.items() if k in flat}, flat, path)
    for key, sub in sections.items():
        out[key] = _validate_section(values.get(key), sub, f"{path}.{key}" if path else key)
    return {k: out[k] for k in spec}  # schema order


def _check_cross_keys(config: dict) -> None:
    data, model, train = config["data"], config["model"], config["train"]
    size = min(data["image_size"])
    smallest = nets.min_image_size(model["backbone"])
    if size < smallest:
        raise UserError(
            f"data.image_size: {data['image_size']} is too small for "
            f"{model['backbone']}; give at least {smallest} px a side"
        )
    resize = data["resize"]
    if resize is not None and any(r < i for r, i in zip(resize, data["image_size"])):
        raise UserError(
            f"data.resize: {resize} is smaller than data.image_size "
            f"{data['image_size']}; the crop must fit inside the resized image"
        )
    index = config["index"]
    if index["backend"] == "lancedb" and index["type"] not in LANCE_INDEX_TYPES:
        raise UserError(
            f"index.type: {index['type']!r} is not a LanceDB index (index.backend lancedb); "
            f"use one of {', '.join(LANCE_INDEX_TYPES)}"
        )
    nets.check_model_options(model, train["optimizer"]["layer_decay"])
    losses.check_batch(config["loss"], train["batch"]["P"], train["batch"]["K"])
    train["ema"] = ema_settings(train["ema"])
    losses.check_memory(config["loss"], train["memory"], train["batch"]["P"], train["batch"]["K"])
    _check_text_tower(config)
    protocol = config["eval"]["protocol"]
    # Under data.format auto the root may turn out to be In-shop, whose partition file gives the
    # lists; retrieval.sets refuses a root without them when the sets are needed.
    if (
        protocol == "query_gallery"
        and data["format"] not in ("auto", "inshop")
        and not (config["eval"]["query_list"] and config["eval"]["gallery_list"])
    ):
        raise UserError(
            "eval.protocol: query_gallery needs eval.query_list and "
            "eval.gallery_list (CSV lists of label,path)"
        )


def _check_text_tower(config: dict) -> None:
    """A text tower and an image-text loss go together; the scratch tower's shape is sound."""
    text, loss = config["model"]["text"], config["loss"]
    kind = nets.text_tower_kind(text["tower"])
    if losses.is_image_text(loss) and kind == "none":
        raise UserError(
            f"loss.name: {loss['name']} trains a dual encoder (image and text towers); set "
            "model.text.tower: scratch (or hub:<preset>), or choose an image loss"
        )
    if kind != "none" and not losses.is_image_text(loss):
        raise UserError(
            f"model.text.tower: {text['tower']} needs an image-text loss to align it with the "
            f"image tower; set loss.name: clip or siglip (loss.image_loss keeps "
            f"{loss['name']} on the images), or model.text.tower: none"
        )
    if kind == "scratch":
        if nets.text_embedding_dim(config["model"]) is None:
            raise UserError(
                f"model.head: {config['model']['head']} keeps the image features as they are, "
                "but a scratch text tower projects to model.embedding_dim; give a head that "
                "projects (e.g. direct_normalize)"
            )
        if text["width"] % text["heads"]:
            raise UserError(
                f"model.text.heads: {text['heads']} does not divide model.text.width "
                f"{text['width']}; pick heads that divide it (e.g. 4 or 8)"
            )
        if text["freeze"]:
            raise UserError(
                "model.text.freeze: a scratch text tower starts from random weights and must "
                "train; set freeze: false, or use a pretrained hub:<preset> tower"
            )
    image = losses.resolve_image_loss(loss.get("image_loss")) if kind != "none" else None
    if (
        image is not None
        and losses.geometry(image) != "cosine"
        and not nets.is_normalized(config["model"]["head"])
    ):
        raise UserError(
            f"loss.image_loss: {image['name']} with metric {image.get('metric')} trains "
            f"Euclidean distances, but {loss['name']} and search compare angles; give it "
            "metric: cosine, or a normalising head (model.head: direct_normalize)"
        )


def reference() -> list[tuple[str, str, str, str]]:
    """(key, default, allowed, meaning) rows for every key, in schema order; loss keys excluded."""
    rows = []

    def walk(spec: dict, path: str):
        for key, value in spec.items():
            full = f"{path}.{key}" if path else key
            if isinstance(value, dict):
                walk(value, full)
            else:
                default = "required" if value.default is REQUIRED else _json(value.default)
                rows.append((full, default, value.describe(), value.doc))

    walk(SCHEMA, "")
    return rows


def reference_markdown() -> str:
    """The config reference table of docs/config.md (between its ``reference`` markers)."""
    lines = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for key, default, allowed, doc in reference():
        if key == "loss.name":  # the loss's own keys are documented under Losses
            allowed = "one of " + ", ".join(losses.LOSSES.names())
        lines.append(f"| `{key}` | `{default}` | {markdown_text(allowed)} | {markdown_text(doc)} |")
    return "\n".join(lines)


def markdown_text(text: str) -> str:
    """``text`` with ``<`` outside code spans written ``&lt;``, so that Markdown shows
    ``<data_dir>`` instead of taking it for an HTML tag."""
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def _json(value) -> str:
    import json

    return json.dumps(value)
