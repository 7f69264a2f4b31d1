"""Contrastive loss (Hadsell, Chopra and LeCun, CVPR 2006) with pytorch-metric-learning's
conventions (``ContrastiveLoss(pos_margin=0, neg_margin=1)``).

Over the pairs its miner keeps (``all``, the default: every ordered pair of the batch, i != j;
``batch_hard`` or ``multi_similarity``: pml's MultiSimilarityMiner + ContrastiveLoss):

    positive pair: relu(d(i, j) - pos_margin)      negative pair: relu(neg_margin - d(i, j))

Each of the two terms is averaged over its pairs with a non-zero loss (pml's AvgNonZeroReducer;
0 if none) and the two averages are added. As in pml the hinge is not squared (Hadsell et al.
square both terms; use metric squared_euclidean for a squared positive term). O(B R).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from losses.pairwise import PairwiseLoss


def _mean_nonzero(values, mask):
    """Mean of values (>= 0) over the mask's entries that are > 0; 0 if none."""
    values = tf.where(mask, values, tf.zeros_like(values))
    count = tf.reduce_sum(tf.cast(values > 0.0, values.dtype))
    return tf.math.divide_no_nan(tf.reduce_sum(values), count)


@keras.saving.register_keras_serializable(package="tfcbir")
class ContrastiveLoss(PairwiseLoss):
    """Contrastive loss over the mined pairs, each term averaged over its non-zero pairs."""

    def compute(self, batch):
        pairs = self.mining.pairs(batch)
        distances = batch.distances
        positive_loss = tf.nn.relu(distances - self.pos_margin)
        negative_loss = tf.nn.relu(self.neg_margin - distances)
        return _mean_nonzero(positive_loss, pairs.positives) + _mean_nonzero(
            negative_loss, pairs.negatives
        )
