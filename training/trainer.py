"""The training loop: batches -> a model kind's step -> checkpoints, logs, the best model.

``train(config)`` starts a run or resumes it from its newest checkpoint. Data order and
augmentation are pure functions of (seed, step) and the learning rate a function of the
optimiser's step, so a resumed run computes what the uninterrupted one would have.

The loop knows no model kind: what is trained is a task (:class:`training.task.TrainingTask`),
:class:`training.image.ImageTask` for an image loss, :class:`training.dual.DualEncoderTask` for
an image-text loss (``clip``, ``siglip``): a dual encoder, whose text tower's weights go into
the checkpoints (group ``text_model``) and ``best.text.weights.h5``, selected on text-to-image
Recall@1 of held-out images' captions. The loop owns checkpoints and resume, validation and the
best weights, metrics.csv and TensorBoard, the progress bar and the distribution strategy.
"""

from __future__ import annotations

import logging
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import config as cfg
import losses
from datasets.lists import Splits, ValidationSplit, load_splits
from runs import checkpoint
from runs.folder import RunFolder
from tfcbir import UserError
from tfcbir.progress import Progress
from training import distribute
from training.dual import DualEncoderTask
from training.image import ImageTask
from training.optim import VariableGroup, build_optimizer
from training.task import TrainingTask
from training.validation import choose_validation

log = logging.getLogger("tfcbir")


@dataclass
class Result:
    run: RunFolder
    step: int
    loss: float | None  # the last step's loss; None when no step was left to run
    best: dict | None
    interrupted: bool = False


def train(config: dict, *, restart: bool = False) -> Result:
    """Train (or resume) the run of a resolved config; returns where it ended. The global
    mixed-precision policy it may set is set back to the one it found, also on error."""
    train_cfg = config["train"]
    strategy = distribute.make_strategy(train_cfg["distribute"])
    distribute.check_batch_split(train_cfg["batch"]["P"], strategy.num_replicas_in_sync)
    data = config["data"]
    splits = load_splits(cfg.data_root(config), data["split"], config["seed"], data["format"])
    chosen = choose_validation(config, splits)
    config = with_validation_source(config, chosen.source)
    shared = RunFolder.of(config)
    # Of several workers one writes the run; the others resume from it and write elsewhere.
    chief = distribute.is_chief(strategy)
    run = shared if chief else RunFolder(Path(tempfile.mkdtemp(prefix="tfcbir-worker-")))
    run.prepare(config, restart)
    tf.keras.utils.set_random_seed(config["seed"])
    policy = keras.mixed_precision.global_policy()
    try:
        mixed = _mixed_precision(train_cfg["mixed_precision"])
        found = None if restart else checkpoint.latest(shared.checkpoints)
        return _train(config, run, found, strategy, mixed, splits, chosen, validate=chief)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def with_validation_source(config: dict, source: str) -> dict:
    """``config`` with ``train.validation.source`` resolved (auto -> holdout, or none without
    validation), as the run folder records it."""
    train_cfg = config["train"]
    validation = {**train_cfg["validation"], "source": source}
    return {**config, "train": {**train_cfg, "validation": validation}}


def task_kind(config: dict) -> type[TrainingTask]:
    """The task class of the config's model kind: a dual encoder for an image-text loss, else
    an image embedder."""
    return DualEncoderTask if losses.is_image_text(config["loss"]) else ImageTask


def _train(
    config: dict,
    run: RunFolder,
    found: checkpoint.Checkpoint | None,
    strategy,
    mixed: bool,
    splits: Splits,
    chosen: ValidationSplit,
    validate: bool,
) -> Result:
    train_cfg = config["train"]
    task = task_kind(config)(config, chosen, run, resuming=found is not None)
    with strategy.scope():
        task.build(pretrained=found is None)
        optimizer = build_optimizer(train_cfg, task.variable_groups, mixed=mixed)
    groups = {"model": task.model.weights, "optimizer": optimizer.variables, **task.variables()}
    step, best = _resume(found, groups, run)
    validation = None
    if validate and chosen.validation is not None and train_cfg["validate_every"] > 0:
        validation = task.validation(chosen, splits)
    _summary(config, run, splits, chosen, task, step, strategy)
    log.info(_trainable_line(task.variable_groups))
    train_step = task.make_step(optimizer, strategy, mixed)
    batches = task.batches(step, train_cfg["steps"])
    for line in task.describe():
        log.info(line)
    loop = TrainingLoop(config, run, task, groups, optimizer, validation, step, best)
    return loop.run(train_step, batches, strategy)


