"""The text tower of a dual encoder: token ids ``(B, L)`` int32 -> embeddings ``(B, D)`` float32.

:func:`build_scratch_text_model` is the small transformer trained from scratch (offline, on the
captions of the training images):

    token ids -> token embedding + learned position embedding (width)
              -> ``layers`` pre-norm transformer blocks (self-attention over the real tokens,
                 padding masked; an MLP of 4 x width with GELU)
              -> layer norm -> mean over the real tokens -> Dense(embedding_dim)

Token id 0 is padding (:mod:`datasets.tokenizer`). The embeddings are not normalised here: the
image-text losses and search normalise both towers' embeddings. The layers serialise with
``get_config`` (package ``tfcbir``).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

from nets import hub
from nets.catalog import (
    PRETRAINED_WEIGHTS,
    TEXT_PARAMS,
    hub_preset,
    is_hub,
    same_preset,
    text_tower_kind,
)
from nets.hub_text import build_hub_text_tower
from tfcbir import UserError
from tfcbir.params import validate


@keras.saving.register_keras_serializable(package="tfcbir")
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Token ids (B, L) -> token embedding + position embedding (B, L, width)."""

    def __init__(self, vocab_size: int, max_length: int, width: int, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.max_length, self.width = int(vocab_size), int(max_length), int(width)
        init = keras.initializers.RandomNormal(stddev=0.02)  # CLIP's text tower initialisation
        self.tokens = keras.layers.Embedding(
            self.vocab_size, self.width, embeddings_initializer=init, name="tokens"
        )
        self.positions = keras.layers.Embedding(
            self.max_length, self.width, embeddings_initializer=init, name="positions"
        )

    def build(self, input_shape):
        self.tokens.build(input_shape)
        self.positions.build((self.max_length,))

    def call(self, token_ids):
        length = ops.shape(token_ids)[-1]
        return self.tokens(token_ids) + self.positions(ops.arange(length))[None, :, :]

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.width)

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "max_length": self.max_length,
            "width": self.width,
        }


