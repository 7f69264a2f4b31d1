"""Batch-all triplet loss (Hermans, Beyer and Leibe 2017, "BA"; the triplet loss of FaceNet over
every valid triplet of the batch).

Over all triplets (a, p, n) with a != p of one class and n of another:

    loss = sum relu(margin + d(a, p) - d(a, n)) / #{triplets where that term is > 0}

i.e. the mean over the triplets that still violate the margin, Hermans et al.'s "BA != 0"
averaging (pytorch-metric-learning's AvgNonZeroReducer): a plain mean over all triplets fades as
most triplets become easy. 0 when no triplet violates the margin.

Memory O(B^2), not the B^3 triplet tensor: for an anchor, sum_n relu(t - d(a, n)) with
t = margin + d(a, p) is c * t - (sum of the c smallest negative distances), where c is the number
of negatives closer than t. With each anchor's negative distances sorted once and their prefix
sums, c comes from a batched binary search (``tf.searchsorted``) for every (a, p):
O(B^2 log B) time. The prefix sums stay differentiable, so each active triplet passes +1 to
d(a, p) and -1 to d(a, n) as the triple loop would.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from losses.base import MetricLoss, class_masks, sorted_negatives
from losses.distances import pairwise_distances


@keras.saving.register_keras_serializable(package="tfcbir")
class BatchAllTripletLoss(MetricLoss):
    """Batch-all triplet loss, averaged over the triplets with a positive loss."""

    registry_name = "batch_all_triplet"

    def __init__(self, margin: float = 0.2, metric: str = "euclidean", **kwargs):
        super().__init__(**kwargs)
        self.margin = float(margin)
        self.metric = metric

    def call(self, labels, embeddings):
        distances = pairwise_distances(embeddings, self.metric)  # (B, B)
        positives, negatives = class_masks(labels)
        sorted_distances, count = sorted_negatives(distances, negatives)  # +inf padded
        thresholds = self.margin + distances  # entry (a, p): margin + d(a, p)
        # Entry (a, p): how many of a's negatives are closer than the threshold (loss > 0).
        active = tf.searchsorted(sorted_distances, thresholds, side="left")
        column = tf.range(tf.shape(distances)[1])
        finite = tf.where(
            column[None, :] < count[:, None], sorted_distances, tf.zeros_like(sorted_distances)
        )
        prefix = tf.concat([tf.zeros_like(finite[:, :1]), tf.cumsum(finite, axis=1)], axis=1)
        active_sum = tf.gather(prefix, active, batch_dims=1)  # (B, B)
        active = tf.cast(active, distances.dtype)
        per_pair = active * thresholds - active_sum
        zeros = tf.zeros_like(per_pair)
        total = tf.reduce_sum(tf.where(positives, per_pair, zeros))
        nonzero = tf.reduce_sum(tf.where(positives, active, zeros))
        return tf.math.divide_no_nan(total, nonzero)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin, "metric": self.metric}
