"""Multi-similarity loss (Wang, Han, Huang, Dong and Scott, CVPR 2019) with its pair mining, as in
the authors' code (MalongTech/research-ms-loss).

On cosine similarities s, for each anchor a (positives: same class, not a itself):

    mining:    keep negative n if s_an + epsilon > min_p s_ap
               keep positive p if s_ap - epsilon < max_n s_an
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

from losses.base import MetricLoss, class_masks, fill, masked_logsumexp
from losses.distances import cosine_similarities


@keras.saving.register_keras_serializable(package="tfcbir")
class MultiSimilarityLoss(MetricLoss):
    """Multi-similarity loss on cosine similarities, with the paper's pair mining."""

    registry_name = "multi_similarity"

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        epsilon: float = 0.1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.base = float(base)
        self.epsilon = float(epsilon)

    def call(self, labels, embeddings):
        similarities = cosine_similarities(embeddings, embeddings)  # (B, B)
        positives, negatives = class_masks(labels)
        # Mining uses the similarities' values only; the gradient flows through the weighting.
        values = tf.stop_gradient(similarities)
        hardest_positive = tf.reduce_min(
            tf.where(positives, values, fill(float("inf"), values)), axis=1, keepdims=True
        )
        hardest_negative = tf.reduce_max(
            tf.where(negatives, values, fill(-float("inf"), values)), axis=1, keepdims=True
        )
        kept_negatives = tf.logical_and(negatives, values + self.epsilon > hardest_positive)
        kept_positives = tf.logical_and(positives, values - self.epsilon < hardest_negative)
        positive_term = (
            masked_logsumexp(
                -self.alpha * (similarities - self.base), kept_positives, axis=1, add_one=True
            )
            / self.alpha
        )
        negative_term = (
            masked_logsumexp(
                self.beta * (similarities - self.base), kept_negatives, axis=1, add_one=True
            )
            / self.beta
        )
        kept = tf.logical_and(
            tf.reduce_any(kept_positives, axis=1), tf.reduce_any(kept_negatives, axis=1)
        )
        per_anchor = tf.where(kept, positive_term + negative_term, tf.zeros_like(positive_term))
        return tf.reduce_mean(per_anchor)

    def get_config(self):
        return {
            **super().get_config(),
            "alpha": self.alpha,
            "beta": self.beta,
            "base": self.base,
            "epsilon": self.epsilon,
        }
