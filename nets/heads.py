"""Embedding heads: the layers between the backbone's pooled features and the embeddings.

Each head is a function ``head(features, embedding_dim) -> embeddings`` that builds its layers on
a symbolic ``(B, C)`` feature tensor and returns ``(B, embedding_dim)``. The last layer of every
head has dtype float32, so the embeddings stay float32 under a mixed_float16 policy.
Registered in :data:`nets.catalog.HEADS`, whose ``normalized`` tells whether the rows have unit
L2 norm.
"""

from __future__ import annotations

import keras

from nets.layers import L2Normalize


def _projection(x, embedding_dim: int):
    return keras.layers.Dense(embedding_dim, dtype="float32", name="head_projection")(x)


def _fc1024(x):
    return keras.layers.Dense(1024, activation="relu", name="head_fc1024")(x)


def direct(features, embedding_dim: int):
    """Dense(embedding_dim): a linear projection of the pooled features."""
    return _projection(features, embedding_dim)


def direct_normalize(features, embedding_dim: int):
    """Dense(embedding_dim), then L2 normalisation."""
    return L2Normalize(name="head_l2")(_projection(features, embedding_dim))


def fc1024(features, embedding_dim: int):
    """Dense(1024) + ReLU, then Dense(embedding_dim)."""
    return _projection(_fc1024(features), embedding_dim)


def fc1024_normalize(features, embedding_dim: int):
    """Dense(1024) + ReLU, then Dense(embedding_dim), then L2 normalisation."""
    return L2Normalize(name="head_l2")(_projection(_fc1024(features), embedding_dim))
