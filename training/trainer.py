"""The training loop: batches -> a model kind's step -> checkpoints, logs, the best model.

``train(config)`` starts a run or resumes it from its newest checkpoint. Data order and
augmentation are pure functions of (seed, step) and the learning rate a function of the
optimiser's step, so a resumed run computes what the uninterrupted one would have.

The loop knows no model kind: what is trained is a task (:class:`training.task.TrainingTask`),
:class:`training.image.ImageTask` for an image loss, :class:`training.dual.DualEncoderTask` for
an image-text loss (``clip``, ``siglip``): a dual encoder, whose text tower's weights go into
the checkpoints (group ``text_model``) and ``best.text.weights.h5``, selected on text-to-image
Recall@1 of held-out images' captions. The loop owns checkpoints and resume, validation and the
best weights, metrics.csv and TensorBoard, the progress bar and the distribution strategy; and,
for any kind, ``train.ema`` (a moving average of the models' weights, validated beside them:
:mod:`training.ema`) and ``train.freeze_backbone_steps`` (:class:`StepFunctions`).
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
from training.ema import WeightAverage
from training.image import ImageTask
from training.optim import VariableGroup, build_optimizer, pause_variables
from training.task import TrainingTask
from training.validation import VALIDATION_METRICS, choose_validation

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
    others = task.variables()
    groups = {"model": task.model.weights, "optimizer": optimizer.variables, **others}
    average = None
    if train_cfg["ema"] is not None:
        average = WeightAverage(train_cfg["ema"], model_weights(task, others), strategy)
        groups["ema"] = average.variables  # a group of its own: runs without EMA unchanged
    step, best = _resume(found, groups, run)
    validation = None
    if validate and chosen.validation is not None and train_cfg["validate_every"] > 0:
        validation = task.validation(chosen, splits)
    _summary(config, run, splits, chosen, task, step, strategy)
    log.info(_trainable_line(task.variable_groups))
    steps = StepFunctions(task, optimizer, strategy, mixed, train_cfg["freeze_backbone_steps"])
    batches = task.batches(step, train_cfg["steps"])
    for line in task.describe():
        log.info(line)
    loop = TrainingLoop(config, run, task, groups, optimizer, validation, step, best, average)
    return loop.run(steps, batches, strategy)


def model_weights(task: TrainingTask, others: dict[str, list]) -> list:
    """Every weight of the task's models: the embedding model's, then those of the groups of
    ``task.variables()`` that hold another model's weights (all but "loss" and "rng")."""
    extra = [w for name, ws in others.items() if name not in ("loss", "rng") for w in ws]
    return list(task.model.weights) + extra


class StepFunctions:
    """The training step of each step: with ``train.freeze_backbone_steps`` n, steps 1..n run
    a step traced while the backbone is frozen (its variables' learning rate 0, its
    BatchNormalization layers in inference mode), the later ones a step traced after it thawed.

    A step function reads these settings when TensorFlow traces it, on its first call, so the
    frozen state lasts from the first frozen step's call to the thaw."""

    def __init__(self, task: TrainingTask, optimizer, strategy, mixed: bool, frozen_steps: int):
        self.task, self.optimizer, self.strategy, self.mixed = task, optimizer, strategy, mixed
        self.frozen_steps = frozen_steps
        self.current: Callable[..., list[float]] | None = None
        self.thaw: Callable[[], None] | None = None
        if frozen_steps and not any(
            group.name not in ("backbone", "loss") for group in task.variable_groups
        ):
            raise UserError(
                "train.freeze_backbone_steps: the head has no weights, so nothing of the model "
                "would train while the backbone is frozen; use a head with weights or set 0"
            )

    def at(self, step: int) -> Callable[..., list[float]]:
        """The step function that computes step ``step + 1`` (``step`` done before it)."""
        frozen = step < self.frozen_steps
        if self.current is None or (not frozen and self.thaw is not None):
            if self.thaw is not None:
                self.thaw()
                self.thaw = None
                log.info("after step %d the backbone trains too", step)
            if frozen:
                self.thaw = self._freeze()
            self.current = self.task.make_step(self.optimizer, self.strategy, self.mixed)
        return self.current

    def _freeze(self) -> Callable[[], None]:
        """Freeze the backbone; returns the function that thaws it (as it was before)."""
        log.info("the backbone is frozen for steps 1 to %d", self.frozen_steps)
        backbone = [g for g in self.task.variable_groups if g.name == "backbone"]
        resume_rates = pause_variables(self.optimizer, backbone[0].variables if backbone else [])
        norms = [
            layer
            for layer in sublayers(self.task.model.get_layer("backbone"))
            if isinstance(layer, keras.layers.BatchNormalization)
        ]
        states = [layer.trainable for layer in norms]
        for layer in norms:
            layer.trainable = False  # Keras: inference mode, moving statistics unchanged

        def thaw() -> None:
            resume_rates()
            for layer, state in zip(norms, states):
                layer.trainable = state

        return thaw


