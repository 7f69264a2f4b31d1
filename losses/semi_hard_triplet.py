"""Triplet loss with semi-hard negative mining (Schroff et al., FaceNet, CVPR 2015).

The semantics of the archived ``tfa.losses.TripletSemiHardLoss`` (tensorflow-addons), same values
and gradients: for every anchor-positive pair (a, p), a != p of the same class, the negative is
the closest one farther than the positive, d(a, n) > d(a, p) (strictly); if there is none, the
farthest negative of the anchor; if the anchor has no negative at all, the smallest distance in
its row (0, its own), which is what addons' ``_masked_maximum`` gives over an empty mask. The loss
is the mean over all anchor-positive pairs of max(margin + d(a, p) - d(a, n), 0).

One intended difference: a batch without any positive pair gives 0 (addons divides 0 by 0: NaN).

Memory: addons tiles a (B*B, B) matrix (4 GB at B = 512). Here each anchor's negative distances are
sorted once, and for each positive a batched binary search (``tf.searchsorted``) finds the first
negative beyond it: O(B^2) memory, O(B^2 log B) time. The chosen distance is gathered from the
sorted, still differentiable, distances, so gradients reach d(a, p) and d(a, n) as in addons.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from losses.base import MetricLoss, class_masks, sorted_negatives
from losses.distances import pairwise_distances


@keras.saving.register_keras_serializable(package="tfcbir")
class SemiHardTripletLoss(MetricLoss):
    """Triplet loss with semi-hard negative mining, as tensorflow-addons computes it."""

    registry_name = "semi_hard_triplet"

    def __init__(self, margin: float = 1.0, metric: str = "euclidean", **kwargs):
        super().__init__(**kwargs)
        self.margin = float(margin)
        self.metric = metric

    def call(self, labels, embeddings):
        distances = pairwise_distances(embeddings, self.metric)  # (B, B)
        positives, negatives = class_masks(labels)
        sorted_distances, count = sorted_negatives(distances, negatives)
        # Entry (a, p): how many of a's negatives are <= d(a, p); the next one is the semi-hard.
        first_beyond = tf.searchsorted(sorted_distances, distances, side="right")
        farthest = tf.maximum(count - 1, 0)[:, None]
        index = tf.where(first_beyond < count[:, None], first_beyond, farthest)
        negative = tf.gather(sorted_distances, index, batch_dims=1)  # (B, B)
        # No negative at all: addons' masked maximum over an empty mask is the row minimum.
        row_minimum = tf.reduce_min(distances, axis=1, keepdims=True)
        negative = tf.where(count[:, None] > 0, negative, row_minimum)
        per_pair = tf.where(positives, self.margin + distances - negative, tf.zeros_like(distances))
        # tf.maximum, like addons: a pair exactly at the margin still passes its gradient.
        total = tf.reduce_sum(tf.maximum(per_pair, 0.0))
        return tf.math.divide_no_nan(total, tf.reduce_sum(tf.cast(positives, total.dtype)))

    def get_config(self):
        return {**super().get_config(), "margin": self.margin, "metric": self.metric}
