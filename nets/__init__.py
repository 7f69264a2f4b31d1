"""The embedding model: pixels ``(B, H, W, 3)`` in 0..255 -> embeddings ``(B, D)`` float32.

``build_embedding_model`` assembles three parts from the ``model`` config section:

    images -> ImagePreprocessing (the backbone's own, see nets.layers)
           -> backbone (a nested keras.Model named "backbone", from BACKBONES)
           -> head (from HEADS) -> embeddings

so code that embeds or queries just feeds pixels. ``nets`` knows nothing of files or configs
beyond its own parameters (``PARAMS``); the registries' names are the allowed values.
"""

from __future__ import annotations

import keras

from nets.backbones import (
    BACKBONES,
    WEIGHT_SUFFIXES,
    build_backbone,
    imagenet_file,
    load_backbone_weights,
)
from nets.heads import HEADS
from nets.layers import PREPROCESS_MODES, ImagePreprocessing, L2Normalize
from tfcbir.params import Param, validate

__all__ = [
    "BACKBONES",
    "HEADS",
    "PARAMS",
    "PREPROCESS_MODES",
    "ImagePreprocessing",
    "L2Normalize",
    "backbone_names",
    "build_backbone",
    "build_embedding_model",
    "head_names",
    "imagenet_file",
    "is_normalized",
    "load_backbone_weights",
    "min_image_size",
    "preprocess_mode",
]


def _check_weights(value: str) -> str | None:
    if value in ("imagenet", "none") or value.endswith(WEIGHT_SUFFIXES):
        return None
    return f'is not "imagenet", "none" or the path of a weights file ({", ".join(WEIGHT_SUFFIXES)})'


# The ``model`` section's keys, as build_embedding_model reads them.
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


def backbone_names() -> list[str]:
    return BACKBONES.names()


def head_names() -> list[str]:
    return HEADS.names()


def min_image_size(backbone: str) -> int:
    """The smallest image side (px) that ``backbone`` accepts."""
    return BACKBONES.get(backbone, "model.backbone").meta["min_size"]


def preprocess_mode(backbone: str) -> str:
    """The :data:`PREPROCESS_MODES` key of ``backbone``'s preprocessing."""
    return BACKBONES.get(backbone, "model.backbone").meta["preprocess"]


def is_normalized(head: str) -> bool:
    """Whether ``head``'s embeddings have unit L2 norm."""
    return HEADS.get(head, "model.head").meta["normalized"]


def build_embedding_model(
    params: dict, image_size: tuple[int, int], *, pretrained: bool = True
) -> keras.Model:
    """The embedding model named "embedding": ``(B, H, W, 3)`` 0..255 -> ``(B, D)`` float32.

    params: the ``model`` config section (``PARAMS``; keys of other layers are ignored).
    image_size: ``(height, width)`` of the input images.
    pretrained: False builds with random init and loads nothing (``params["weights"]`` is
        ignored), for when a checkpoint's weights are loaded over the model.
    Raises UserError for unknown names, too small images and weights that can't be had or
    don't fit.
    """
    params = validate({k: v for k, v in params.items() if k in PARAMS}, PARAMS, "model")
    name = params["backbone"]
    height, width = (int(side) for side in image_size)
    backbone = build_backbone(name, (height, width), params["weights"] if pretrained else "none")
    head = HEADS.get(params["head"], "model.head")

    # float32 input: uint8 pixels fed to the model are converted, float ones kept as they are.
    images = keras.Input(shape=(height, width, 3), name="images")
    x = ImagePreprocessing(preprocess_mode(name), name="preprocess")(images)
    features = backbone(x)
    embeddings = head.builder(features, params["embedding_dim"])
    return keras.Model(images, embeddings, name="embedding")
