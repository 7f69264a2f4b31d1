"""Distances and similarities between embeddings, kept apart from the losses that use them.

Every distance-based loss takes a ``metric`` and calls :func:`pairwise_distances`, so any of them
can run on any metric (the pytorch-metric-learning idea). Losses that their papers define on
cosine similarity (multi-similarity, NT-Xent, proxy anchor, ArcFace) call
:func:`cosine_similarities` instead.

The formulas follow tensorflow-addons' ``metric_learning`` module exactly (same operations in the
same order), so ``semi_hard_triplet`` reproduces ``tfa.losses.TripletSemiHardLoss`` to rounding:

- euclidean: squared distances from the Gram matrix, clipped at 0; the square root is taken only
  where the squared distance is > 0 (elsewhere 0 with a zero gradient, instead of sqrt's infinite
  one); zero diagonal.
- squared_euclidean: the same squared distances, clipped at 0; zero diagonal.
- cosine: 1 - cos of the l2-normalised embeddings, clipped at 0; zero diagonal (addons'
  ``angular_distance``).
"""

from __future__ import annotations

import tensorflow as tf

from losses.catalog import METRICS


def pairwise_distances(embeddings, metric: str = "euclidean") -> tf.Tensor:
    """Distances between all rows of ``embeddings`` (B, D) -> (B, B), zero on the diagonal.

    metric: one of :data:`METRICS`. The result has the embeddings' dtype.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    embeddings = tf.convert_to_tensor(embeddings)
    if metric == "cosine":
        unit = tf.math.l2_normalize(embeddings, axis=1)
        distances = tf.maximum(1.0 - tf.matmul(unit, unit, transpose_b=True), 0.0)
    else:
        squared_norms = tf.reduce_sum(tf.square(embeddings), axis=1)
        squared = (
            squared_norms[:, None]
            + squared_norms[None, :]
            - 2.0 * tf.matmul(embeddings, embeddings, transpose_b=True)
        )
        # Rounding makes some squared distances slightly negative.
        squared = tf.maximum(squared, 0.0)
        if metric == "squared_euclidean":
            distances = squared
        else:
            # sqrt has an infinite gradient at 0: take it only where the distance is > 0 (the
            # inner where keeps the unused branch finite, so its zero gradient stays zero).
            zero = squared <= 0.0
            distances = tf.where(zero, 0.0, tf.sqrt(tf.where(zero, 1.0, squared)))
    # A point's distance to itself is 0 exactly (rounding leaves small values there).
    return tf.linalg.set_diag(distances, tf.zeros_like(distances[:, 0]))


def cosine_similarities(embeddings, others) -> tf.Tensor:
    """Cosine similarity of each row of ``embeddings`` (B, D) with each row of ``others`` (C, D).

    Returns (B, C). Pass the embeddings twice for the batch's own similarity matrix.
    """
    unit = tf.math.l2_normalize(embeddings, axis=1)
    unit_others = tf.math.l2_normalize(others, axis=1)
    return tf.matmul(unit, unit_others, transpose_b=True)
