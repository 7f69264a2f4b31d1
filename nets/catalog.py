"""The model registries: backbones and heads, their facts and the ``model`` section's keys.

Plain data, importable without TensorFlow (the config is validated against it); each entry names
its builder as ``"nets.<module>:<function>"``, imported when a model is built. A backbone's facts:

- ``min_size``: the smallest image side the architecture accepts;
- ``preprocess``: the :data:`PREPROCESS_MODES` key of the pixel preprocessing it expects;
- ``imagenet``: keras' ImageNet "notop" file (:class:`ImagenetFile`), or None;
- ``blocks``: a regular expression whose group 1, matched against the backbone's layer names,
  gives the block (stage) a layer belongs to; ``model.freeze_backbone: n`` trains the last n;
- ``after_load`` (optional): a ``"module:function"`` fixing a backbone after weights are loaded.

Besides the registered names, ``model.backbone`` takes ``hub:<preset>``: a keras-hub preset's
image tower (:mod:`nets.hub`), named (``hub:clip_vit_base_patch32``), by handle
(``hub:hf://...``) or by a local preset directory (``hub:/models/clip_b32``).

A head's facts: ``normalized``, whether its embeddings have unit L2 norm; ``keeps_features``
(optional), whether it passes the pooled features through (no layer to train: a CLIP preset's
towers then stay in their joint space, and a text tower keeps the preset's own projection).
"""

from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

from tfcbir import UserError
from tfcbir.params import Param, did_you_mean
from tfcbir.registry import Registry

BACKBONES = Registry("backbone")
HEADS = Registry("head")

_KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
WEIGHT_SUFFIXES = (".weights.h5", ".h5", ".hdf5", ".keras")  # what Model.load_weights reads

# What nets.layers.ImagePreprocessing does in each mode.
PREPROCESS_MODES = {
    "caffe": "RGB -> BGR, minus the ImageNet mean pixel (no scaling)",
    "tf": "scaled to [-1, 1]: x / 127.5 - 1",
    "torch": "x / 255, minus the ImageNet mean, divided by the ImageNet std (RGB)",
    "unit": "scaled to [0, 1]: x / 255",
    "raw": "unchanged 0..255 (the backbone rescales internally)",
    "per_image": "each image's channels to zero mean and unit variance (removes its colour cast)",
    "scale_offset": "x * scale + offset, per channel: a keras-hub preset's image converter",
}

HUB_PREFIX = "hub:"
# The files of a keras-hub preset directory that define its image tower (architecture and
# preprocessing); their contents are a local preset's identity.
HUB_IDENTITY_FILES = ("config.json", "image_converter.json")


class ImagenetFile(NamedTuple):
    """keras' ImageNet weights for a backbone without its classifier ("notop")."""

    file_name: str  # also its name in keras' cache, ~/.keras/models/
    url: str
    md5: str | None  # None where keras checks no hash either


BACKBONES.register(
    "resnet_v1_50",
    "nets.backbones:resnet_v1_50",
    doc="ResNet50 (v1), 2048 features; caffe preprocessing.",
    min_size=32,
    preprocess="caffe",
    blocks=r"^conv(\d+)_block",
    imagenet=ImagenetFile(
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _KERAS_URL + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "4d473c1dd8becc155b73f8504c6f6626",
    ),
)

BACKBONES.register(
    "resnet_v1_101",
    "nets.backbones:resnet_v1_101",
    doc="ResNet101 (v1), 2048 features; caffe preprocessing.",
    min_size=32,
    preprocess="caffe",
    blocks=r"^conv(\d+)_block",
    imagenet=ImagenetFile(
        "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _KERAS_URL + "resnet/resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "88cf7a10940856eca736dc7b7e228a21",
    ),
)

BACKBONES.register(
    "resnet_v2_50",
    "nets.backbones:resnet_v2_50",
    doc="ResNet50V2 (pre-activation), 2048 features; inputs in [-1, 1].",
    min_size=32,
    preprocess="tf",
    blocks=r"^conv(\d+)_block",
    imagenet=ImagenetFile(
        "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _KERAS_URL + "resnet/resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "fac2f116257151a9d068a22e544a4917",
    ),
)

# keras picks the file trained at the input size for square 96..192 px inputs; the 224 px file is
# its default and works at any size, so we always use it.
BACKBONES.register(
    "mobilenet_v2",
    "nets.backbones:mobilenet_v2",
    doc="MobileNetV2 (alpha 1.0), 1280 features; inputs in [-1, 1].",
    min_size=32,
    preprocess="tf",
    blocks=r"^block_(\d+)_",
    imagenet=ImagenetFile(
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
        _KERAS_URL
        + "mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
        None,
    ),
)

