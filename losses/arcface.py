"""ArcFace, additive angular margin loss (Deng, Guo, Xue and Zafeiriou, CVPR 2019), as in the
authors' insightface code.

A learned weight vector per class; theta_c is the angle between an embedding and w_c (cosine of
the l2-normalised vectors). The target class's logit gets the angular margin:

    logit_c = scale * cos(theta_c + margin)   for the sample's class, if theta_c + margin <= pi
              scale * (cos(theta_c) - margin * sin(margin))   for the class, past that point
              scale * cos(theta_c)            for the other classes
    loss = mean softmax cross-entropy of the logits

The fallback past pi keeps the logit decreasing in theta (insightface's ``th``/``mm``, pml's
ArcFaceLoss). margin is in radians: the paper's 0.5 (pml's default is 28.6 degrees, the same
angle). Class weights (C, D) start as normal(0, 0.01) as in insightface and train at the model's
learning rate. O(B * C).
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from losses.base import ClassVectorLoss
from losses.distances import CosineSimilarity


@keras.saving.register_keras_serializable(package="tfcbir")
class ArcFaceLoss(ClassVectorLoss):
    """ArcFace loss; a layer whose class weights train with the model."""

    vector_name = "class_weights"

    @property
    def class_weights(self):
        return self.class_vectors

    def initializer(self):
        return keras.initializers.RandomNormal(stddev=0.01)

    def compute(self, labels, embeddings, class_weights):
        similarities = CosineSimilarity().pairwise(embeddings, class_weights)  # (B, C)
        cosine = tf.clip_by_value(similarities, -1.0, 1.0)
        # sin(theta) >= 0 for theta in [0, pi]; the floor keeps sqrt's gradient finite at 0.
        sine = tf.sqrt(tf.maximum(1.0 - tf.square(cosine), 1e-12))
        with_margin = cosine * math.cos(self.margin) - sine * math.sin(self.margin)
        # cos(theta) > cos(pi - m) <=> theta + m < pi; beyond, a linear continuation.
        with_margin = tf.where(
            cosine > math.cos(math.pi - self.margin),
            with_margin,
            cosine - self.margin * math.sin(self.margin),
        )
        target = tf.one_hot(labels, self.num_classes, on_value=True, off_value=False)  # (B, C)
        logits = self.scale * tf.where(target, with_margin, cosine)
        per_sample = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        return tf.reduce_mean(per_sample)
