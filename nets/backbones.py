"""Backbones: feature extractors from ``keras.applications`` plus a small from-scratch CNN.

Each backbone is a builder ``builder(input_shape) -> keras.Model``, registered (with its facts:
smallest size, preprocessing, ImageNet file) in :data:`nets.catalog.BACKBONES`; it returns a
randomly initialised model named "backbone" mapping preprocessed images ``(B, H, W, 3)`` to pooled
features ``(B, C)``.

Weights are loaded by :func:`build_backbone`, the same way for every source: "imagenet" downloads
keras' own file (same name, url and cache folder as ``keras.applications(weights="imagenet")``)
and then loads it exactly like a user's local path. So "imagenet" and "the path of that file,
downloaded elsewhere" give the same model, and the architecture never depends on the weights
source (a checkpoint made from an ImageNet start loads into a ``pretrained=False`` build).
"""

from __future__ import annotations

import os
import warnings

import keras
import numpy as np

from nets.catalog import BACKBONES, WEIGHT_SUFFIXES, imagenet_file
from tfcbir import UserError
from tfcbir.registry import resolve
from tfcbir.text import one_line


def _keras_application(application, input_shape) -> keras.Model:
    """A keras.applications model without its classifier, average-pooled: ``(B, C)`` features."""
    return application(
        include_top=False,
        weights=None,
        input_shape=tuple(input_shape),
        pooling="avg",
        name="backbone",
    )


def resnet_v1_50(input_shape):
    """ResNet50 (v1), 2048 features; caffe preprocessing."""
    return _keras_application(keras.applications.ResNet50, input_shape)


def resnet_v1_101(input_shape):
    """ResNet101 (v1), 2048 features; caffe preprocessing."""
    return _keras_application(keras.applications.ResNet101, input_shape)


def resnet_v2_50(input_shape):
    """ResNet50V2 (pre-activation), 2048 features; inputs in [-1, 1]."""
    return _keras_application(keras.applications.ResNet50V2, input_shape)


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


def efficientnet_b0(input_shape):
    """EfficientNetB0, 1280 features; takes 0..255 pixels (it rescales and normalises inside)."""
    return _keras_application(keras.applications.EfficientNetB0, input_shape)


def densenet169(input_shape):
    """DenseNet169, 1664 features; torch preprocessing (x / 255, ImageNet mean/std)."""
    return _keras_application(keras.applications.DenseNet169, input_shape)


def small_cnn(input_shape):
    """A 4-block CNN (32-64-128-128 channels), 128 features; trains on a CPU in minutes (also
    the architecture of small_cnn_rgb, which differs in its preprocessing only)."""
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

    ``weights``: "imagenet" (or its synonym "pretrained"), "none" (random init) or the path of
    a weights file (.h5 as keras publishes them, or .weights.h5 as ``backbone.save_weights``
    writes them).
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
    path = _download_imagenet(name) if weights in ("imagenet", "pretrained") else weights
    backbone = entry.builder((height, width, 3))
    if path != "none":
        load_backbone_weights(backbone, name, path)
    return backbone


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
            f"({one_line(error)}); download {file_name} ({url}) elsewhere and set "
            f'model.weights to its path, or use "none"'
        ) from error


def load_backbone_weights(backbone: keras.Model, name: str, path: str) -> None:
    """Load a weights file into a backbone built for ``name`` (a BACKBONES name or a hub:
    preset); UserError if it won't fit."""
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
            f"({one_line(failed)}); give weights saved from a {name} backbone, "
            f'"imagenet" or "none"'
        ) from failed
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    after_load = BACKBONES.get(name).meta.get("after_load") if name in BACKBONES else None
    if after_load is not None:
        resolve(after_load)(backbone)