BACKBONES.register(
    "efficientnet_b0",
    "nets.backbones:efficientnet_b0",
    doc="EfficientNetB0, 1280 features; takes 0..255 pixels (it rescales and normalises inside).",
    min_size=32,
    preprocess="raw",
    blocks=r"^block(\d+)[a-z]_",
    imagenet=ImagenetFile(
        "efficientnetb0_notop.h5",
        "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
        "50bc09e76180e00e4465e1a485ddc09d",
    ),
    after_load="nets.backbones:_efficientnet_fix_variance",
)

BACKBONES.register(
    "densenet169",
    "nets.backbones:densenet169",
    doc="DenseNet169, 1664 features; torch preprocessing (x / 255, ImageNet mean/std).",
    min_size=32,
    preprocess="torch",
    blocks=r"^(?:conv|pool)([2-9])_",
    imagenet=ImagenetFile(
        "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _KERAS_URL + "densenet/densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "b8c4d4c20dd625c148057b9ff1c1176b",
    ),
)

BACKBONES.register(
    "small_cnn",
    "nets.backbones:small_cnn",
    doc="A 4-block CNN (32-64-128-128 channels), 128 features; trains on a CPU in minutes.",
    min_size=8,
    preprocess="per_image",
    blocks=r"^block(\d+)_",
    imagenet=None,
)

BACKBONES.register(
    "small_cnn_rgb",
    "nets.backbones:small_cnn",
    doc="small_cnn on the colours as they are (inputs in [-1, 1]): for queries that name "
    "colours, such as the text demo's.",
    min_size=8,
    preprocess="tf",
    blocks=r"^block(\d+)_",
    imagenet=None,
)


HEADS.register(
    "identity",
    "nets.heads:identity",
    doc="The pooled features themselves (embedding_dim is ignored), e.g. a CLIP preset's "
    "image embedding.",
    normalized=False,
    keeps_features=True,
)
HEADS.register(
    "identity_normalize",
    "nets.heads:identity_normalize",
    doc="The pooled features, L2-normalised (embedding_dim is ignored): zero-shot CLIP/SigLIP "
    "search.",
    normalized=True,
    keeps_features=True,
)
HEADS.register(
    "direct",
    "nets.heads:direct",
    doc="Dense(embedding_dim): a linear projection of the pooled features.",
    normalized=False,
)
HEADS.register(
    "direct_normalize",
    "nets.heads:direct_normalize",
    doc="Dense(embedding_dim), then L2 normalisation.",
    normalized=True,
)
HEADS.register(
    "fc1024",
    "nets.heads:fc1024",
    doc="Dense(1024) + ReLU, then Dense(embedding_dim).",
    normalized=False,
)
HEADS.register(
    "fc1024_normalize",
    "nets.heads:fc1024_normalize",
    doc="Dense(1024) + ReLU, then Dense(embedding_dim), then L2 normalisation.",
    normalized=True,
)


HEADS.register(
    "projection",
    "nets.heads:projection",
    doc="CLIP fine-tuning's projection head: p = Dense(embedding_dim)(x); "
    "LayerNorm(p + Dropout(Dense(embedding_dim)(GELU(p)))).",
    normalized=False,
)
HEADS.register(
    "projection_normalize",
    "nets.heads:projection_normalize",
    doc="The projection head, then L2 normalisation.",
    normalized=True,
)


def is_hub(backbone: str) -> bool:
    """Whether ``backbone`` names a keras-hub preset (``hub:<preset>``)."""
    return backbone.startswith(HUB_PREFIX)


def hub_preset(backbone: str) -> str:
    """The preset of ``hub:<preset>``: a keras-hub preset name, a handle or a directory."""
    return backbone[len(HUB_PREFIX) :]


def hub_directory(preset: str) -> str | None:
    """The local directory a preset names (``~`` expanded), or None for a name or a handle.

    A preset is a directory when one exists at that path, or when it is written as a path
    (it contains a ``/`` or starts with ``.`` or ``~``) and is not a ``scheme://`` handle.
    """
    if "://" in preset:
        return None
    path = os.path.expanduser(preset)
    if os.path.isdir(path) or "/" in preset or os.sep in preset or preset.startswith((".", "~")):
        return path
    return None


