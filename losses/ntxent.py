"""NT-Xent, the normalised temperature-scaled cross-entropy (Chen et al., SimCLR, ICML 2020), with
labels: pytorch-metric-learning's ``NTXentLoss`` (the supervised form, every same-class pair is a
positive).

On cosine similarities s_ij divided by the temperature tau, for every ordered same-class pair
(a, p), a != p, with n running over all samples of other classes:

    l(a, p) = -log( exp(s_ap / tau) / (exp(s_ap / tau) + sum_n exp(s_an / tau)) )
    loss = mean over pairs (0 without a pair; pairs without negatives add 0). O(B^2).
"""

from __future__ import annotations

import keras

from losses.base import MetricLoss, class_masks, pair_softmax_loss
from losses.distances import CosineSimilarity


@keras.saving.register_keras_serializable(package="tfcbir")
class NTXentLoss(MetricLoss):
    """NT-Xent with every same-class pair as a positive."""

    def call(self, labels, embeddings):
        logits = CosineSimilarity().pairwise(embeddings) / self.temperature  # (B, B)
        positives, negatives = class_masks(labels)
        return pair_softmax_loss(logits, positives, negatives)
