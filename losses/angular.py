"""Angular loss (Wang, Zhou, Wen, Liu and Lin, "Deep Metric Learning with Angular Loss", ICCV
2017), N-pair form (their Eq. 7 / 8), for any P x K batch.

On inner products (no normalisation: the paper and tf implementations feed the embeddings as
they are; the default head l2-normalises them), for every ordered same-class pair (a, p), a != p,
with n running over all samples of other classes and t = tan^2(alpha):

    f(a, p, n) = 4 t (x_a + x_p) . x_n - 2 (1 + t) x_a . x_p
    l(a, p) = log(1 + sum_n exp(f(a, p, n)))
    loss = mean over pairs of l(a, p) + l2_reg / 2 * mean_i ||x_i||^2

For K = 2 this is the softmax-cross-entropy form of the N-pair angular loss used by common TF
implementations, except that the negatives are every sample of another class. 0 without a pair
or without negatives. The paper's best results add the N-pair loss (L_npair + 2 L_ang); that sum
is not offered here.

Memory O(B^2): with u = 4 t X X^T, sum_n exp(u_an + u_pn) = exp(m_a + m_p) * (E E^T)_ap where
E_an = exp(u_an - m_a) on a's negatives (0 elsewhere) and m_a is the row's largest u over them:
one (B, B) x (B, B) product instead of a (pairs, B) tensor. Exact unless exp(u - m) underflows for
all n of a pair (only with very large embedding norms or alpha close to 90 degrees); such a pair
then adds 0.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from losses.base import MetricLoss, class_masks, fill, l2_penalty, masked_mean
from losses.distances import DotProductSimilarity


@keras.saving.register_keras_serializable(package="tfcbir")
class AngularLoss(MetricLoss):
    """Angular loss over every same-class pair, all other-class samples as negatives."""

    def call(self, labels, embeddings):
        tan2 = math.tan(math.radians(self.alpha)) ** 2
        gram = DotProductSimilarity().pairwise(embeddings)  # (B, B)
        positives, negatives = class_masks(labels)
        u = 4.0 * tan2 * gram
        neg_inf = fill(-float("inf"), u)
        peak = tf.reduce_max(tf.where(negatives, u, neg_inf), axis=1, keepdims=True)  # (B, 1)
        peak = tf.stop_gradient(tf.where(tf.math.is_finite(peak), peak, tf.zeros_like(peak)))
        scaled = tf.exp(tf.where(negatives, u - peak, neg_inf))  # E, 0 off the negatives
        # Entry (a, p): sum over a's negatives n of exp(u_an - m_a) exp(u_pn - m_p); a and p share
        # their negatives when they share a class, the only entries used.
        shared = tf.matmul(scaled, scaled, transpose_b=True)
        usable = tf.logical_and(positives, shared > 0.0)
        log_sum = (
            tf.math.log(tf.where(usable, shared, tf.ones_like(shared))) + peak + tf.transpose(peak)
        )
        per_pair = tf.nn.softplus(log_sum - 2.0 * (1.0 + tan2) * gram)
        per_pair = tf.where(usable, per_pair, tf.zeros_like(per_pair))
        return masked_mean(per_pair, positives) + l2_penalty(embeddings, self.l2_reg)
