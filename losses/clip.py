"""The CLIP loss (Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", 2021): symmetric cross-entropy over a batch's image-text similarities, with a
learned temperature, as open_clip's ``ClipLoss``.

With x_i, y_j the L2-normalised image and text embeddings, s = exp(t) the logit scale (t
trainable, initialised at log(1 / temperature), kept in [0, log(max_logit_scale)] after every
update, as open_clip clamps it), logits l_ij = s * x_i . y_j and A the allowed pairs (every pair
but (i, j), i != j, of one group):

    loss = 1/2 * mean_i [ log sum_{j in A_i} exp(l_ij) - l_ii ]     (image -> text)
         + 1/2 * mean_j [ log sum_{i in A_j} exp(l_ij) - l_jj ]     (text -> image)

Without such pairs (every group distinct) this is open_clip's ClipLoss exactly. O(B^2).
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from losses.base import ImageTextLoss, constant, masked_logsumexp


@keras.saving.register_keras_serializable(package="tfcbir")
class ClampLogScale(keras.constraints.Constraint):
    """Keeps a log logit scale in [0, log(max_scale)] (open_clip's ``clamp_(0, log(100))``)."""

    def __init__(self, max_scale: float = 100.0):
        self.max_scale = float(max_scale)

    def __call__(self, w):
        return keras.ops.clip(w, 0.0, math.log(self.max_scale))

    def get_config(self):
        return {"max_scale": self.max_scale}


@keras.saving.register_keras_serializable(package="tfcbir")
class ClipLoss(ImageTextLoss):
    """Symmetric image-text cross-entropy with a learned, clamped logit scale."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # temperature, max_logit_scale, learn_temperature
        self.log_logit_scale = self.add_weight(
            shape=(),
            initializer=constant(math.log(1.0 / self.temperature)),
            trainable=self.learn_temperature,
            constraint=ClampLogScale(self.max_logit_scale),
            name="log_logit_scale",
        )

    @property
    def logit_scale(self) -> float:
        """s = exp(t), the current logit scale (1 / temperature)."""
        return float(math.exp(float(keras.ops.convert_to_numpy(self.log_logit_scale))))

    def compute(self, similarities, left_out):
        logits = tf.exp(tf.cast(self.log_logit_scale, similarities.dtype)) * similarities
        allowed = tf.logical_not(left_out)
        matched = tf.linalg.diag_part(logits)
        image_to_text = masked_logsumexp(logits, allowed, axis=1) - matched
        text_to_image = masked_logsumexp(logits, allowed, axis=0) - matched
        return 0.5 * (tf.reduce_mean(image_to_text) + tf.reduce_mean(text_to_image))
