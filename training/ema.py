"""``train.ema``: an exponential moving average of a model's weights (:class:`WeightAverage`).

After optimiser step t (1-based) each average moves towards its weight as timm's ModelEmaV3
does: ``average = d_t * average + (1 - d_t) * weight`` with ``d_t`` from :func:`ema_decay`.
Every weight of the models is averaged, the BatchNorm moving statistics too. The averages are
variables created in the distribution strategy's scope (mirrored like the weights) and are
checkpointed (group ``ema``); the decay is a function of the step, so a resumed run averages
what the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf


def ema_decay(step: int, settings: dict) -> float:
    """The decay of the update after optimiser step ``step`` (1-based), timm's
    ``ModelEmaV3.get_decay`` (min_decay 0, update_after_step 0): 0 at the first step (the
    average becomes the weights), then ``decay``, or with ``warmup``
    ``min(decay, 1 - (1 + (step - 1) / warmup_gamma) ** -warmup_power)``."""
    t = step - 1
    if t <= 0:
        return 0.0
    if not settings["warmup"]:
        return settings["decay"]
    warm = 1.0 - (1.0 + t / settings["warmup_gamma"]) ** -settings["warmup_power"]
    return max(min(warm, settings["decay"]), 0.0)


class WeightAverage:
    """The moving averages of ``weights`` (keras variables), one float variable each.

    settings: ``train.ema`` resolved (config.schema.ema_settings)."""

    def __init__(self, settings: dict, weights: list, strategy):
        self.settings = settings
        self.weights = list(weights)
        with strategy.scope():
            self.variables = [
                tf.Variable(np.asarray(w.numpy()), trainable=False, name=f"ema_{i}")
                for i, w in enumerate(self.weights)
            ]
        self._update = tf.function(self._assign_averages)

    def _assign_averages(self, decay):
        for average, weight in zip(self.variables, self.weights):
            value = tf.convert_to_tensor(weight)
            if average.dtype.is_floating:
                d = tf.cast(decay, average.dtype)
                average.assign(d * average + (1.0 - d) * tf.cast(value, average.dtype))
            else:  # an integer weight (a counter) is copied, as timm does
                average.assign(value)

    def update(self, step: int) -> None:
        """Move the averages after optimiser step ``step`` (1-based)."""
        self._update(tf.constant(ema_decay(step, self.settings), tf.float32))

    @contextlib.contextmanager
    def swapped_in(self):
        """The models hold the averages inside the block, their own weights again after it
        (bit for bit, also on an error)."""
        own = [np.asarray(w.numpy()) for w in self.weights]
        try:
            for weight, average in zip(self.weights, self.variables):
                weight.assign(average.numpy())
            yield
        finally:
            for weight, value in zip(self.weights, own):
                weight.assign(value)