def sublayers(layer) -> list:
    """``layer`` and every layer nested in it (through models' ``layers``)."""
    found = [layer]
    for inner in getattr(layer, "layers", []):
        found += sublayers(inner)
    return found


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
        average: WeightAverage | None = None,
    ):
        self.config, self.train_cfg, self.run_folder = config, config["train"], run
        self.task, self.groups, self.optimizer = task, groups, optimizer
        self.validation, self.step, self.best = validation, step, best
        self.average = average
        # The validation score's column of metrics.csv and key of best.json: val_recall@1 or
        # val_map@r (train.validation.metric).
        metric = self.train_cfg["validation"]["metric"]
        self.score_key, self.score_name = VALIDATION_METRICS[metric]

    def run(self, steps: StepFunctions, batches, strategy) -> Result:
        """Run the step functions of ``steps`` on each of ``batches``, split over the
        ``strategy``'s replicas; Ctrl-C or SIGTERM save a checkpoint and end the run
        (``interrupted``)."""
        run = self.run_folder
        self.writer = tf.summary.create_file_writer(str(run.logs))
        fields = [self.score_key if f == "val_recall@1" else f for f in self.task.csv_fields]
        fields += [f"{self.score_key}_ema"] if self.average else []
        self.csv_handle, self.csv_writer = run.open_metrics(self.step, fields)
        self.progress = Progress(self.train_cfg["steps"], start=self.step)
        signal_handler = _raise_on_sigterm()
        last_loss = None  # None: the run had already finished
        interrupted = False
        self.t_start = time.monotonic()
        self.window_t, self.window_step = self.t_start, self.step
        try:
            for batch in batches:
                train_step = steps.at(self.step)
                values = train_step(*distribute.split_per_replica(strategy, *batch))
                if self.average is not None:
                    self.average.update(self.step + 1)
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
            scores = self._validate()
            row[self.score_key] = f"{scores['raw']:.6g}"
            if "ema" in scores:
                row[f"{self.score_key}_ema"] = f"{scores['ema']:.6g}"
        if row is not None:
            self.csv_writer.writerow(row)
            self.csv_handle.flush()
        if self._due(self.train_cfg["checkpoint_every"]):
            if self.validation is None:  # no validation: the newest weights are the model
                self._save_best(step, None, "ema" if self.average else "raw")
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
            self.score_key: "",
            "elapsed_s": f"{now - self.t_start:.1f}",
        }
        row.update(self.task.log_row(step, values, self.writer))
        return row

    def _validate(self) -> dict[str, float]:
        """The validation score (``train.validation.metric``) of the current weights ("raw") and,
        with ``train.ema``, of their moving average ("ema"); the better (the raw weights on a tie)
        is kept as the best weights when it improved on them."""
        step, scores = self.step, {"raw": self.validation()}
        if self.average is not None:
            with self.average.swapped_in():
                scores["ema"] = self.validation()
        with self.writer.as_default(step=step):
            tf.summary.scalar(self.score_key, scores["raw"])
            if "ema" in scores:
                tf.summary.scalar(f"{self.score_key}_ema", scores["ema"])
        choice = max(scores, key=lambda name: (scores[name], name == "raw"))
        score = scores[choice]
        # A best of another metric (a checkpoint of a run that selected on it) is replaced.
        previous = None if self.best is None else self.best.get(self.score_key)
        improved = previous is None or score > previous
        ema_text = f" (EMA {scores['ema']:.4f})" if "ema" in scores else ""
        self.progress.note(
            f"step {step}: validation {self.score_name} {scores['raw']:.4f}{ema_text}"
            + (" (best so far)" if improved else "")
        )
        if improved:
            self._save_best(step, score, choice)
        return scores

    def _save_best(self, step: int, score: float | None, weights: str) -> None:
        """Save the raw weights or (weights "ema") their moving average as the best, and
        best.json: the step, the validation score under its key (``val_recall@1`` or
        ``val_map@r``) and, only with ``train.ema``, which of the two weights it is."""
        best = {"step": step, self.score_key: score}
        if self.average is not None:
            best["weights"] = weights
        self.best = best
        if weights == "ema":
            with self.average.swapped_in():
                self.task.save_weights(self.run_folder)
        else:
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
