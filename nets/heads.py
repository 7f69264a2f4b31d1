"""Embedding heads: the layers between the backbone's pooled features and the embeddings.

Each head is a function ``head(features, embedding_dim) -> embeddings`` that builds its layers on
a symbolic ``(B, C)`` feature tensor and returns ``(B, embedding_dim)``. The last layer of every
head has dtype float32, so the embeddings stay float32 under a mixed_float16 policy.
Registered in ``HEADS``; the entry's ``normalized`` tells whether the rows have unit L2 norm.
"""

from __future__ import annotations

import keras

from nets.layers import L2Normalize
from tfcbir.registry import Registry

HEADS = Registry("head")


def _projection(x, embedding_dim: int):
    return keras.layers.Dense(embedding_dim, dtype="float32", name="head_projection")(x)


def _fc1024(x):
    return keras.layers.Dense(1024, activation="relu", name="head_fc1024")(x)


@HEADS.register("direct", normalized=False)
def direct(features, embedding_dim: int):
    """Dense(embedding_dim): a linear projection of the pooled features."""
    return _projection(features, embedding_dim)


@HEADS.register("direct_normalize", normalized=True)
def direct_normalize(features, embedding_dim: int):
    """Dense(embedding_dim), then L2 normalisation."""
    return L2Normalize(name="head_l2")(_projection(features, embedding_dim))


@HEADS.register("fc1024", normalized=False)
def fc1024(features, embedding_dim: int):
    """Dense(1024) + ReLU, then Dense(embedding_dim)."""
    return _projection(_fc1024(features), embedding_dim)


@HEADS.register("fc1024_normalize", normalized=True)
def fc1024_normalize(features, embedding_dim: int):
    """Dense(1024) + ReLU, then Dense(embedding_dim), then L2 normalisation."""
    return L2Normalize(name="head_l2")(_projection(_fc1024(features), embedding_dim))
