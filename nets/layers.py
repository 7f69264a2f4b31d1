"""The custom Keras layers of the embedding model: pixel preprocessing, L2 normalisation, a
transformer's class token and the pooling layers of ``model.pooling`` (GeM, average + max).

They serialise with ``get_config`` (registered under the ``tfcbir`` package), so an embedding
model round-trips through ``model.to_json()`` / ``keras.models.model_from_json`` and
``model.save("x.keras")`` / ``keras.models.load_model`` once ``nets`` is imported.
"""

from __future__ import annotations

import keras
from keras import ops

from nets.catalog import PREPROCESS_MODES

# ImageNet statistics, as keras.applications.imagenet_utils uses them.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # 0..255 scale, BGR order
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)  # 0..1 scale, RGB order
TORCH_STD_RGB = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="tfcbir")
class ImagePreprocessing(keras.layers.Layer):
    """Maps 0..255 RGB pixels to what a backbone was trained on (see ``PREPROCESS_MODES``).

    Input ``(B, H, W, 3)`` uint8 or float, values 0..255; output ``(B, H, W, 3)`` in the layer's
    compute dtype (float16 under a mixed_float16 policy). The modes follow
    ``keras.applications.imagenet_utils.preprocess_input``, so a model that contains this layer
    takes raw pixels and embed/query code never has to know the backbone.

    ``scale_offset`` computes ``x * scale + offset`` in float32, with ``scale`` and ``offset`` a
    number or one number per RGB channel (default 1 and 0): the arithmetic of keras-hub's ``ImageConverter`` after
    its resize (a preset's converter gives the values, see :func:`nets.hub.preprocessing`).
    """

    def __init__(self, mode: str = "tf", scale=None, offset=None, **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESS_MODES:
            raise ValueError(
                f"unknown preprocessing mode {mode!r}; one of {list(PREPROCESS_MODES)}"
            )
        if mode != "scale_offset" and (scale is not None or offset is not None):
            raise ValueError("scale and offset go with mode 'scale_offset' only")
        self.mode = mode
        self.scale = _per_channel(scale, 1.0) if mode == "scale_offset" else None
        self.offset = _per_channel(offset, 0.0) if mode == "scale_offset" else None

    def call(self, images):
        # Computed in float32 and cast at the end: per-image sums of 0..255 pixels overflow
        # float16 (65504) under mixed precision. Integer pixels are not auto-cast by Keras.
        x = ops.cast(images, "float32")
        return ops.cast(self._preprocess(x), self.compute_dtype)

    def _preprocess(self, x):
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1)  # RGB -> BGR
            return x - ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype="float32")
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(TORCH_MEAN_RGB, dtype="float32")
            std = ops.convert_to_tensor(TORCH_STD_RGB, dtype="float32")
            return (x / 255.0 - mean) / std
        if self.mode == "unit":
            return x / 255.0
        if self.mode == "scale_offset":
            scale = ops.convert_to_tensor(self.scale, dtype="float32")
            return x * scale + ops.convert_to_tensor(self.offset, dtype="float32")
        if self.mode == "per_image":
            mean = ops.mean(x, axis=(1, 2), keepdims=True)
            std = ops.std(x, axis=(1, 2), keepdims=True)
            return (x - mean) / (std + 1.0)  # + 1 (of 255): flat images stay finite
        return x  # raw

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = {**super().get_config(), "mode": self.mode}
        if self.mode == "scale_offset":
            config.update(scale=self.scale, offset=self.offset)
        return config


def _per_channel(value, default: float) -> list[float]:
    """A number or 1 or 3 numbers -> 3 floats (one per RGB channel)."""
    if value is None:
        value = default
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise ValueError(f"give one number or one per RGB channel, got {value!r}")
    return values


@keras.saving.register_keras_serializable(package="tfcbir")
class L2Normalize(keras.layers.Layer):
    """Scales each row to unit L2 norm: ``(B, D) -> (B, D)``, computed in float32.

    ``epsilon`` bounds the squared norm from below, so an all-zero row stays zero instead of
    becoming NaN. The layer defaults to dtype float32 (whatever the global policy) because
    embeddings are compared by distances, where float16 rounding would show.
    """

    def __init__(self, axis: int = -1, epsilon: float = 1e-12, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.axis = axis
        self.epsilon = epsilon

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        squared_norm = ops.sum(ops.square(x), axis=self.axis, keepdims=True)
        return x * ops.rsqrt(ops.maximum(squared_norm, self.epsilon))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="tfcbir")
class ClassToken(keras.layers.Layer):
    """A transformer's class token: ``(B, T, C)`` tokens -> ``(B, C)``, the first one."""

    def call(self, tokens):
        return tokens[:, 0, :]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


@keras.saving.register_keras_serializable(package="tfcbir")
class GeneralizedMeanPooling(keras.layers.Layer):
    """GeM pooling (Radenovic et al. 2018): ``(B, H, W, C)`` -> ``(B, C)``,
    ``(mean_hw max(x, eps)^p)^(1/p)`` per channel, with one learnable exponent ``p``.

    p = 1 is average pooling and p -> inf max pooling; p starts at ``p`` (3, the paper's) and
    trains with the model. ``eps`` clamps the features from below, so the power of a ReLU's
    zeros (and its gradient) stays finite. Computed in float32 whatever the compute dtype:
    ``x^3`` of a ResNet's features overflows float16.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.initial_p = float(p)
        self.eps = float(eps)

    def build(self, input_shape):
        self.p = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.initial_p),
            dtype="float32",
            name="p",
        )

    def call(self, features):
        x = ops.maximum(ops.cast(features, "float32"), self.eps)
        p = ops.cast(self.p, "float32")
        pooled = ops.power(ops.mean(ops.power(x, p), axis=(1, 2)), 1.0 / p)
        return ops.cast(pooled, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "p": self.initial_p, "eps": self.eps}


@keras.saving.register_keras_serializable(package="tfcbir")
class AverageMaxPooling(keras.layers.Layer):
    """Average plus max pooling: ``(B, H, W, C)`` -> ``(B, C)``, ``mean_hw(x) + max_hw(x)``.

    The sum, not the concatenation, as metric-learning and re-ID code pools ResNet features
    (Proxy-Anchor's official ResNets add ``gap(x) + gmp(x)``; timm's ``avgmax`` halves it): the
    width stays C, so a head fits either pooling.
    """

    def call(self, features):
        return ops.mean(features, axis=(1, 2)) + ops.max(features, axis=(1, 2))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])