@keras.saving.register_keras_serializable(package="tfcbir")
class TransformerBlock(keras.layers.Layer):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x)).

    Inputs: x (B, L, width) and the token mask (B, L) bool (True: a real token); padded tokens
    are never attended to. Output (B, L, width).
    """

    def __init__(self, width: int, heads: int, **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads = int(width), int(heads)
        self.norm1 = keras.layers.LayerNormalization(epsilon=1e-5, name="norm1")
        self.attention = keras.layers.MultiHeadAttention(
            self.heads, self.width // self.heads, name="attention"
        )
        self.norm2 = keras.layers.LayerNormalization(epsilon=1e-5, name="norm2")
        self.mlp_in = keras.layers.Dense(4 * self.width, activation="gelu", name="mlp_in")
        self.mlp_out = keras.layers.Dense(self.width, name="mlp_out")

    def build(self, x_shape, mask_shape=None):
        self.norm1.build(x_shape)
        self.attention.build(x_shape, x_shape)
        self.norm2.build(x_shape)
        self.mlp_in.build(x_shape)
        self.mlp_out.build((*x_shape[:-1], 4 * self.width))

    def call(self, x, mask):
        keys = ops.cast(mask, "bool")[:, None, :]  # (B, 1, L): every query sees the real tokens
        attention_mask = ops.broadcast_to(keys, (ops.shape(x)[0], ops.shape(x)[1], ops.shape(x)[1]))
        h = self.norm1(x)
        x = x + self.attention(h, h, attention_mask=attention_mask)
        return x + self.mlp_out(self.mlp_in(self.norm2(x)))

    def compute_output_shape(self, x_shape, mask_shape=None):
        return x_shape

    def get_config(self):
        return {**super().get_config(), "width": self.width, "heads": self.heads}


@keras.saving.register_keras_serializable(package="tfcbir")
class MaskedMean(keras.layers.Layer):
    """Mean over the real tokens: x (B, L, W), mask (B, L) -> (B, W)."""

    def call(self, x, mask):
        weights = ops.cast(mask, x.dtype)[:, :, None]
        total = ops.sum(x * weights, axis=1)
        return total / ops.maximum(ops.sum(weights, axis=1), 1.0)

    def compute_output_shape(self, x_shape, mask_shape=None):
        return (x_shape[0], x_shape[-1])


@keras.saving.register_keras_serializable(package="tfcbir")
class TokenMask(keras.layers.Layer):
    """Token ids (B, L) -> (B, L) bool: True for real tokens (id != 0, the padding)."""

    def call(self, token_ids):
        return ops.not_equal(token_ids, 0)

    def compute_output_shape(self, input_shape):
        return input_shape


def build_scratch_text_model(
    *,
    vocab_size: int,
    max_length: int,
    width: int,
    layers: int,
    heads: int,
    embedding_dim: int,
) -> keras.Model:
    """The from-scratch text tower (see the module docstring), named "text_embedding":
    token ids ``(B, max_length)`` int32 -> ``(B, embedding_dim)`` float32."""
    if width % heads:
        raise ValueError(f"width {width} is not a multiple of heads {heads}")
    token_ids = keras.Input(shape=(max_length,), dtype="int32", name="token_ids")
    mask = TokenMask(name="token_mask")(token_ids)
    x = TokenAndPositionEmbedding(vocab_size, max_length, width, name="embedding")(token_ids)
    for block in range(layers):
        x = TransformerBlock(width, heads, name=f"block{block + 1}")(x, mask)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    pooled = MaskedMean(name="pool")(x, mask)
    embeddings = keras.layers.Dense(embedding_dim, dtype="float32", name="text_projection")(pooled)
    return keras.Model(token_ids, embeddings, name="text_embedding")


@dataclass
class TextTower:
    """A built text tower: ``model`` maps token ids ``(B, L)`` int32 to ``(B, D)`` float32 and
    ``tokenizer`` turns texts into those ids (``encode(list[str]) -> (B, L) int32``, and
    ``unknown_words(text) -> list[str]``, words it can only read as unknown). ``tower`` is the
    ``model.text.tower`` it was built from."""

    model: keras.Model
    tokenizer: object
    tower: str

    def embed(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """(B, D) float32 embeddings of B texts (not normalised)."""
        if not texts:
            return np.zeros((0, int(self.model.output_shape[-1])), np.float32)
        ids = self.tokenizer.encode(list(texts))
        return np.concatenate(
            [
                np.asarray(self.model(ids[i : i + batch_size], training=False), np.float32)
                for i in range(0, len(ids), batch_size)
            ]
        )


def build_text_tower(
    params: dict,
    embedding_dim: int | None,
    *,
    tokenizer=None,
    pretrained: bool = True,
    hub_backbone=None,
) -> TextTower:
    """The text tower of the ``model.text`` section ``params`` (:data:`nets.catalog.TEXT_PARAMS`),
    projecting to ``embedding_dim`` (None: a hub tower's own projection; see
    :func:`nets.text_embedding_dim`).

    scratch: ``tokenizer`` is the run's :class:`datasets.tokenizer.WordTokenizer` (its vocabulary
    and length size the model); the weights start random. hub:<preset>: the preset's text
    encoder and tokenizer, its weights loaded when ``pretrained`` (see :mod:`nets.hub_text`);
    ``hub_backbone``: the preset already loaded for the image tower
    (:func:`shared_hub_backbone`).
    ``freeze`` keeps the preset's weights fixed (a new ``text_head`` Dense layer still trains).
    UserError for a tower it cannot build.
    """
    params = validate(dict(params), TEXT_PARAMS, "model.text")
    kind = text_tower_kind(params["tower"])
    if kind == "none":
        raise UserError(
            "model.text.tower: none: this model has no text tower; set model.text.tower: "
            "scratch or hub:<preset> and train it with an image-text loss"
        )
    if kind == "scratch":
        if tokenizer is None or embedding_dim is None:
            raise ValueError("a scratch text tower needs the run's tokenizer and a dimension")
        model = build_scratch_text_model(
            vocab_size=tokenizer.vocab_size,
            max_length=tokenizer.max_length,
            width=params["width"],
            layers=params["layers"],
            heads=params["heads"],
            embedding_dim=embedding_dim,
        )
    else:
        model, tokenizer = build_hub_text_tower(
            hub_preset(params["tower"]),
            embedding_dim,
            max_length=params["max_length"],
            pretrained=pretrained,
            hub_backbone=hub_backbone,
        )
    if params["freeze"]:  # the pretrained layers; a new head (text_head) still learns
        for layer in model.layers:
            if layer.name != "text_head":
                layer.trainable = False
    return TextTower(model, tokenizer, params["tower"])


def shared_hub_backbone(model: dict, image_size: tuple[int, int], *, pretrained: bool):
    """The keras-hub backbone that the image and text towers of the ``model`` section share
    when both are the same ``hub:`` preset with its weights (loaded once, for ``image_size``,
    its weights when ``pretrained``); None otherwise (each tower loads its own). Pass it to
    :func:`nets.build_embedding_model` and :func:`build_text_tower`."""
    backbone, tower = model["backbone"], model["text"]["tower"]
    if not (is_hub(backbone) and same_preset(tower, backbone)):
        return None
    if model["weights"] not in PRETRAINED_WEIGHTS:
        return None  # a random or file-loaded image tower beside the preset's text tower
    return hub.load_backbone(backbone, load_weights=pretrained, image_size=tuple(image_size))
