"""The embedding model: pixels ``(B, H, W, 3)`` in 0..255 -> embeddings ``(B, D)`` float32.

``build_embedding_model`` assembles three parts from the ``model`` config section:

    images -> ImagePreprocessing (the backbone's own, see nets.layers)
           -> backbone (a nested keras.Model named "backbone", from BACKBONES, or a keras-hub
              preset's image tower for "hub:<preset>", see nets.hub)
           -> pooling (model.pooling other than avg: a layer named "pooling" on the backbone's
              feature map; avg is the backbone's own, as before)
           -> head (from HEADS) -> embeddings

so code that embeds or queries just feeds pixels. ``nets`` knows nothing of files or configs
beyond its own parameters (``PARAMS``); the registries' names are the allowed values.

Importing this package costs no TensorFlow: the registries and the facts the config checks are
plain data (:mod:`nets.catalog`); the builders and layers are imported on first use.
"""

from __future__ import annotations

import importlib

from nets.catalog import (
    BACKBONES,
    HEADS,
    HUB_PREFIX,
    IDENTITY_DEFAULTS,
    PARAMS,
    POOLINGS,
    PREPROCESS_MODES,
    TEXT_PARAMS,
    TRAINING_ONLY_PARAMS,
    WEIGHT_SUFFIXES,
    backbone_identity,
    check_model_options,
    hub_preset,
    imagenet_file,
    is_hub,
    pretrained_model,
    same_preset,
    text_tower_kind,
)

__all__ = [
    "AverageMaxPooling",
    "BACKBONES",
    "ClassToken",
    "GeneralizedMeanPooling",
    "HEADS",
    "HUB_PREFIX",
    "IDENTITY_DEFAULTS",
    "PARAMS",
    "POOLINGS",
    "PREPROCESS_MODES",
    "TEXT_PARAMS",
    "TRAINING_ONLY_PARAMS",
    "WEIGHT_SUFFIXES",
    "ImagePreprocessing",
    "L2Normalize",
    "TextTower",
    "backbone_identity",
    "backbone_names",
    "build_backbone",
    "build_embedding_model",
    "build_text_tower",
    "check_model_options",
    "head_names",
    "hub_preset",
    "imagenet_file",
    "is_hub",
    "is_normalized",
    "pretrained_model",
    "same_preset",
    "shared_hub_backbone",
    "load_backbone_weights",
    "min_image_size",
    "preprocess_mode",
    "text_embedding_dim",
    "text_tower_kind",
]

# Names that need TensorFlow, and the module each comes from (imported on first use).
_LAZY = {
    "build_embedding_model": "nets.model",
    "build_backbone": "nets.backbones",
    "load_backbone_weights": "nets.backbones",
    "ImagePreprocessing": "nets.layers",
    "L2Normalize": "nets.layers",
    "ClassToken": "nets.layers",
    "GeneralizedMeanPooling": "nets.layers",
    "AverageMaxPooling": "nets.layers",
    "build_text_tower": "nets.text",
    "shared_hub_backbone": "nets.text",
    "TextTower": "nets.text",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nets' has no attribute {name!r}")


def backbone_names() -> list[str]:
    return BACKBONES.names()


def head_names() -> list[str]:
    return HEADS.names()


# The smallest image side the config accepts for a hub: preset; the preset's own size is checked
# when the model is built (it needs the preset's config).
_HUB_MIN_SIZE = 16


def min_image_size(backbone: str) -> int:
    """The smallest image side (px) that ``backbone`` accepts (hub: presets: checked when built,
    against the preset's image size)."""
    if is_hub(backbone):
        return _HUB_MIN_SIZE
    return BACKBONES.get(backbone, "model.backbone").meta["min_size"]


def preprocess_mode(backbone: str) -> str:
    """The :data:`PREPROCESS_MODES` key of ``backbone``'s preprocessing (hub: presets:
    ``scale_offset`` with the preset's image-converter values)."""
    if is_hub(backbone):
        return "scale_offset"
    return BACKBONES.get(backbone, "model.backbone").meta["preprocess"]


def text_embedding_dim(model: dict) -> int | None:
    """The dimension a text tower projects to, for the ``model`` section ``model``: its
    ``embedding_dim``, or None (a hub tower's own projection) when the head passes the image
    features through unchanged (a head with the ``keeps_features`` fact)."""
    if HEADS.get(model["head"], "model.head").meta.get("keeps_features", False):
        return None
    return model["embedding_dim"]


def is_normalized(head: str) -> bool:
    """Whether ``head``'s embeddings have unit L2 norm."""
    return HEADS.get(head, "model.head").meta["normalized"]
