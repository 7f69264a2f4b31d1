"""Multi-similarity loss (Wang, Han, Huang, Dong and Scott, CVPR 2019) with its pair mining, as in
the authors' code (MalongTech/research-ms-loss).

On cosine similarities s, for each anchor a (positives: same class, not a itself):

    mining:    keep negative n if s_an + epsilon > min_p s_ap     (the multi_similarity miner,
               keep positive p if s_ap - epsilon < max_n s_an      losses.miners; or all, batch_hard)
    l(a) = 1/alpha * log(1 + sum_{kept p} exp(-alpha (s_ap - base)))
         + 1/beta  * log(1 + sum_{kept n} exp( beta (s_an - base)))
    loss = sum_a l(a) / B

An anchor left without a kept positive or a kept negative adds 0 but still counts in B, as in the
authors' code (pml's MultiSimilarityLoss with its miner keeps each half separately instead). The
authors' code drops positives by value (s_ap >= 1 - 1e-5) to skip the anchor itself; here the
anchor is skipped by index, so exact duplicates stay positives. O(B^2).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from losses.base import masked_logsumexp
from losses.distances import CosineSimilarity
from losses.pairwise import PairwiseLoss


@keras.saving.register_keras_serializable(package="tfcbir")
class MultiSimilarityLoss(PairwiseLoss):
    """Multi-similarity loss on cosine similarities, with the paper's pair mining."""

    def make_distance(self):
        return CosineSimilarity()

    def compute(self, batch):
        similarities = batch.values  # (B, R)
        # Mining uses the similarities' values only; the gradient flows through the weighting.
        pairs = self.mining.pairs(batch)
        positive_term = (
            masked_logsumexp(
                -self.alpha * (similarities - self.base), pairs.positives, axis=1, add_one=True
            )
            / self.alpha
        )
        negative_term = (
            masked_logsumexp(
                self.beta * (similarities - self.base), pairs.negatives, axis=1, add_one=True
            )
            / self.beta
        )
        kept = tf.logical_and(
            tf.reduce_any(pairs.positives, axis=1), tf.reduce_any(pairs.negatives, axis=1)
        )
        per_anchor = tf.where(kept, positive_term + negative_term, tf.zeros_like(positive_term))
        return tf.reduce_mean(per_anchor)
