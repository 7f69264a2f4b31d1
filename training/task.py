"""What one kind of model brings to training (:class:`TrainingTask`), and what the kinds share.

The training loop (:mod:`training.trainer`) knows no model kind: it asks a task for its batches,
its models, its variables, its step, what a step logs, how it validates and how it saves its best
weights. Each kind is one class with this interface: :class:`training.image.ImageTask` (an
embedding model and an image loss) and :class:`training.dual.DualEncoderTask` (an image tower and
a text tower with an image-text loss). A new kind (a distillation student, say) is a new class.

A task's life, in the loop's order (the order fixes what the random seed draws, so keep it):

1. ``Task(config, chosen, run, resuming)``: its training images and batches (:class:`TrainData`),
   and what else it needs from the run folder before its models (a tokenizer);
2. ``task.build(pretrained)`` inside the distribution strategy's scope: its models, its loss and
   the loss's variables, and ``variable_groups`` (what trains at which rate);
3. ``task.validation(chosen, splits)``: a function measuring the validation score, or None;
4. ``task.make_step(optimizer, strategy, mixed)`` and ``task.batches(start, stop)``; each step
   returns the floats ``[loss, *parts]``, and ``task.log_row`` turns them into a row's extra
   columns (``task.csv_fields``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from datasets.augment import Augmentation
from datasets.lists import ImageList, Splits, ValidationSplit
from datasets.pipeline import TrainData
from training.optim import VariableGroup


class TrainingTask(Protocol):
    """One model kind's part of training (see the module's docstring for the order of calls)."""

    csv_fields: list[str]  # metrics.csv's columns (runs.folder.CSV_FIELDS, maybe more)
    images: ImageList  # the training images (labels renumbered over the training classes)
    data: TrainData  # their P x K batches
    model: object  # the embedding model (the image tower): checkpoint group "model"
    variable_groups: list[VariableGroup]  # what the optimiser trains, in its order

    def build(self, pretrained: bool) -> None:
        """Make the models, the loss and ``variable_groups`` (inside the strategy's scope)."""

    def variables(self) -> dict[str, list]:
        """The checkpoint groups besides "model" and "optimizer", in the order they are saved:
        "loss" (the loss's weights), "rng" (random states), and any other model's weights."""

    def validation(self, chosen: ValidationSplit, splits: Splits) -> Callable[[], float] | None:
        """A function measuring the current weights' validation score, ``train.validation.metric``
        (higher is better; None: no validation is possible; the last weights are the model)."""

    def describe(self) -> list[str]:
        """Lines logged after the summary: what else this kind trains."""

    def make_step(self, optimizer, strategy, mixed: bool) -> Callable[..., list[float]]:
        """The training step: a per-replica batch -> ``[loss, *parts]`` (floats, replica means)."""

    def batches(self, start_step: int, stop_step: int):
        """The batches ``start_step .. stop_step - 1`` (a tf.data.Dataset of tuples)."""

    def log_row(self, step: int, values: list[float], writer) -> dict[str, str]:
        """The extra metrics.csv columns of a logged step (and their TensorBoard scalars)."""

    def save_weights(self, run) -> None:
        """Write the best weights (``run.best_weights`` and any other model's)."""


def make_train_data(config: dict, images: ImageList, P: int, K: int) -> TrainData:
    """The P x K training batches of ``images`` as ``config["data"]`` describes them."""
    data = config["data"]
    return TrainData(
        images,
        P=P,
        K=K,
        seed=config["seed"],
        image_size=tuple(data["image_size"]),
        resize=tuple(data["resize"]) if data["resize"] else None,
        augment=Augmentation.from_config(data["augment"]),
        cache_max_bytes=int(data["cache_gb"] * (1 << 30)),
    )


def random_states(model) -> list:
    """The model's random-number states (dropout's seed generators), which are variables but
    not weights: checkpointed so that a resumed run draws the dropout masks the uninterrupted
    run would have."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]
