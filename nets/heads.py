"""Embedding heads: the layers between the backbone's pooled features and the embeddings.

Each head is a function ``head(features, embedding_dim, dropout=0.0) -> embeddings`` that builds
its layers on a symbolic ``(B, C)`` feature tensor and returns ``(B, embedding_dim)``
(``(B, C)`` for the identity heads, which ignore ``embedding_dim``). ``dropout`` is the rate of a
Dropout layer, active only when training, before the head's last Dense layer (identity heads: on
the features); 0 adds no layer, so models without dropout keep their layers and weights files.
The last layer of every head has dtype float32, so the embeddings stay float32 under a
mixed_float16 policy. Registered in :data:`nets.catalog.HEADS`, whose ``normalized`` tells whether
the rows have unit L2 norm.
"""

from __future__ import annotations

import keras

from nets.layers import L2Normalize


def _dropout(x, rate: float, name: str = "head_dropout"):
    return keras.layers.Dropout(rate, name=name)(x) if rate > 0 else x


def _projection(x, embedding_dim: int, dropout: float = 0.0):
    x = _dropout(x, dropout)
    return keras.layers.Dense(embedding_dim, dtype="float32", name="head_projection")(x)


def _fc1024(x):
    return keras.layers.Dense(1024, activation="relu", name="head_fc1024")(x)


def identity(features, embedding_dim: int, dropout: float = 0.0):
    """The pooled features themselves (embedding_dim is ignored)."""
    x = _dropout(features, dropout)
    return keras.layers.Activation("linear", dtype="float32", name="head_identity")(x)


def identity_normalize(features, embedding_dim: int, dropout: float = 0.0):
    """The pooled features, L2-normalised (embedding_dim is ignored)."""
    return L2Normalize(name="head_l2")(_dropout(features, dropout))


def direct(features, embedding_dim: int, dropout: float = 0.0):
    """Dense(embedding_dim): a linear projection of the pooled features."""
    return _projection(features, embedding_dim, dropout)


def direct_normalize(features, embedding_dim: int, dropout: float = 0.0):
    """Dense(embedding_dim), then L2 normalisation."""
    return L2Normalize(name="head_l2")(_projection(features, embedding_dim, dropout))


def fc1024(features, embedding_dim: int, dropout: float = 0.0):
    """Dense(1024) + ReLU, then Dense(embedding_dim)."""
    return _projection(_fc1024(features), embedding_dim, dropout)


def fc1024_normalize(features, embedding_dim: int, dropout: float = 0.0):
    """Dense(1024) + ReLU, then Dense(embedding_dim), then L2 normalisation."""
    return L2Normalize(name="head_l2")(_projection(_fc1024(features), embedding_dim, dropout))


def projection(features, embedding_dim: int, dropout: float = 0.0):
    """The projection head of CLIP fine-tuning code: a linear projection ``p`` to
    ``embedding_dim``, then ``LayerNorm(p + Dropout(Dense(GELU(p))))`` (a residual MLP)."""
    projected = keras.layers.Dense(embedding_dim, name="head_projection_in")(features)
    x = keras.layers.Activation("gelu", name="head_gelu")(projected)
    x = keras.layers.Dense(embedding_dim, name="head_fc")(x)
    x = _dropout(x, dropout)
    x = keras.layers.Add(name="head_residual")([x, projected])
    return keras.layers.LayerNormalization(dtype="float32", name="head_layer_norm")(x)


def projection_normalize(features, embedding_dim: int, dropout: float = 0.0):
    """The projection head, then L2 normalisation."""
    return L2Normalize(name="head_l2")(projection(features, embedding_dim, dropout))
