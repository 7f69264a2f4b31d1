"""Proxy-anchor loss (Kim, Kim, Cho and Kwak, CVPR 2020), as in the authors' code
(tjddus9597/Proxy-Anchor-CVPR2020, ``Proxy_Anchor``).

One learned proxy per class; s(x, p) is the cosine similarity of an embedding and a proxy. With
X_c the batch's samples of class c and P+ the classes present in the batch:

    loss = 1/|P+| sum_{c in P+} log(1 + sum_{x in X_c}     exp(-alpha (s(x, p_c) - margin)))
         + 1/C    sum_{c}       log(1 + sum_{x not in X_c} exp( alpha (s(x, p_c) + margin)))

Proxies (C, D) start as kaiming-normal with fan_out = C as in the authors' code (normal, std
sqrt(2 / C)); they are trained with the model, and the authors give them a 100x learning rate:
``proxy_lr_multiplier`` (also readable as ``lr_multiplier``) tells the trainer. O(B * C).
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from losses.base import ClassVectorLoss, masked_logsumexp
from losses.distances import CosineSimilarity


@keras.saving.register_keras_serializable(package="tfcbir")
class ProxyAnchorLoss(ClassVectorLoss):
    """Proxy-anchor loss; a layer whose proxies train with the model."""

    vector_name = "proxies"

    @property
    def lr_multiplier(self) -> float:
        return self.proxy_lr_multiplier

    @property
    def proxies(self):
        return self.class_vectors

    def initializer(self):
        return keras.initializers.RandomNormal(stddev=math.sqrt(2.0 / self.num_classes))

    def compute(self, labels, embeddings, proxies):
        similarities = CosineSimilarity().pairwise(embeddings, proxies)  # (B, C)
        members = tf.one_hot(labels, self.num_classes, on_value=True, off_value=False)  # (B, C)
        positive = masked_logsumexp(
            -self.alpha * (similarities - self.margin), members, axis=0, add_one=True
        )  # (C,)
        negative = masked_logsumexp(
            self.alpha * (similarities + self.margin), tf.logical_not(members), axis=0, add_one=True
        )
        present = tf.reduce_sum(tf.cast(tf.reduce_any(members, axis=0), positive.dtype))
        return (
            tf.math.divide_no_nan(tf.reduce_sum(positive), present)
            + tf.reduce_sum(negative) / self.num_classes
        )