def backbone_identity(backbone: str, key: str = "model.backbone") -> str:
    """What identifies ``backbone``'s architecture and preprocessing, for a model's hash.

    A registered name or a keras-hub preset name is its own identity; a local preset directory
    is identified by the contents of its config and image-converter files (so moving or
    copying the folder keeps galleries valid, and another preset saved under the same path
    does not). UserError if such a directory is missing (naming ``key``; a text tower's preset
    is identified alike, ``key="model.text.tower"``).
    """
    if not is_hub(backbone):
        return backbone
    folder = hub_directory(hub_preset(backbone))
    if folder is None:
        return backbone
    if not os.path.isdir(folder):
        raise UserError(missing_preset_message(backbone, key))
    digest = hashlib.sha256()
    for name in HUB_IDENTITY_FILES:
        path = os.path.join(folder, name)
        digest.update(name.encode() + b"\0")
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                digest.update(handle.read())
        digest.update(b"\0")
    return f"{HUB_PREFIX}preset-dir-{digest.hexdigest()[:16]}"


def missing_preset_message(backbone: str, key: str = "model.backbone") -> str:
    return (
        f"{key}: {backbone}: no such preset directory; save the preset with keras-hub "
        "on a machine with internet and copy the folder here (docs/models.md: Foundation backbones)"
    )


def _check_backbone(value: str) -> str | None:
    if value in BACKBONES or (is_hub(value) and hub_preset(value).strip()):
        return None
    return (
        f"is not one of {', '.join(BACKBONES.names())}, or hub:<keras-hub preset or "
        "preset directory>" + did_you_mean(value, BACKBONES.names())
    )


def _check_weights(value: str) -> str | None:
    if value in ("imagenet", "pretrained", "none") or value.endswith(WEIGHT_SUFFIXES):
        return None
    return (
        'is not "imagenet", "pretrained", "none" or the path of a weights file '
        f"({', '.join(WEIGHT_SUFFIXES)})"
    )


# model.pooling: what each does to a (B, H, W, C) feature map (nets.model.pooling_layer).
POOLINGS = {
    "avg": "global average (the backbone's own pooling layer)",
    "max": "global max",
    "avgmax": "global average + global max, summed",
    "gem": "generalised mean (mean of x^p)^(1/p), p learnable from 3 (Radenovic et al. 2018)",
}

# The ``model`` section's keys, as nets.build_embedding_model reads them.
PARAMS = {
    "backbone": Param(
        str,
        "resnet_v1_50",
        "Feature extractor: a name of the Backbones table, or hub:<preset>, a keras-hub "
        "preset's image tower (e.g. hub:clip_vit_base_patch32, hub:dinov2_small, or a local "
        "preset directory; see Foundation backbones).",
        check=_check_backbone,
        allowed_text=lambda: "one of " + ", ".join(BACKBONES.names()) + ", or hub:<preset>",
    ),
    "weights": Param(
        str,
        "imagenet",
        "imagenet or pretrained (the backbone's pretrained weights: keras' ImageNet file, or a "
        "hub: preset's own), none (random init) or the path of a local weights file for the "
        "backbone.",
        check=_check_weights,
    ),
    "freeze_backbone": Param(
        (bool, int),
        False,
        "false: the backbone trains; true: frozen (only the head trains); n: only its last n "
        "blocks (transformer blocks, CNN stages) and the layers after them train. Frozen "
        "BatchNorm layers keep their moving statistics (inference mode).",
        min=1,
    ),
    "pooling": Param(
        str,
        "avg",
        "How a registry backbone's feature map becomes features: avg (global average), max, "
        "avgmax (average + max, summed), gem (generalised mean, learnable p from 3). hub: "
        "towers pool their own way (class token, attention pooling): avg only.",
        choices=tuple(POOLINGS),
    ),
    "freeze_batchnorm": Param(
        bool,
        False,
        "Registry backbones: every BatchNormalization layer runs in inference mode with its "
        "scale and offset fixed (moving statistics and affine frozen, as metric-learning "
        "papers fine-tune ResNets).",
    ),
    "head": Param(
        str, "direct_normalize", "Embedding head on the pooled features.", choices=HEADS.names
    ),
    "embedding_dim": Param(int, 128, "Embedding dimension.", min=1, max=65536),
    "head_dropout": Param(
        float,
        0.0,
        "Dropout rate in the head when training: before its last Dense layer (identity heads: "
        "on the features).",
        min=0,
        max=1,
        max_exclusive=True,
    ),
}

# Model keys that change how a model trains, not what a trained model computes: left out of
# the model's identity (config.model_hash).
TRAINING_ONLY_PARAMS = ("weights", "freeze_backbone", "freeze_batchnorm", "head_dropout")
# Model keys added after galleries were first embedded: left out of the model's identity at their
# default, so those galleries (made by the same model) stay valid.
IDENTITY_DEFAULTS = {"pooling": "avg"}


