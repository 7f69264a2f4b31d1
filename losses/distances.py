"""Distances and similarities between embeddings: the objects every loss compares with.

A distance object has one method, ``pairwise(embeddings (B, D), references (R, D) = None)`` ->
(B, R), and says whether a larger value means closer (``larger_is_closer``: similarities). With
no references, the batch is compared with itself and a distance's diagonal is exactly 0. The
distance-based losses take theirs by name (the ``metric`` key, :data:`losses.catalog.DISTANCES`),
so any of them runs on any distance (the pytorch-metric-learning idea); the losses their papers
define on similarities use :class:`CosineSimilarity` (multi-similarity, NT-Xent, proxy anchor,
ArcFace) or :class:`DotProductSimilarity` (N-pair, angular).

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

from losses.catalog import DISTANCES, METRICS


class Distance:
    """How a loss compares embeddings: ``pairwise(embeddings, references=None)`` -> (B, R)."""

    larger_is_closer = False  # True for similarities

    def pairwise(self, embeddings, references=None) -> tf.Tensor:
        """embeddings (B, D), references (R, D) or None (the embeddings themselves) -> (B, R),
        in the embeddings' dtype. Compared with itself, a distance's diagonal is exactly 0."""
        embeddings = tf.convert_to_tensor(embeddings)
        if references is None:
            values = self.compute(embeddings, embeddings)
            if self.larger_is_closer:
                return values
            # A point's distance to itself is 0 exactly (rounding leaves small values there).
            return tf.linalg.set_diag(values, tf.zeros_like(values[:, 0]))
        return self.compute(embeddings, tf.convert_to_tensor(references, embeddings.dtype))

    def compute(self, embeddings, references) -> tf.Tensor:
        """(B, D), (R, D) -> (B, R)."""
        raise NotImplementedError


def squared_differences(embeddings, references) -> tf.Tensor:
    """||a - r||^2 from the Gram matrix (B, R), clipped at 0 (rounding makes some negative)."""
    squared = (
        tf.reduce_sum(tf.square(embeddings), axis=1)[:, None]
        + tf.reduce_sum(tf.square(references), axis=1)[None, :]
        - 2.0 * tf.matmul(embeddings, references, transpose_b=True)
    )
    return tf.maximum(squared, 0.0)


class EuclideanDistance(Distance):
    """||a - r||, with a zero (not infinite) gradient where two points coincide."""

    def compute(self, embeddings, references):
        squared = squared_differences(embeddings, references)
        # sqrt has an infinite gradient at 0: take it only where the distance is > 0 (the inner
        # where keeps the unused branch finite, so its zero gradient stays zero).
        zero = squared <= 0.0
        return tf.where(zero, 0.0, tf.sqrt(tf.where(zero, 1.0, squared)))


class SquaredEuclideanDistance(Distance):
    """||a - r||^2."""

    def compute(self, embeddings, references):
        return squared_differences(embeddings, references)


class CosineDistance(Distance):
    """1 - cos(a, r), clipped at 0."""

    def compute(self, embeddings, references):
        unit = tf.math.l2_normalize(embeddings, axis=1)
        unit_references = tf.math.l2_normalize(references, axis=1)
        return tf.maximum(1.0 - tf.matmul(unit, unit_references, transpose_b=True), 0.0)


class CosineSimilarity(Distance):
    """cos(a, r) of the l2-normalised embeddings; larger is closer."""

    larger_is_closer = True

    def compute(self, embeddings, references):
        unit = tf.math.l2_normalize(embeddings, axis=1)
        unit_references = tf.math.l2_normalize(references, axis=1)
        return tf.matmul(unit, unit_references, transpose_b=True)


class DotProductSimilarity(Distance):
    """a . r, the embeddings as they come; larger is closer."""

    larger_is_closer = True

    def compute(self, embeddings, references):
        return tf.matmul(embeddings, references, transpose_b=True)


def distance(name: str) -> Distance:
    """The distance object ``name`` (one of :data:`METRICS`) names; ValueError for another."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; use one of {', '.join(METRICS)}")
    return DISTANCES.get(name).builder()


def pairwise_distances(embeddings, metric: str = "euclidean") -> tf.Tensor:
    """Distances between all rows of ``embeddings`` (B, D) -> (B, B), zero on the diagonal.

    metric: one of :data:`METRICS`. The result has the embeddings' dtype.
    """
    return distance(metric).pairwise(embeddings)


def cosine_similarities(embeddings, others) -> tf.Tensor:
    """Cosine similarity of each row of ``embeddings`` (B, D) with each row of ``others`` (C, D).

    Returns (B, C). Pass the embeddings twice for the batch's own similarity matrix.
    """
    return CosineSimilarity().pairwise(embeddings, others)
