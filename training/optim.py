"""The optimiser and its learning-rate schedule, built from ``train.optimizer``/``lr_schedule``."""

from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfcbir")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 over ``warmup_steps``, then constant, linear or cosine decay.

    Decay runs from ``decay_start`` to ``total_steps`` and ends at ``final_fraction * lr``. A pure
    function of the optimiser's step, so a resumed run follows the same schedule.
    """

    def __init__(
        self,
        lr: float,
        total_steps: int,
        kind: str = "constant",
        decay_start: int = 0,
        warmup_steps: int = 0,
        final_fraction: float = 0.0,
    ):
        self.lr = float(lr)
        self.total_steps = int(total_steps)
        self.kind = kind
        self.decay_start = int(decay_start)
        self.warmup_steps = int(warmup_steps)
        self.final_fraction = float(final_fraction)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        if self.kind == "constant":
            rate = ops.ones_like(step)
        else:
            span = max(self.total_steps - self.decay_start, 1)
            progress = ops.clip((step - self.decay_start) / span, 0.0, 1.0)
            if self.kind == "linear":
                shape = 1.0 - progress
            else:
                shape = 0.5 * (1.0 + ops.cos(math.pi * progress))
            rate = self.final_fraction + (1.0 - self.final_fraction) * shape
        if self.warmup_steps > 0:
            rate = rate * ops.minimum((step + 1.0) / self.warmup_steps, 1.0)
        return self.lr * rate

    def get_config(self):
        return {
            "lr": self.lr,
            "total_steps": self.total_steps,
            "kind": self.kind,
            "decay_start": self.decay_start,
            "warmup_steps": self.warmup_steps,
            "final_fraction": self.final_fraction,
        }


def build_optimizer(
    train: dict, lr_multiplier: float = 1.0, mixed: bool = False
) -> keras.optimizers.Optimizer:
    """The optimiser for the validated ``train`` section (its schedule included); wrapped for
    dynamic loss scaling under mixed precision."""
    optimizer = _optimizer(train, lr_multiplier)
    return keras.optimizers.LossScaleOptimizer(optimizer) if mixed else optimizer


def _optimizer(train: dict, lr_multiplier: float) -> keras.optimizers.Optimizer:
    opt, sched = train["optimizer"], train["lr_schedule"]
    schedule = WarmupDecay(
        opt["lr"] * lr_multiplier,
        train["steps"],
        sched["name"],
        sched["decay_start"],
        sched["warmup_steps"],
        sched["final_lr_fraction"],
    )
    common = {"learning_rate": schedule, "clipnorm": opt["clipnorm"]}
    if opt["name"] == "sgd":
        return keras.optimizers.SGD(
            momentum=opt["momentum"], weight_decay=opt["weight_decay"], **common
        )
    if opt["name"] == "adamw":
        decay = 0.004 if opt["weight_decay"] is None else opt["weight_decay"]
        return keras.optimizers.AdamW(weight_decay=decay, **common)
    return keras.optimizers.Adam(weight_decay=opt["weight_decay"], **common)