def _resume(found: checkpoint.Checkpoint | None, groups: dict[str, list], run: RunFolder):
    """Restore ``groups`` from the checkpoint ``found``: ``(step, best)`` to go on from, or
    ``(0, None)`` without one."""
    if found is None:
        return 0, None
    for name, variables in groups.items():
        if name == "rng" and name not in found.groups:
            continue  # saved before random states were: dropout masks differ from here on
        checkpoint.restore(variables, found.groups.get(name, []), name, found.path)
    log.info("resuming %s from step %d (%s)", run.path, found.step, found.path.name)
    return found.step, found.meta.get("best")


class TrainingLoop:
    """The steps of a run from ``step`` to ``train.steps``, and after each what is due: a row of
    metrics.csv (and TensorBoard scalars), validation and the best weights, a checkpoint.

    groups: the checkpoint's variables by group; validation: a function measuring the current
    weights' Recall@1 (None: the newest weights are the model, saved with each checkpoint)."""

    def __init__(
        self,
        config: dict,
        run: RunFolder,
        task: TrainingTask,
        groups: dict[str, list],
        optimizer,
        validation: Callable[[], float] | None,
        step: int,
        best: dict | None,
    ):
        self.config, self.train_cfg, self.run_folder = config, config["train"], run
        self.task, self.groups, self.optimizer = task, groups, optimizer
        self.validation, self.step, self.best = validation, step, best

    def run(self, train_step: Callable[..., list[float]], batches, strategy) -> Result:
        """Run ``train_step`` on each of ``batches``, split over the ``strategy``'s replicas;
        Ctrl-C or SIGTERM save a checkpoint and end the run (``interrupted``)."""
        run = self.run_folder
        self.writer = tf.summary.create_file_writer(str(run.logs))
        self.csv_handle, self.csv_writer = run.open_metrics(self.step, self.task.csv_fields)
        self.progress = Progress(self.train_cfg["steps"], start=self.step)
        signal_handler = _raise_on_sigterm()
        last_loss = None  # None: the run had already finished
        interrupted = False
        self.t_start = time.monotonic()
        self.window_t, self.window_step = self.t_start, self.step
        try:
            for batch in batches:
                values = train_step(*distribute.split_per_replica(strategy, *batch))
                self.step += 1
                last_loss = values[0]
                self._after_step(values)
        except KeyboardInterrupt:
            interrupted = True
            self.progress.note(f"interrupted at step {self.step}; saving a checkpoint")
            self._save_checkpoint()
        finally:
            self.progress.close()
            self.csv_handle.close()
            self.writer.close()
            signal.signal(signal.SIGTERM, signal_handler)
        if interrupted:
            log.warning(
                "run the same command to resume %s from step %d", self.config["name"], self.step
            )
        return Result(run, self.step, last_loss, self.best, interrupted)

    def _due(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.train_cfg["steps"]

    def _after_step(self, values: list[float]) -> None:
        """values: the step's ``[loss, *parts]``."""
        step, loss_value = self.step, values[0]
        if not np.isfinite(loss_value):
            raise UserError(
                f"the loss became {loss_value} at step {step}; lower "
                "train.optimizer.lr or check the data"
            )
        row = self._log_row(values) if self._due(self.train_cfg["log_every"]) else None
        if self.validation is not None and self._due(self.train_cfg["validate_every"]):
            row = row or {"step": step, "loss": f"{loss_value:.6g}"}
            row["val_recall@1"] = f"{self._validate():.6g}"
        if row is not None:
            self.csv_writer.writerow(row)
            self.csv_handle.flush()
        if self._due(self.train_cfg["checkpoint_every"]):
            if self.validation is None:  # no validation: the newest weights are the model
                self._save_best({"step": step, "val_recall@1": None})
            self._save_checkpoint()
        self.progress.update(step, loss=loss_value)

    def _log_row(self, values: list[float]) -> dict[str, str]:
        """A logged step's row of metrics.csv; its scalars written to TensorBoard."""
        step, loss_value = self.step, values[0]
        now = time.monotonic()
        rate = (step - self.window_step) / max(now - self.window_t, 1e-9)
        self.window_t, self.window_step = now, step
        lr = float(self.optimizer.learning_rate)
        with self.writer.as_default(step=step):
            tf.summary.scalar("loss", loss_value)
            tf.summary.scalar("learning_rate", lr)
            tf.summary.scalar("steps_per_second", rate)
        row = {
            "step": step,
            "loss": f"{loss_value:.6g}",
            "lr": f"{lr:.6g}",
            "steps_per_s": f"{rate:.4g}",
            "val_recall@1": "",
            "elapsed_s": f"{now - self.t_start:.1f}",
        }
        row.update(self.task.log_row(step, values, self.writer))
        return row

    def _validate(self) -> float:
        """The current weights' validation Recall@1; the best weights kept when it improved."""
        step, recall = self.step, self.validation()
        with self.writer.as_default(step=step):
            tf.summary.scalar("val_recall@1", recall)
        improved = self.best is None or recall > self.best["val_recall@1"]
        self.progress.note(
            f"step {step}: validation Recall@1 {recall:.4f}"
            + (" (best so far)" if improved else "")
        )
        if improved:
            self._save_best({"step": step, "val_recall@1": recall})
        return recall

    def _save_best(self, best: dict) -> None:
        self.best = best
        self.task.save_weights(self.run_folder)
        self.run_folder.write_best(best)

    def _save_checkpoint(self) -> None:
        meta = {"best": self.best, "config_hash": cfg.config_hash(self.config)}
        checkpoint.save(
            self.run_folder.checkpoints,
            self.step,
            self.groups,
            meta,
            self.train_cfg["keep_checkpoints"],
        )


def _mixed_precision(wanted: bool) -> bool:
    """mixed_float16 where it pays (GPUs); a warning and float32 elsewhere."""
    if not wanted:
        return False
    if not tf.config.list_physical_devices("GPU"):
        log.warning("train.mixed_precision: no GPU here; training in float32")
        return False
    keras.mixed_precision.set_global_policy("mixed_float16")
    return True


def _raise_on_sigterm():
    """kill (SIGTERM) ends a run like Ctrl-C: a checkpoint is saved first."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return signal.getsignal(signal.SIGTERM)


def _validation_line(chosen: ValidationSplit, splits: Splits) -> str:
    if chosen.validation is None:
        return "validation: none (the last weights are the model)"
    images = chosen.validation
    classes = len(np.unique(images.labels))
    if chosen.source == "test":
        where = "the test split (test metrics will be optimistic)"
    elif splits.class_disjoint:
        where = "whole classes held out of training"
    else:
        where = "images of each class held out of training"
    return f"validation: {len(images)} images of {classes} classes, {where}"


def _summary(config, run, splits, chosen, task: TrainingTask, step: int, strategy) -> None:
    train_images, model = task.images, task.model
    skipped = len(getattr(task.data, "skipped", []))
    parts = [
        f"run {config['name']} in {run.path}",
        f"data {cfg.data_root(config)} ({splits.layout}, {splits.kind} split): "
        f"{len(train_images)} training images of {len(np.unique(train_images.labels))} "
        f"classes" + (f", {skipped} unreadable skipped" if skipped else ""),
        _validation_line(chosen, splits),
        f"model {config['model']['backbone']} + {config['model']['head']} -> "
        f"{model.output_shape[-1]}-d, {model.count_params():,} parameters",
        f"loss {config['loss']}",
        f"devices: {strategy.num_replicas_in_sync} replica(s)"
        + (
            ", mixed precision"
            if keras.mixed_precision.global_policy().name == "mixed_float16"
            else ""
        ),
        f"{'resuming at' if step else 'starting at'} step {step} of {config['train']['steps']}",
    ]
    for line in parts:
        log.info(line)


def _trainable_line(groups: list[VariableGroup]) -> str:
    parts = []
    for group in groups:
        count = sum(int(np.prod(v.shape)) for v in group.variables)
        rate = "" if group.lr_multiplier == 1.0 else f" at lr x {group.lr_multiplier:g}"
        parts.append(f"{group.name} {count:,}{rate}")
    return "trainable parameters: " + ", ".join(parts)
