"""Batch-hard triplet loss (Hermans, Beyer and Leibe, "In Defense of the Triplet Loss for Person
Re-Identification", 2017).

For each anchor a: its hardest positive (the farthest same-class sample) and its hardest negative
(the closest other-class sample):

    l(a) = max(margin + max_p d(a, p) - min_n d(a, n), 0)      or, with soft_margin,
    l(a) = log(1 + exp(max_p d(a, p) - min_n d(a, n)))

averaged over the anchors that have both a positive and a negative (0 if none has). O(B^2).
Unlike tfa.losses.TripletHardLoss, anchors without a positive or a negative are left out of the
mean instead of entering it with addons' masked-extremum fallbacks.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from losses.base import MetricLoss, class_masks, fill
from losses.distances import pairwise_distances


@keras.saving.register_keras_serializable(package="tfcbir")
class BatchHardTripletLoss(MetricLoss):
    """Batch-hard triplet loss, with a hinge margin or the soft margin."""

    registry_name = "batch_hard_triplet"

    def __init__(
        self, margin: float = 0.3, soft_margin: bool = False, metric: str = "euclidean", **kwargs
    ):
        super().__init__(**kwargs)
        self.margin = float(margin)
        self.soft_margin = bool(soft_margin)
        self.metric = metric

    def call(self, labels, embeddings):
        distances = pairwise_distances(embeddings, self.metric)  # (B, B)
        positives, negatives = class_masks(labels)
        hardest_positive = tf.reduce_max(
            tf.where(positives, distances, fill(-1.0, distances)), axis=1
        )
        hardest_negative = tf.reduce_min(
            tf.where(negatives, distances, fill(float("inf"), distances)), axis=1
        )
        valid = tf.logical_and(tf.reduce_any(positives, axis=1), tf.reduce_any(negatives, axis=1))
        gap = tf.where(valid, hardest_positive - hardest_negative, tf.zeros_like(hardest_positive))
        if self.soft_margin:
            per_anchor = tf.nn.softplus(gap)
        else:
            per_anchor = tf.maximum(self.margin + gap, 0.0)
        total = tf.reduce_sum(tf.where(valid, per_anchor, tf.zeros_like(per_anchor)))
        return tf.math.divide_no_nan(total, tf.reduce_sum(tf.cast(valid, total.dtype)))

    def get_config(self):
        return {
            **super().get_config(),
            "margin": self.margin,
            "soft_margin": self.soft_margin,
            "metric": self.metric,
        }
