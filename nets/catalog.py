"""The model registries: backbones and heads, their facts and the ``model`` section's keys.

Plain data, importable without TensorFlow (the config is validated against it); each entry names
its builder as ``"nets.<module>:<function>"``, imported when a model is built. A backbone's facts:

- ``min_size``: the smallest image side the architecture accepts;
- ``preprocess``: the :data:`PREPROCESS_MODES` key of the pixel preprocessing it expects;
- ``imagenet``: keras' ImageNet "notop" file (:class:`ImagenetFile`), or None;
- ``after_load`` (optional): a ``"module:function"`` fixing a backbone after weights are loaded.

A head's fact: ``normalized``, whether its embeddings have unit L2 norm.
"""

from __future__ import annotations

from typing import NamedTuple

from tfcbir.params import Param
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
}


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
    imagenet=None,
)

BACKBONES.register(
    "small_cnn_rgb",
    "nets.backbones:small_cnn",
    doc="small_cnn on the colours as they are (inputs in [-1, 1]): for queries that name "
    "colours, such as the text demo's.",
    min_size=8,
    preprocess="tf",
    imagenet=None,
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


def _check_weights(value: str) -> str | None:
    if value in ("imagenet", "none") or value.endswith(WEIGHT_SUFFIXES):
        return None
    return f'is not "imagenet", "none" or the path of a weights file ({", ".join(WEIGHT_SUFFIXES)})'


# The ``model`` section's keys, as nets.build_embedding_model reads them.
PARAMS = {
    "backbone": Param(str, "resnet_v1_50", "Feature extractor.", choices=BACKBONES.names),
    "weights": Param(
        str,
        "imagenet",
        "imagenet, none (random init) or the path of a local weights file for the backbone.",
        check=_check_weights,
    ),
    "head": Param(
        str, "direct_normalize", "Embedding head on the pooled features.", choices=HEADS.names
    ),
    "embedding_dim": Param(int, 128, "Embedding dimension.", min=1, max=65536),
}


def imagenet_file(name: str) -> ImagenetFile | None:
    """keras' ImageNet file for backbone ``name``; None if it has none."""
    return BACKBONES.get(name, "model.backbone").meta["imagenet"]


# --- the text tower (dual encoders) --------------------------------------------------------------

TEXT_TOWERS = ("none", "scratch")  # and "hub:<preset>"
HUB_PREFIX = "hub:"
SCRATCH_MAX_LENGTH = 32


def _check_tower(value: str) -> str | None:
    if value in TEXT_TOWERS or (value.startswith(HUB_PREFIX) and value[len(HUB_PREFIX) :].strip()):
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
    return "hub" if tower.startswith(HUB_PREFIX) else tower


def hub_preset(tower: str) -> str:
    """The preset of a ``hub:<preset>`` tower (a name or a local folder)."""
    return tower[len(HUB_PREFIX) :].strip()
