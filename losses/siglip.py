"""The SigLIP loss (Zhai, Mustafa, Kolesnikov and Beyer, "Sigmoid Loss for Language Image
Pre-Training", ICCV 2023): an independent binary classification of every image-text pair, as
big_vision's ``sigmoid`` loss (``big_vision/trainers/proj/image_text/siglip.py``).

With x_i, y_j the L2-normalised embeddings, a learned temperature exp(t') (t' initialised at
log(logit_scale), the paper's log 10) and bias b (initialised at ``bias``, the paper's -10),
logits l_ij = exp(t') * x_i . y_j + b, z_ij = 1 for the matching pair (i = j) and -1 otherwise,
and A the allowed pairs (every pair but (i, j), i != j, of one group):

    loss = 1/B * sum_{(i, j) in A} -log sigmoid(z_ij * l_ij)

(the sum over a row's texts, averaged over the B images, as big_vision). Without such pairs this
is big_vision's loss exactly. O(B^2).
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from losses.base import ImageTextLoss, constant


@keras.saving.register_keras_serializable(package="tfcbir")
class SigLipLoss(ImageTextLoss):
    """Pairwise sigmoid image-text loss with a learned temperature and bias."""

    # The parameters are the weights' initial values: logit_scale and bias name the weights.
    param_attributes = {"logit_scale": "initial_logit_scale", "bias": "initial_bias"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_logit_scale = self.add_weight(
            shape=(),
            initializer=constant(math.log(self.initial_logit_scale)),
            name="log_logit_scale",
        )
        self.bias = self.add_weight(shape=(), initializer=constant(self.initial_bias), name="bias")

    @property
    def logit_scale(self) -> float:
        """exp(t'), the current temperature."""
        return float(math.exp(float(keras.ops.convert_to_numpy(self.log_logit_scale))))

    def compute(self, similarities, left_out):
        dtype = similarities.dtype
        logits = tf.exp(tf.cast(self.log_logit_scale, dtype)) * similarities
        logits += tf.cast(self.bias, dtype)
        signs = 2.0 * tf.eye(tf.shape(logits)[0], dtype=dtype) - 1.0
        terms = tf.nn.softplus(-signs * logits)  # -log sigmoid(z * l)
        terms = tf.where(left_out, tf.zeros_like(terms), terms)
        return tf.reduce_sum(terms) / tf.cast(tf.shape(logits)[0], dtype)
