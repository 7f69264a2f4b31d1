"""The triplet loss (Schroff et al., FaceNet, CVPR 2015) on mined triplets, and its three presets.

For every mined triplet (a, p, n), a and p of one class, n of another:

    l(a, p, n) = max(margin + d(a, p) - d(a, n), 0)      or, with soft_margin,
    l(a, p, n) = log(1 + exp(d(a, p) - d(a, n)))

The miner decides the triplets and so the average (:mod:`losses.miners`):

- a miner that picks one negative per positive pair (``semi_hard``, ``batch_hard``): the mean
  over its triplets, zeros included (tensorflow-addons' semi-hard loss; Hermans et al.'s
  batch-hard);
- a pair miner (``all``, ``multi_similarity``): every kept positive of an anchor with every kept
  negative, averaged over the triplets whose loss is > 0 (Hermans et al.'s "BA != 0",
  pytorch-metric-learning's AvgNonZeroReducer): a plain mean over all triplets fades as most
  become easy. 0 when none violates the margin.

The presets: ``semi_hard_triplet`` (miner semi_hard, tfa.losses.TripletSemiHardLoss's values and
gradients; a batch without positive pairs gives 0 where addons gives NaN), ``batch_hard_triplet``
(miner batch_hard; anchors without a positive or a negative are left out, unlike
tfa.losses.TripletHardLoss) and ``batch_all_triplet`` (miner all).

Memory O(B R), not the B R^2 triplet tensor of every combination: for an anchor,
sum_n relu(t - d(a, n)) with t = margin + d(a, p) is c * t - (sum of the c smallest negative
distances), c the number of negatives closer than t. With each anchor's negative distances sorted
once and their prefix sums, c comes from a batched binary search (``tf.searchsorted``) for every
(a, p): O(B R log R) time. The prefix sums stay differentiable, so each active triplet passes +1
to d(a, p) and -1 to d(a, n) as the triple loop would. The soft margin has no such form: it needs
a miner that picks one negative per pair.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from losses.base import sorted_negatives
from losses.miners import Pairs, Triplets
from losses.pairwise import PairwiseLoss


class TripletLoss(PairwiseLoss):
    """The triplet formula on a distance and a miner; build it as one of its presets."""

    soft_margin = False  # a parameter of batch_hard_triplet only

    def compute(self, batch):
        mined = self.mining.triplets(batch)
        if isinstance(mined, Pairs):
            if self.soft_margin:
                raise ValueError(
                    f"soft_margin needs a miner that picks one negative per pair, not {self.miner}"
                )
            return every_combination(batch.distances, mined, self.margin)
        return one_negative_each(mined, self.margin, self.soft_margin)


def one_negative_each(triplets: Triplets, margin: float, soft_margin: bool = False):
    """Mean over the triplets' mask of the hinge (or soft) triplet loss -> scalar."""
    mask = triplets.mask
    gap = tf.where(mask, triplets.positive - triplets.negative, tf.zeros_like(triplets.positive))
    if soft_margin:
        per_triplet = tf.nn.softplus(gap)
    else:
        # tf.maximum, like addons: a triplet exactly at the margin still passes its gradient.
        per_triplet = tf.maximum(margin + gap, 0.0)
    total = tf.reduce_sum(tf.where(mask, per_triplet, tf.zeros_like(per_triplet)))
    count = tf.reduce_sum(tf.cast(tf.broadcast_to(mask, tf.shape(per_triplet)), total.dtype))
    return tf.math.divide_no_nan(total, count)


def every_combination(distances, pairs: Pairs, margin: float):
    """Sum of relu(margin + d(a, p) - d(a, n)) over every kept positive p and kept negative n of
    each anchor, divided by the number of those terms that are > 0. distances (B, R) -> scalar."""
    sorted_distances, count = sorted_negatives(distances, pairs.negatives)  # +inf padded
    thresholds = margin + distances  # entry (a, p): margin + d(a, p)
    # Entry (a, p): how many of a's negatives are closer than the threshold (loss > 0).
    active = tf.searchsorted(sorted_distances, thresholds, side="left")
    column = tf.range(tf.shape(distances)[1])
    finite = tf.where(
        column[None, :] < count[:, None], sorted_distances, tf.zeros_like(sorted_distances)
    )
    prefix = tf.concat([tf.zeros_like(finite[:, :1]), tf.cumsum(finite, axis=1)], axis=1)
    active_sum = tf.gather(prefix, active, batch_dims=1)  # (B, R)
    active = tf.cast(active, distances.dtype)
    per_pair = active * thresholds - active_sum
    zeros = tf.zeros_like(per_pair)
    total = tf.reduce_sum(tf.where(pairs.positives, per_pair, zeros))
    nonzero = tf.reduce_sum(tf.where(pairs.positives, active, zeros))
    return tf.math.divide_no_nan(total, nonzero)


@keras.saving.register_keras_serializable(package="tfcbir")
class SemiHardTripletLoss(TripletLoss):
    """Triplet loss with semi-hard negative mining, as tensorflow-addons computes it."""


@keras.saving.register_keras_serializable(package="tfcbir")
class BatchHardTripletLoss(TripletLoss):
    """Batch-hard triplet loss, with a hinge margin or the soft margin."""


@keras.saving.register_keras_serializable(package="tfcbir")
class BatchAllTripletLoss(TripletLoss):
    """Batch-all triplet loss, averaged over the triplets with a positive loss."""
