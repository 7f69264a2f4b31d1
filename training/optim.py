"""The optimiser and its learning-rate schedule, built from ``train.optimizer``/``lr_schedule``.

Variables train in groups (:class:`VariableGroup`), each at its own multiple of the schedule's
learning rate: the backbone at ``train.optimizer.backbone_lr_multiplier`` (a hub: tower's split by
depth under ``train.optimizer.layer_decay``), the head at 1, a loss's class vectors at the loss's
``lr_multiplier``. One optimiser serves every group: its update of a
variable uses the learning rate times the variable's group multiplier, and so does its decoupled
weight decay. For SGD, Adam and AdamW that is exactly what one optimiser per group would do (the
same step counter and schedule), with one set of state to checkpoint and, under mixed precision,
one loss scale for all gradients.

:func:`trainable_groups` says what trains in which group (image and dual-encoder runs alike);
:func:`create_loss_variables` creates an image loss's class vectors before the groups are made.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import keras
from keras import ops

from nets.hub import tower_parts
from tfcbir import UserError


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


@dataclass(frozen=True)
class VariableGroup:
    """Trainable variables whose learning rate (and weight decay) is ``lr_multiplier`` times
    the schedule's."""

    name: str  # for messages: "backbone", "head", "loss"
    variables: list
    lr_multiplier: float = 1.0
    weight_decay: bool = True  # False: never decayed (a temperature, a bias)


def build_optimizer(
    train: dict, groups: Sequence[VariableGroup] | None = None, mixed: bool = False
) -> keras.optimizers.Optimizer:
    """The optimiser for the validated ``train`` section (its schedule included); wrapped for
    dynamic loss scaling under mixed precision.

    groups: the variables it trains, with their learning-rate multipliers; the optimiser is
        built over them, in order (its state, and so a checkpoint, follows that order). None:
        every variable at the schedule's rate, built on the first ``apply_gradients``.
    """
    groups = list(groups or [])
    optimizer = _optimizer(train)
    multipliers = {}
    for group in groups:
        for variable in group.variables:
            multipliers[optimizer._var_key(variable)] = float(group.lr_multiplier)
    optimizer.lr_multipliers = {k: m for k, m in multipliers.items() if m != 1.0}
    optimizer.no_decay = frozenset(
        optimizer._var_key(variable)
        for group in groups
        if not group.weight_decay
        for variable in group.variables
    )
    if mixed:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    if groups:
        optimizer.build([variable for group in groups for variable in group.variables])
    return optimizer


class _GroupRates:
    """Mixin for a keras optimiser: ``lr_multipliers`` (variable key -> multiplier) scale one
    variable's learning rate; decoupled weight decay (``weight_decay_rate``) is applied here, scaled alike,
    instead of by keras at the unscaled rate."""

    lr_multipliers: dict = {}
    no_decay: frozenset = frozenset()  # keys of variables never decayed
    weight_decay_rate: float | None = None

    def update_step(self, gradient, variable, learning_rate):
        multiplier = self.lr_multipliers.get(self._var_key(variable), 1.0)
        if multiplier != 1.0:
            learning_rate = learning_rate * multiplier
        if self.weight_decay_rate and self._var_key(variable) not in self.no_decay:
            rate = ops.cast(learning_rate, variable.dtype) * ops.cast(
                self.weight_decay_rate, variable.dtype
            )
            variable.assign_sub(variable * rate)
        return super().update_step(gradient, variable, learning_rate)


class GroupedSGD(_GroupRates, keras.optimizers.SGD):
    pass


class GroupedAdam(_GroupRates, keras.optimizers.Adam):
    pass


def _optimizer(train: dict) -> keras.optimizers.Optimizer:
    opt, sched = train["optimizer"], train["lr_schedule"]
    schedule = WarmupDecay(
        opt["lr"],
        train["steps"],
        sched["name"],
        sched["decay_start"],
        sched["warmup_steps"],
        sched["final_lr_fraction"],
    )
    common = {"learning_rate": schedule, "clipnorm": opt["clipnorm"]}
    if opt["name"] == "sgd":
        optimizer = GroupedSGD(momentum=opt["momentum"], **common)
    else:  # adam, adamw: AdamW is Adam with decoupled weight decay, which _GroupRates applies
        optimizer = GroupedAdam(**common)
    decay = opt["weight_decay"]
    if opt["name"] == "adamw" and decay is None:
        decay = 0.004
    optimizer.weight_decay_rate = decay
    return optimizer


