"""Multi-class N-pair loss (Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss
Objective", NeurIPS 2016), generalised from N (anchor, positive) pairs to any P x K batch.

On inner products s_ij = x_i . x_j (no normalisation, as in the paper), for every ordered
same-class pair (a, p), a != p, with n running over all samples of other classes:

    l(a, p) = log(1 + sum_n exp(s_an - s_ap))
    loss = mean over pairs of l(a, p) + l2_reg / 2 * mean_i ||x_i||^2

For K = 2 this is the softmax cross-entropy form of tf.contrib's ``npairs_loss``, whose
regulariser 0.25 * reg_lambda * (mean ||anchor||^2 + mean ||positive||^2) equals the term above,
except that the negatives are every sample of another class (anchors and positives alike) rather
than the other classes' positives only. 0 without a pair; pairs without negatives add 0. O(B^2).

Against references (a cross-batch memory), p and n run over the references, and the L2 penalty,
a term of the batch's own embeddings, is left to the batch's loss.
"""

from __future__ import annotations

import keras

from losses.base import MetricLoss, l2_penalty, pair_softmax_loss
from losses.distances import DotProductSimilarity
from losses.miners import PairwiseBatch


@keras.saving.register_keras_serializable(package="tfcbir")
class NPairLoss(MetricLoss):
    """Multi-class N-pair loss over every same-class pair of the batch."""

    takes_references = True

    def call(self, labels, embeddings, ref_labels=None, ref_embeddings=None):
        batch = PairwiseBatch.compare(
            DotProductSimilarity(), labels, embeddings, ref_labels, ref_embeddings
        )  # (B, R)
        loss = pair_softmax_loss(batch.values, batch.positives, batch.negatives)
        if ref_embeddings is not None:
            return loss
        return loss + l2_penalty(embeddings, self.l2_reg)
