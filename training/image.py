"""An embedding model trained with an image loss on P x K batches (:class:`ImageTask`).

Labels are renumbered over the training classes only: a per-class loss gets one vector per class
it trains on (test classes of a class-disjoint split get none). The model is selected on the
validation images' Recall@1 (:class:`training.validation.Validator`), its best weights go to
``best.weights.h5``.

With ``train.memory.size`` > 0 the loss also compares the batch with a cross-batch memory of
earlier embeddings (:class:`losses.memory.CrossBatchMemory`), checkpointed as the group
"memory" (absent without memory, so older checkpoints load unchanged).
"""

from __future__ import annotations

import functools

import tensorflow as tf

import config as cfg
import losses
import nets
from datasets.lists import Splits, ValidationSplit
from losses.memory import CrossBatchMemory
from runs.folder import CSV_FIELDS, RunFolder
from tfcbir.files import atomic_output
from training import distribute, validation
from training.optim import VariableGroup, create_loss_variables, trainable_groups
from training.task import make_train_data, random_states


class ImageTask:
    """The image embedder's part of training (:class:`training.task.TrainingTask`)."""

    csv_fields = CSV_FIELDS

    def __init__(self, config: dict, chosen: ValidationSplit, run: RunFolder, resuming: bool):
        self.config = config
        batch = config["train"]["batch"]
        self.images = chosen.train.compact()
        self.data = make_train_data(config, self.images, batch["P"], batch["K"])

    def build(self, pretrained: bool) -> None:
        config = self.config
        image_size = config["data"]["image_size"]
        self.model = nets.build_embedding_model(
            config["model"], tuple(image_size), pretrained=pretrained
        )
        self.loss = losses.get(config["loss"], num_classes=len(self.images.classes))
        self.loss_variables = create_loss_variables(self.loss, self.model, image_size)
        self.variable_groups = trainable_groups(
            self.model, self.loss, self.loss_variables, config["train"]
        )
        self.memory = make_memory(config["train"]["memory"], self.model.output_shape[-1])

    def variables(self) -> dict[str, list]:
        groups = {"loss": self.loss_variables, "rng": random_states(self.model)}
        if self.memory is not None:
            groups["memory"] = self.memory.variables
        return groups

    def validation(self, chosen: ValidationSplit, splits: Splits):
        config = self.config
        validator = validation.Validator(
            chosen.validation,
            config["data"],
            config["train"]["validation"]["max_images"],
            config["seed"],
            normalized=cfg.normalized_embeddings(config),
            # Mirror evaluation: class-disjoint splits leave one out, others search training.
            gallery=None if splits.class_disjoint else chosen.train,
            metric=config["train"]["validation"]["metric"],
        )
        return functools.partial(validator.score, self.model)

    def describe(self) -> list[str]:
        return []

    def make_step(self, optimizer, strategy, mixed: bool):
        if hasattr(self.loss, "seed_draws"):  # a drawing miner draws from (seed, step)
            self.loss.seed_draws(
                self.config["seed"], lambda: tf.convert_to_tensor(optimizer.iterations)
            )
        step = make_step(
            self.model,
            self.loss,
            optimizer,
            self.variable_groups,
            strategy,
            mixed,
            self.memory,
        )
        return lambda images, labels: [float(step(images, labels))]

    def batches(self, start_step: int, stop_step: int) -> tf.data.Dataset:
        return self.data.dataset(start_step, stop_step)

    def log_row(self, step: int, values: list[float], writer) -> dict[str, str]:
        return {}

    def save_weights(self, run: RunFolder) -> None:
        with atomic_output(run.best_weights) as tmp:
            self.model.save_weights(tmp)


def make_memory(memory: dict, dim: int) -> CrossBatchMemory | None:
    """The cross-batch memory ``train.memory`` describes, for dim-dimensional embeddings (None:
    off). Call inside the strategy's scope."""
    if not memory["size"]:
        return None
    return CrossBatchMemory(memory["size"], dim, memory["start_step"], memory["weight"])


def make_step(
    model,
    loss_fn,
    optimizer,
    groups: list[VariableGroup],
    strategy,
    mixed: bool,
    memory: CrossBatchMemory | None = None,
):
    """One training step ``step(images, labels)`` -> the loss (the replicas' mean) on a
    (per-replica) batch: the loss of the whole batch, its gradients for the groups' variables,
    one optimiser update (each group at its learning rate). With a ``memory``, the loss adds the
    batch against the memory, and the whole batch is enqueued after the update."""
    variables = [variable for group in groups for variable in group.variables]
    replicas = strategy.num_replicas_in_sync

    def replica_step(images, labels):
        step = tf.convert_to_tensor(optimizer.iterations)  # this step's 0-based index
        with tf.GradientTape() as tape:
            embeddings = tf.cast(model(images, training=True), tf.float32)
            # The loss sees the whole batch; the optimisers sum the replicas' gradients.
            labels, embeddings = distribute.gather(labels), distribute.gather(embeddings)
            if memory is None:
                loss = loss_fn(labels, embeddings)
            else:
                loss = memory.loss(loss_fn, labels, embeddings)
            total = loss + tf.add_n(model.losses) if model.losses else loss
            total = total / replicas
            if mixed:
                total = optimizer.scale_loss(total)
        grads = tape.gradient(total, variables)
        optimizer.apply_gradients(zip(grads, variables))
        if memory is not None:
            memory.enqueue_at(step, labels, embeddings)
        return loss

    @tf.function
    def train_step(images, labels):
        losses_per_replica = strategy.run(replica_step, args=(images, labels))
        return strategy.reduce("MEAN", losses_per_replica, axis=None)

    return train_step
