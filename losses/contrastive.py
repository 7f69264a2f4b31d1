"""Contrastive loss (Hadsell, Chopra and LeCun, CVPR 2006) with pytorch-metric-learning's
conventions (``ContrastiveLoss(pos_margin=0, neg_margin=1)``).

Over all ordered pairs of the batch (i != j):

    positive pair: relu(d(i, j) - pos_margin)      negative pair: relu(neg_margin - d(i, j))

Each of the two terms is averaged over its pairs with a non-zero loss (pml's AvgNonZeroReducer;
0 if none) and the two averages are added. As in pml the hinge is not squared (Hadsell et al.
square both terms; use metric squared_euclidean for a squared positive term). O(B^2).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from losses.base import MetricLoss, class_masks
from losses.distances import pairwise_distances


def _mean_nonzero(values, mask):
    """Mean of values (>= 0) over the mask's entries that are > 0; 0 if none."""
    values = tf.where(mask, values, tf.zeros_like(values))
    count = tf.reduce_sum(tf.cast(values > 0.0, values.dtype))
    return tf.math.divide_no_nan(tf.reduce_sum(values), count)


@keras.saving.register_keras_serializable(package="tfcbir")
class ContrastiveLoss(MetricLoss):
    """Contrastive loss over all pairs, each term averaged over its non-zero pairs."""

    registry_name = "contrastive"

    def __init__(
        self, pos_margin: float = 0.0, neg_margin: float = 1.0, metric: str = "euclidean", **kwargs
    ):
        super().__init__(**kwargs)
        self.pos_margin = float(pos_margin)
        self.neg_margin = float(neg_margin)
        self.metric = metric

    def call(self, labels, embeddings):
        distances = pairwise_distances(embeddings, self.metric)  # (B, B)
        positives, negatives = class_masks(labels)
        positive_loss = tf.nn.relu(distances - self.pos_margin)
        negative_loss = tf.nn.relu(self.neg_margin - distances)
        return _mean_nonzero(positive_loss, positives) + _mean_nonzero(negative_loss, negatives)

    def get_config(self):
        return {
            **super().get_config(),
            "pos_margin": self.pos_margin,
            "neg_margin": self.neg_margin,
            "metric": self.metric,
        }
