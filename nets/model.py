"""The embedding model: preprocessing, backbone and head assembled from the ``model`` section."""

from __future__ import annotations

import keras

from nets.backbones import build_backbone
from nets.catalog import BACKBONES, HEADS, PARAMS
from nets.layers import ImagePreprocessing
from tfcbir.params import validate


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
    preprocess = BACKBONES.get(name, "model.backbone").meta["preprocess"]
    x = ImagePreprocessing(preprocess, name="preprocess")(images)
    features = backbone(x)
    embeddings = head.builder(features, params["embedding_dim"])
    return keras.Model(images, embeddings, name="embedding")
