"""Lifted structured loss (Oh Song, Xiang, Jegelka and Savarese, CVPR 2016), the smooth
log-sum-exp form of their Eq. 4.

For every positive pair (i, j), with N_i the samples of other classes than i:

    J(i, j) = log( sum_{k in N_i} exp(margin - d(i, k)) + sum_{l in N_j} exp(margin - d(j, l)) )
              + d(i, j)
    loss = 1 / (2 |P|) * sum_{(i, j) in P} relu(J(i, j))^2

P: the unordered positive pairs; summing over ordered pairs counts each twice, which the same
formula over ordered pairs absorbs (pml's LiftedStructureLoss does the same). A pair without any
negative (a one-class batch) has J = -inf and adds 0. O(B^2): both sums depend on one index only,
so they are two per-row log-sum-exps combined per pair.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from losses.base import fill, masked_logsumexp, masked_mean
from losses.pairwise import PairwiseLoss


@keras.saving.register_keras_serializable(package="tfcbir")
class LiftedStructureLoss(PairwiseLoss):
    """Lifted structured loss over all positive pairs of the batch."""

    # J(i, j) sums over the negatives of both i and j: j must be an anchor too.
    takes_references = False

    def compute(self, batch):
        distances = batch.distances  # (B, B)
        row = masked_logsumexp(self.margin - distances, batch.negatives, axis=1)  # -inf if none
        # log(exp(row_i) + exp(row_j)) for every pair, stable and safe when both are -inf.
        peak = tf.maximum(row[:, None], row[None, :])
        has_negative = tf.math.is_finite(peak)
        peak = tf.stop_gradient(tf.where(has_negative, peak, tf.zeros_like(peak)))
        both = tf.exp(row[:, None] - peak) + tf.exp(row[None, :] - peak)
        neg_inf = fill(-float("inf"), distances)
        log_both = tf.where(
            has_negative,
            tf.math.log(tf.where(has_negative, both, tf.ones_like(both))) + peak,
            neg_inf,
        )
        per_pair = tf.square(tf.nn.relu(log_both + distances))
        return 0.5 * masked_mean(per_pair, batch.positives)
