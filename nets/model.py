"""The embedding model: preprocessing, backbone and head assembled from the ``model`` section."""

from __future__ import annotations

import keras

from nets import hub
from nets.backbones import build_backbone, load_backbone_weights
from nets.catalog import BACKBONES, HEADS, PARAMS, check_model_options, is_hub
from nets.freeze import application_blocks, freeze, freeze_batchnorm
from nets.layers import AverageMaxPooling, GeneralizedMeanPooling, ImagePreprocessing
from tfcbir.params import validate


def build_embedding_model(
    params: dict,
    image_size: tuple[int, int],
    *,
    pretrained: bool = True,
    hub_backbone=None,
) -> keras.Model:
    """The embedding model named "embedding": ``(B, H, W, 3)`` 0..255 -> ``(B, D)`` float32.

    params: the ``model`` config section (``PARAMS``; keys of other layers are ignored).
    image_size: ``(height, width)`` of the input images.
    pretrained: False builds with random init and loads nothing (``params["weights"]`` is
        ignored), for when a checkpoint's weights are loaded over the model.
    hub_backbone: for ``hub:`` backbones, the keras-hub backbone already loaded by
        :func:`nets.hub.load_backbone` for ``image_size`` (so a text tower can share it); None
        loads it here.
    The backbone is a nested model named "backbone" whose layers are frozen as
    ``freeze_backbone`` and ``freeze_batchnorm`` say (:mod:`nets.freeze`); the head's layers are
    named "head_*". ``pooling`` avg keeps a registry backbone's own average pooling (the model
    of old runs, layer for layer); any other makes the backbone end at its feature map
    ``(B, h, w, C)`` and puts a layer named "pooling" between it and the head.
    Raises UserError for unknown names, image sizes the backbone can't take and weights that
    can't be had or don't fit.
    """
    params = validate({k: v for k, v in params.items() if k in PARAMS}, PARAMS, "model")
    check_model_options(params)
    name = params["backbone"]
    height, width = (int(side) for side in image_size)
    head = HEADS.get(params["head"], "model.head")
    weights = params["weights"] if pretrained else "none"
    if is_hub(name):
        backbone, preprocessing = _hub_backbone(
            name, (height, width), weights, params, hub_backbone
        )
    else:
        backbone = build_backbone(name, (height, width), weights)
        if params["pooling"] != "avg":
            backbone = without_pooling(backbone)
        stem, blocks = application_blocks(backbone, BACKBONES.get(name).meta["blocks"])
        freeze(backbone, params["freeze_backbone"], stem, blocks, name)
        if params["freeze_batchnorm"]:
            freeze_batchnorm(backbone)
        preprocessing = {"mode": BACKBONES.get(name).meta["preprocess"]}

    # float32 input: uint8 pixels fed to the model are converted, float ones kept as they are.
    images = keras.Input(shape=(height, width, 3), name="images")
    x = ImagePreprocessing(**preprocessing, name="preprocess")(images)
    features = backbone(x)
    if params["pooling"] != "avg":
        features = pooling_layer(params["pooling"])(features)
    embeddings = head.builder(features, params["embedding_dim"], params["head_dropout"])
    return keras.Model(images, embeddings, name="embedding")


def _hub_backbone(name, image_size, weights, params, hub_backbone):
    """The image tower of ``hub:<preset>`` with ``weights`` and freezing applied, and its
    ImagePreprocessing arguments."""
    if hub_backbone is None:
        pretrained = weights in ("imagenet", "pretrained")
        hub_backbone = hub.load_backbone(name, load_weights=pretrained, image_size=image_size)
    elif hub.native_image_size(hub_backbone) != tuple(image_size):
        hub.check_image_size(hub_backbone, image_size, name)
        raise ValueError(
            f"{name} was loaded for {hub.native_image_size(hub_backbone)} images, not "
            f"{image_size}: load it with nets.hub.load_backbone(..., image_size=image_size)"
        )
    tower = hub.image_tower(hub_backbone)
    if weights not in ("imagenet", "pretrained", "none"):
        load_backbone_weights(tower.model, name, weights)
    freeze(tower.model, params["freeze_backbone"], tower.stem, tower.blocks, name)
    return tower.model, hub.preprocessing(name)


def without_pooling(backbone: keras.Model) -> keras.Model:
    """``backbone`` ending at its feature map ``(B, h, w, C)``: the same layers (and weights)
    without its last layer, the global average pooling every registry backbone ends with."""
    last = backbone.layers[-1]
    if not isinstance(last, keras.layers.GlobalAveragePooling2D):
        raise ValueError(f"backbone ends with {type(last).__name__}, not a global average pooling")
    return keras.Model(backbone.inputs, last.input, name=backbone.name)


def pooling_layer(kind: str) -> keras.Layer:
    """The layer named "pooling" of ``model.pooling`` ``kind`` (not avg, which is the
    backbone's own): ``(B, h, w, C)`` -> ``(B, C)``."""
    if kind == "max":
        return keras.layers.GlobalMaxPooling2D(name="pooling")
    if kind == "avgmax":
        return AverageMaxPooling(name="pooling")
    if kind == "gem":
        return GeneralizedMeanPooling(p=3.0, eps=1e-6, name="pooling")
    raise ValueError(f"unknown pooling {kind!r}")