def create_loss_variables(loss_fn, model, image_size) -> list:
    """Create an image loss's trainable variables (proxies, class weights) with one call on a
    tiny batch of ``model``'s embeddings, and return them ([] for a loss without)."""
    if not hasattr(loss_fn, "trainable_variables"):
        return []
    images = ops.zeros([2, *image_size, 3], "uint8")
    loss_fn(ops.convert_to_tensor([0, 0], "int32"), model(images, training=False))
    return list(loss_fn.trainable_variables)


def trainable_groups(
    model, loss_fn, loss_variables: list, train_cfg: dict, others: tuple = ()
) -> list[VariableGroup]:
    """What trains, in the optimiser's order: the model's trainable variables (the backbone's
    at ``backbone_lr_multiplier``, split by depth under ``layer_decay``, see
    :func:`layer_decay_groups`; the head's at 1), then ``others`` (a dual encoder's text
    tower, temperature), then the loss's class vectors at the loss's ``lr_multiplier``. Empty
    groups are left out; UserError when no model weight (image or text tower) would train."""
    backbone_model = model.get_layer("backbone")
    backbone = {id(v) for v in backbone_model.trainable_variables}
    model_variables = list(model.trainable_variables)
    multiplier = train_cfg["optimizer"]["backbone_lr_multiplier"]
    backbone_group = VariableGroup(
        "backbone", [v for v in model_variables if id(v) in backbone], multiplier
    )
    decay = train_cfg["optimizer"].get("layer_decay")
    groups = [
        *(
            [backbone_group]
            if decay is None or decay == 1.0
            else layer_decay_groups(backbone_group, backbone_model, decay)
        ),
        VariableGroup("head", [v for v in model_variables if id(v) not in backbone]),
        *others,
        VariableGroup("loss", list(loss_variables), getattr(loss_fn, "lr_multiplier", 1.0)),
    ]
    groups = [group for group in groups if group.variables]
    if not any(group.name.startswith(("backbone", "head", "text")) for group in groups):
        raise UserError(
            "model: nothing to train: the backbone is frozen (model.freeze_backbone: true) and "
            "the head has no weights; use a head with weights or unfreeze the backbone"
        )
    return groups


def pause_variables(optimizer, variables: list) -> Callable[[], None]:
    """Set the learning rate (and so the weight decay) of ``variables`` to 0 in the training
    steps traced from now on (``train.freeze_backbone_steps``): their values stay fixed bit for
    bit while their gradients still feed the optimiser's moments. Returns the function that
    gives them back their multipliers (for the steps traced after it is called)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # under a LossScaleOptimizer
    before = dict(inner.lr_multipliers)
    paused = {inner._var_key(variable): 0.0 for variable in variables}
    inner.lr_multipliers = {**before, **paused}

    def resume() -> None:
        inner.lr_multipliers = before

    return resume


def layer_decay_groups(
    backbone: VariableGroup, tower: keras.Model, decay: float
) -> list[VariableGroup]:
    """``train.optimizer.layer_decay``: the backbone's variables split by depth, as BEiT and
    timm do. With L transformer blocks numbered from 0, block i trains at
    ``decay ** (L - i)``, the stem (patch and position embeddings) at ``decay ** (L + 1)``, the
    layers after the last block (final norm, pooler, projection) at 1; every one times the
    backbone's own ``lr_multiplier``. Groups are named ``backbone.embeddings``,
    ``backbone.block<i>``, ``backbone.top``, shallowest first (empty ones left out).

    tower: the model named "backbone" (a hub: image tower, :func:`nets.hub.tower_parts`).
    UserError for a backbone without transformer blocks.
    """
    stem, blocks = tower_parts(tower)
    if not blocks:
        raise UserError(
            f"train.optimizer.layer_decay: the backbone ({tower.name}) has no transformer "
            "blocks to decay; layer decay is for hub: towers: set it to null"
        )
    depth = len(blocks)
    # Layer id 0 is the stem, i + 1 block i, depth + 1 what follows: rate decay^(depth+1-id).
    parts = [("embeddings", stem)] + [(f"block{i}", block) for i, block in enumerate(blocks)]
    layer_id = {}
    for index, (_, layers) in enumerate(parts):
        for layer in layers:
            for variable in layer.trainable_weights:
                layer_id.setdefault(id(variable), index)
    names = [name for name, _ in parts] + ["top"]
    members: list[list] = [[] for _ in names]
    for variable in backbone.variables:
        members[layer_id.get(id(variable), depth + 1)].append(variable)
    return [
        VariableGroup(
            f"backbone.{name}", variables, backbone.lr_multiplier * decay ** (depth + 1 - index)
        )
        for index, (name, variables) in enumerate(zip(names, members))
        if variables
    ]