def check_model_options(model: dict, layer_decay: float | None = None) -> None:
    """UserError (one line) for options the ``model`` section's backbone cannot take: a hub:
    tower pools its own way and has no BatchNorm; layer-wise learning-rate decay
    (``train.optimizer.layer_decay``) needs transformer blocks, which only hub: towers have."""
    backbone = model["backbone"]
    if is_hub(backbone):
        if model.get("pooling", "avg") != "avg":
            raise UserError(
                f"model.pooling: {model['pooling']}, but {backbone} pools its own way (class "
                "token, attention pooling); leave model.pooling at avg for hub: backbones"
            )
        if model.get("freeze_batchnorm", False):
            raise UserError(
                f"model.freeze_batchnorm: {backbone} has no BatchNormalization layers (a "
                "transformer's norms are LayerNorms); set it false for hub: backbones"
            )
    elif layer_decay is not None and layer_decay != 1.0:
        raise UserError(
            f"train.optimizer.layer_decay: {backbone} has no transformer blocks to decay; "
            "layer decay is for hub: towers (ViT, DINOv2, CLIP, ...): set it to null"
        )


def imagenet_file(name: str) -> ImagenetFile | None:
    """keras' ImageNet file for backbone ``name``; None if it has none (and for hub: presets,
    whose weights come with the preset)."""
    if is_hub(name):
        return None
    return BACKBONES.get(name, "model.backbone").meta["imagenet"]


# --- the text tower (dual encoders) --------------------------------------------------------------

TEXT_TOWERS = ("none", "scratch")  # and "hub:<preset>"
SCRATCH_MAX_LENGTH = 32


def _check_tower(value: str) -> str | None:
    if value in TEXT_TOWERS or (is_hub(value) and hub_preset(value).strip()):
        return None
    return (
        "is not none, scratch or hub:<preset> (a keras-hub CLIP or SigLIP preset's name, or "
        "the path of a local preset folder)"
    )


# The ``model.text`` section's keys, as nets.text_tower reads them.
TEXT_PARAMS = {
    "tower": Param(
        str,
        "none",
        "Text tower beside the image tower, for text queries: none; scratch (a small "
        "transformer trained from scratch, with a word tokenizer built from the training "
        "captions); hub:<preset> (a keras-hub CLIP or SigLIP preset's text encoder and "
        "tokenizer, by name or local folder). Needs an image-text loss (clip, siglip).",
        check=_check_tower,
    ),
    "width": Param(int, 256, "scratch: width of the token embeddings and blocks.", min=8),
    "layers": Param(int, 2, "scratch: transformer blocks.", min=1, max=48),
    "heads": Param(int, 4, "scratch: attention heads (they must divide width).", min=1),
    "max_length": Param(
        int,
        None,
        f"Tokens per caption, start and end included (longer captions are cut); null: "
        f"{SCRATCH_MAX_LENGTH} for scratch, the preset's own for hub.",
        min=3,
        max=1024,
        nullable=True,
    ),
    "vocab_size": Param(
        int,
        10000,
        "scratch: the vocabulary holds at most this many tokens: 4 special ones and the most "
        "frequent words of the training captions.",
        min=8,
    ),
    "freeze": Param(
        bool,
        False,
        "Keep a hub: text tower's pretrained weights fixed while training (a new Dense layer "
        "to embedding_dim, if any, still trains).",
    ),
}


def text_tower_kind(tower: str) -> str:
    """none, scratch or hub."""
    return "hub" if is_hub(tower) else tower


PRETRAINED_WEIGHTS = ("imagenet", "pretrained")  # model.weights: the preset's own (hub:)


def pretrained_model(model: dict) -> bool:
    """Whether the ``model`` section describes a model complete without training (zero-shot): a
    ``hub:`` image tower with its preset's weights, a head without weights (``keeps_features``)
    and, if there is a text tower, the same preset's (so with no new layer either)."""
    if not is_hub(model["backbone"]) or model["weights"] not in PRETRAINED_WEIGHTS:
        return False
    if not HEADS.get(model["head"], "model.head").meta.get("keeps_features", False):
        return False
    tower = model.get("text", {}).get("tower", "none")
    return tower == "none" or same_preset(tower, model["backbone"])


def same_preset(first: str, second: str) -> bool:
    """Whether two ``hub:`` names denote the same preset (the same name, or folders of the same
    identity, :func:`backbone_identity`)."""
    if not (is_hub(first) and is_hub(second)):
        return False
    if hub_preset(first).strip() == hub_preset(second).strip():
        return True
    try:
        return backbone_identity(first) == backbone_identity(second)
    except UserError:
        return False
