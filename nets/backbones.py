"""Backbones: feature extractors from ``keras.applications`` plus a small from-scratch CNN.

Each backbone is registered in ``BACKBONES`` by a decorator on its builder
``builder(input_shape) -> keras.Model``, which returns a randomly initialised model named
"backbone" mapping preprocessed images ``(B, H, W, 3)`` to pooled features ``(B, C)``.
The entry's meta says:

- ``min_size``: the smallest image side the architecture accepts;
- ``preprocess``: the :class:`nets.layers.ImagePreprocessing` mode it expects in front of it;
- ``imagenet``: keras' ImageNet "notop" file (:class:`ImagenetFile`), or None.

Weights are loaded by :func:`build_backbone`, the same way for every source: "imagenet" downloads
keras' own file (same name, url and cache folder as ``keras.applications(weights="imagenet")``)
and then loads it exactly like a user's local path. So "imagenet" and "the path of that file,
downloaded elsewhere" give the same model, and the architecture never depends on the weights
source (a checkpoint made from an ImageNet start loads into a ``pretrained=False`` build).
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import keras
import numpy as np

from tfcbir import UserError
from tfcbir.registry import Registry

BACKBONES = Registry("backbone")

_KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
WEIGHT_SUFFIXES = (".weights.h5", ".h5", ".hdf5", ".keras")  # what Model.load_weights reads


class ImagenetFile(NamedTuple):
    """keras' ImageNet weights for a backbone without its classifier ("notop")."""

    file_name: str  # also its name in keras' cache, ~/.keras/models/
    url: str
    md5: str | None  # None where keras checks no hash either


def _keras_application(application, input_shape) -> keras.Model:
    """A keras.applications model without its classifier, average-pooled: ``(B, C)`` features."""
    return application(
        include_top=False,
        weights=None,
        input_shape=tuple(input_shape),
        pooling="avg",
        name="backbone",
    )


@BACKBONES.register(
    "resnet_v1_50",
    min_size=32,
    preprocess="caffe",
    imagenet=ImagenetFile(
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _KERAS_URL + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "4d473c1dd8becc155b73f8504c6f6626",
    ),
)
def resnet_v1_50(input_shape):
    """ResNet50 (v1), 2048 features; caffe preprocessing."""
    return _keras_application(keras.applications.ResNet50, input_shape)


@BACKBONES.register(
    "resnet_v1_101",
    min_size=32,
    preprocess="caffe",
    imagenet=ImagenetFile(
        "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _KERAS_URL + "resnet/resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "88cf7a10940856eca736dc7b7e228a21",
    ),
)
def resnet_v1_101(input_shape):
    """ResNet101 (v1), 2048 features; caffe preprocessing."""
    return _keras_application(keras.applications.ResNet101, input_shape)


@BACKBONES.register(
    "resnet_v2_50",
    min_size=32,
    preprocess="tf",
    imagenet=ImagenetFile(
        "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _KERAS_URL + "resnet/resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "fac2f116257151a9d068a22e544a4917",
    ),
)
def resnet_v2_50(input_shape):
    """ResNet50V2 (pre-activation), 2048 features; inputs in [-1, 1]."""
    return _keras_application(keras.applications.ResNet50V2, input_shape)


# keras picks the file trained at the input size for square 96..192 px inputs; the 224 px file is
# its default and works at any size, so we always use it.
@BACKBONES.register(
    "mobilenet_v2",
    min_size=32,
    preprocess="tf",
    imagenet=ImagenetFile(
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
        _KERAS_URL
        + "mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
        None,
    ),
)
def mobilenet_v2(input_shape):
    """MobileNetV2 (alpha 1.0), 1280 features; inputs in [-1, 1]."""
    return _keras_application(keras.applications.MobileNetV2, input_shape)


def _efficientnet_fix_variance(backbone: keras.Model) -> None:
    """Turn the std that keras' EfficientNet ImageNet files store as variance into a variance.

    The files' stem Normalization layer holds the ImageNet std [0.229, 0.224, 0.225] as its
    variance (tensorflow/tensorflow#49930). keras compensates with an extra Rescaling layer that
    it adds only when built with ``weights="imagenet"``, so its architecture depends on the
    weights source. We always build without that layer and square the variance instead:
    (x - mean) / sqrt(std**2) = (x - mean) / std, as keras' imagenet model computes. Weights saved
    from our own models already hold std**2, so they are left alone.
    """
    norm = next(layer for layer in backbone.layers if isinstance(layer, keras.layers.Normalization))
    variance = keras.ops.convert_to_numpy(norm.adapt_variance)
    if np.allclose(variance, [0.229, 0.224, 0.225], rtol=0, atol=1e-6):
        norm.adapt_variance.assign(np.square(variance))
        norm.finalize_state()  # the layer keeps a cached copy of mean and variance


@BACKBONES.register(
    "efficientnet_b0",
    min_size=32,
    preprocess="raw",
    imagenet=ImagenetFile(
        "efficientnetb0_notop.h5",
        "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
        "50bc09e76180e00e4465e1a485ddc09d",
    ),
    after_load=_efficientnet_fix_variance,
)
def efficientnet_b0(input_shape):
    """EfficientNetB0, 1280 features; takes 0..255 pixels (it rescales and normalises inside)."""
    return _keras_application(keras.applications.EfficientNetB0, input_shape)


@BACKBONES.register(
    "densenet169",
    min_size=32,
    preprocess="torch",
    imagenet=ImagenetFile(
        "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _KERAS_URL + "densenet/densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "b8c4d4c20dd625c148057b9ff1c1176b",
    ),
)
def densenet169(input_shape):
    """DenseNet169, 1664 features; torch preprocessing (x / 255, ImageNet mean/std)."""
    return _keras_application(keras.applications.DenseNet169, input_shape)


@BACKBONES.register("small_cnn", min_size=8, preprocess="per_image", imagenet=None)
def small_cnn(input_shape):
    """A 4-block CNN (32-64-128-128 channels), 128 features; trains on a CPU in minutes."""
    inputs = keras.Input(shape=tuple(input_shape))
    x = inputs
    for block, filters in enumerate((32, 64, 128, 128), start=1):
        # No conv bias: the BatchNorm right after has its own offset.
        x = keras.layers.Conv2D(
            filters, 3, padding="same", use_bias=False, name=f"block{block}_conv"
        )(x)
        # momentum 0.9: short CPU runs must get usable moving statistics within ~100 steps
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"block{block}_bn")(x)
        x = keras.layers.ReLU(name=f"block{block}_relu")(x)
        if block < 4:  # three halvings: an 8 px input ends at 1 x 1
            x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, x, name="backbone")


def build_backbone(name: str, image_size: tuple[int, int], weights: str) -> keras.Model:
    """The backbone ``name`` for ``(height, width)`` images, with ``weights`` loaded.

    ``weights``: "imagenet", "none" (random init) or the path of a weights file (.h5 as keras
    publishes them, or .weights.h5 as ``backbone.save_weights`` writes them).
    Returns a model named "backbone": preprocessed ``(B, H, W, 3)`` -> ``(B, C)`` features.
    """
    entry = BACKBONES.get(name, "model.backbone")
    height, width = image_size
    smallest = entry.meta["min_size"]
    if min(height, width) < smallest:
        raise UserError(
            f"model.backbone: {name} needs images of at least {smallest} px a side, "
            f"got {height}x{width}; use larger images or another backbone"
        )
    # Download before building: a failed download then costs no build time.
    path = _download_imagenet(name) if weights == "imagenet" else weights
    backbone = entry.builder((height, width, 3))
    if path != "none":
        load_backbone_weights(backbone, name, path)
    return backbone


def imagenet_file(name: str) -> ImagenetFile | None:
    """keras' ImageNet file for backbone ``name``; None if it has none."""
    return BACKBONES.get(name, "model.backbone").meta["imagenet"]


def _download_imagenet(name: str) -> str:
    """The local path of backbone ``name``'s ImageNet file, downloaded into keras' cache if needed."""
    imagenet = imagenet_file(name)
    if imagenet is None:
        raise UserError(
            f'model.weights: {name} has no ImageNet weights; use "none" or the '
            f"path of a weights file saved from a {name} backbone"
        )
    file_name, url, md5 = imagenet
    try:
        # keras.utils.get_file raises a bare Exception for network errors.
        return keras.utils.get_file(file_name, url, cache_subdir="models", file_hash=md5)
    except Exception as error:
        raise UserError(
            f"model.weights: could not download ImageNet weights for {name} "
            f"({_one_line(error)}); download {file_name} ({url}) elsewhere and set "
            f'model.weights to its path, or use "none"'
        ) from error


def load_backbone_weights(backbone: keras.Model, name: str, path: str) -> None:
    """Load a weights file into a backbone built by ``BACKBONES[name]``; UserError if it won't fit."""
    path = os.path.expanduser(path)
    if not path.endswith(WEIGHT_SUFFIXES):
        raise UserError(
            f'model.weights: {path!r} is not "imagenet", "none" or a weights '
            f"file ({', '.join(WEIGHT_SUFFIXES)}) for backbone {name}"
        )
    if not os.path.isfile(path):
        raise UserError(
            f"model.weights: weights file {path!r} for backbone {name} not found; "
            f'give an existing file, "imagenet" or "none"'
        )
    # A file for another architecture makes keras warn once per unmatched layer before it raises;
    # keep those for a successful load only, where they may tell of a partial match.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            backbone.load_weights(path)
            failed = None
        except (ValueError, KeyError, OSError) as error:  # layer/shape mismatch, not HDF5
            failed = error
    if failed is not None:
        raise UserError(
            f"model.weights: {path!r} does not fit backbone {name} "
            f"({_one_line(failed)}); give weights saved from a {name} backbone, "
            f'"imagenet" or "none"'
        ) from failed
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    after_load = BACKBONES.get(name).meta.get("after_load")
    if after_load is not None:
        after_load(backbone)


def _one_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, shortened, for a one-line UserError."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
