"""The training loop: P x K batches -> embedding model + loss -> checkpoints, logs, best model.

``train(config)`` starts a run or resumes it from its newest checkpoint. Data order and
augmentation are pure functions of (seed, step) and the learning rate a function of the
optimiser's step, so a resumed run computes what the uninterrupted one would have.

With an image-text loss (``clip``, ``siglip``) the run trains a dual encoder: the same loop over
image-caption batches, with the text tower beside the embedding model (:mod:`training.dual`);
its weights go into the checkpoints (group ``text_model``) and ``best.text.weights.h5``, and
the model is selected on text-to-image Recall@1 of held-out images' captions.
"""

from __future__ import annotations

import logging
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import config as cfg
import losses
import nets
from datasets.lists import Splits, ValidationSplit, load_splits
from datasets.pipeline import TrainData
from runs import checkpoint
from runs.folder import DUAL_CSV_FIELDS, RunFolder
from tfcbir import UserError
from tfcbir.files import atomic_output
from tfcbir.progress import Progress
from training import distribute, dual, validation
from training.optim import VariableGroup, build_optimizer, create_loss_variables, trainable_groups
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
    """Train (or resume) the run of a resolved config; returns where it ended."""
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
    mixed = _mixed_precision(train_cfg["mixed_precision"])
    try:
        found = None if restart else checkpoint.latest(shared.checkpoints)
        return _train(config, run, found, strategy, mixed, splits, chosen, validate=chief)
    finally:
        if mixed:
            keras.mixed_precision.set_global_policy("float32")


def with_validation_source(config: dict, source: str) -> dict:
    """``config`` with ``train.validation.source`` resolved (auto -> holdout, or none without
    validation), as the run folder records it."""
    train_cfg = config["train"]
    validation = {**train_cfg["validation"], "source": source}
    return {**config, "train": {**train_cfg, "validation": validation}}


def _train(
    config: dict,
    run: RunFolder,
    found,
    strategy,
    mixed: bool,
    splits: Splits,
    chosen: ValidationSplit,
    validate: bool,
) -> Result:
    data, model_cfg, train_cfg = config["data"], config["model"], config["train"]
    P, K = train_cfg["batch"]["P"], train_cfg["batch"]["K"]
    is_dual = losses.is_image_text(config["loss"])

    # Labels renumbered over the training classes only: a per-class loss gets one vector per
    # class it trains on (test classes of a class-disjoint split get none).
    train_images, val_images = chosen.train.compact(), chosen.validation
    pairs = table = None
    if is_dual:  # only captioned images train a dual encoder
        table = dual.caption_table(config)
        pairs = dual.caption_pairs(config, train_images, table)
        dual.check_captions(pairs, train_images, config)
        train_images = pairs.images
        if len(np.unique(train_images.labels)) == 1:  # no classes: plain shuffled batches
            P, K = 1, P * K
    train_data = TrainData(
        train_images,
        P=P,
        K=K,
        seed=config["seed"],
        image_size=tuple(data["image_size"]),
        resize=tuple(data["resize"]) if data["resize"] else None,
        flip=data["augment"]["flip"],
        crop=data["augment"]["crop"],
        cache_max_bytes=int(data["cache_gb"] * (1 << 30)),
    )
    text_tower = None
    if is_dual:
        tokenizer = dual.run_tokenizer(config, run, pairs, resuming=found is not None)

    with strategy.scope():
        # A CLIP or SigLIP preset's two towers are loaded once and share it.
        hub_backbone = (
            nets.shared_hub_backbone(model_cfg, data["image_size"], pretrained=found is None)
            if is_dual
            else None
        )
        model = nets.build_embedding_model(
            model_cfg,
            tuple(data["image_size"]),
            pretrained=found is None,
            hub_backbone=hub_backbone,
        )
        if is_dual:
            text_tower, loss_fn, loss_variables, variable_groups = dual.build(
                config, model, tokenizer, len(train_images.classes), found is None, hub_backbone
            )
            pairs.tokenize(text_tower.tokenizer)
        else:
            loss_fn = losses.get(config["loss"], num_classes=len(train_images.classes))
            loss_variables = create_loss_variables(loss_fn, model, data["image_size"])
            variable_groups = trainable_groups(model, loss_fn, loss_variables, train_cfg)
        optimizer = build_optimizer(train_cfg, variable_groups, mixed=mixed)

    groups = {
        "model": model.weights,
        "optimizer": optimizer.variables,
        "loss": loss_variables,
        "rng": _random_states(model),
    }
    if text_tower is not None:
        groups["text_model"] = text_tower.model.weights
        groups["rng"] += _random_states(text_tower.model)
    step, best = 0, None
    if found is not None:
        for name, variables in groups.items():
            if name == "rng" and name not in found.groups:
                continue  # saved before random states were: dropout masks differ from here on
            checkpoint.restore(variables, found.groups.get(name, []), name, found.path)
        step, best = found.step, found.meta.get("best")
        log.info("resuming %s from step %d (%s)", run.path, step, found.path.name)

    validator = None
    if validate and val_images is not None and train_cfg["validate_every"] > 0:
        if is_dual:
            validator = _text_validator(config, val_images, text_tower, table, pairs.group_by)
        else:
            validator = validation.Validator(
                val_images,
                data,
                train_cfg["validation"]["max_images"],
                config["seed"],
                normalized=cfg.normalized_embeddings(config),
                # Mirror evaluation: class-disjoint splits leave one out, others search training.
                gallery=None if splits.class_disjoint else chosen.train,
            )

    _summary(config, run, splits, chosen, train_images, train_data, model, step, strategy)
    log.info(_trainable_line(variable_groups))
    if is_dual:
        train_step = dual.make_step(
            model, text_tower.model, loss_fn, optimizer, variable_groups, strategy, mixed
        )
        batches = dual.PairBatches(train_data, pairs, config["seed"]).dataset(
            step, train_cfg["steps"]
        )
        log.info(
            "text tower %s; %d training pairs' images, captions grouped by %s",
            text_tower.tower,
            len(pairs),
            pairs.group_by,
        )
    else:
        train_step = _make_train_step(model, loss_fn, optimizer, variable_groups, strategy, mixed)
        batches = train_data.dataset(step, train_cfg["steps"])
    writer = tf.summary.create_file_writer(str(run.logs))
    csv_handle, csv_writer = (
        run.open_metrics(step, DUAL_CSV_FIELDS) if is_dual else run.open_metrics(step)
    )
    progress = Progress(train_cfg["steps"], start=step)
    signal_handler = _raise_on_sigterm()
    last_loss = None  # None: the run had already finished
    interrupted = False
    t_start = time.monotonic()
    window_t, window_step = t_start, step

    def save_checkpoint(at: int):
        meta = {"best": best, "config_hash": cfg.config_hash(config)}
        checkpoint.save(run.checkpoints, at, groups, meta, train_cfg["keep_checkpoints"])

    try:
        for batch in batches:
            parts = None
            if is_dual:
                loss_value, *parts = (float(v) for v in train_step(*_split(strategy, batch)))
            else:
                loss_value = float(train_step(*_split(strategy, batch)))
            step += 1
            last_loss = loss_value
            if not np.isfinite(loss_value):
                raise UserError(
                    f"the loss became {loss_value} at step {step}; lower "
                    "train.optimizer.lr or check the data"
                )
            row = None
            if step % train_cfg["log_every"] == 0 or step == train_cfg["steps"]:
                now = time.monotonic()
                rate = (step - window_step) / max(now - window_t, 1e-9)
                window_t, window_step = now, step
                lr = float(optimizer.learning_rate)
                with writer.as_default(step=step):
                    tf.summary.scalar("loss", loss_value)
                    tf.summary.scalar("learning_rate", lr)
                    tf.summary.scalar("steps_per_second", rate)
                row = {
                    "step": step,
                    "loss": f"{loss_value:.6g}",
                    "lr": f"{lr:.6g}",
                    "steps_per_s": f"{rate:.4g}",
                    "val_recall@1": "",
                    "elapsed_s": f"{now - t_start:.1f}",
                }
                if is_dual:
                    row.update(_dual_row(step, parts, loss_fn, train_data, writer))
            if validator is not None and (
                step % train_cfg["validate_every"] == 0 or step == train_cfg["steps"]
            ):
                if is_dual:
                    recall = validator.recall_at_1(model, text_tower.model)
                else:
                    recall = validator.recall_at_1(model)
                with writer.as_default(step=step):
                    tf.summary.scalar("val_recall@1", recall)
                improved = best is None or recall > best["val_recall@1"]
                progress.note(
                    f"step {step}: validation Recall@1 {recall:.4f}"
                    + (" (best so far)" if improved else "")
                )
                if improved:
                    best = {"step": step, "val_recall@1": recall}
                    _save_weights(model, run, text_tower)
                    run.write_best(best)
                row = row or {"step": step, "loss": f"{loss_value:.6g}"}
                row["val_recall@1"] = f"{recall:.6g}"
            if row is not None:
                csv_writer.writerow(row)
                csv_handle.flush()
            if validator is None and (
                step % train_cfg["checkpoint_every"] == 0 or step == train_cfg["steps"]
            ):
                best = {"step": step, "val_recall@1": None}
                # No validation: the newest weights are the model.
                _save_weights(model, run, text_tower)
                run.write_best(best)
            if step % train_cfg["checkpoint_every"] == 0 or step == train_cfg["steps"]:
                save_checkpoint(step)
            progress.update(step, loss=loss_value)
    except KeyboardInterrupt:
        interrupted = True
        progress.note(f"interrupted at step {step}; saving a checkpoint")
        save_checkpoint(step)
    finally:
        progress.close()
        csv_handle.close()
        writer.close()
        signal.signal(signal.SIGTERM, signal_handler)
    if interrupted:
        log.warning("run the same command to resume %s from step %d", config["name"], step)
    return Result(run, step, last_loss, best, interrupted)


def _split(strategy, batch) -> tuple:
    return distribute.split_per_replica(strategy, *batch)


def _text_validator(config: dict, val_images, text_tower, table, group_by: str):
    """Text-to-image Recall@1 of the held-out images' captions (from the captions ``table`` the
    training pairs came from, grouped by the training pairs' ``group_by``); None when none has a
    caption."""
    pairs = dual.caption_pairs(config, val_images, table, group_by)
    if len(pairs) == 0:
        log.warning(
            "train.validation: none of the %d held-out images has a caption; training without "
            "validation, the last weights are the model",
            len(val_images),
        )
        return None
    validation_cfg = config["train"]["validation"]
    return dual.TextValidator(
        pairs,
        config["data"],
        validation_cfg["max_images"],
        config["seed"],
        tokenizer=text_tower.tokenizer,
    )


def _dual_row(step: int, parts, loss_fn, train_data, writer) -> dict:
    """A dual encoder's extra CSV columns (and TensorBoard scalars)."""
    pair, image = parts
    scale = loss_fn.pair.logit_scale
    epoch = step * train_data.batch_size / max(train_data.num_images, 1)
    with writer.as_default(step=step):
        tf.summary.scalar("logit_scale", scale)
        tf.summary.scalar("pair_loss", pair)
        if loss_fn.image is not None:
            tf.summary.scalar("image_loss", image)
    return {
        "epoch": f"{epoch:.4g}",
        "logit_scale": f"{scale:.6g}",
        "pair_loss": f"{pair:.6g}",
        "image_loss": f"{image:.6g}" if loss_fn.image is not None else "",
    }


def _random_states(model) -> list:
    """The model's random-number states (dropout's seed generators), which are variables but
    not weights: checkpointed so that a resumed run draws the dropout masks the uninterrupted
    run would have."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def _make_train_step(model, loss_fn, optimizer, groups: list[VariableGroup], strategy, mixed: bool):
    """One training step on a (per-replica) batch: the loss of the whole batch, its gradients
    for the groups' variables, one optimiser update (each group at its learning rate)."""
    variables = [variable for group in groups for variable in group.variables]
    replicas = strategy.num_replicas_in_sync

    def replica_step(images, labels):
        with tf.GradientTape() as tape:
            embeddings = tf.cast(model(images, training=True), tf.float32)
            # The loss sees the whole batch; the optimisers sum the replicas' gradients.
            loss = loss_fn(distribute.gather(labels), distribute.gather(embeddings))
            total = loss + tf.add_n(model.losses) if model.losses else loss
            total = total / replicas
            if mixed:
                total = optimizer.scale_loss(total)
        grads = tape.gradient(total, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    @tf.function
    def train_step(images, labels):
        losses_per_replica = strategy.run(replica_step, args=(images, labels))
        return strategy.reduce("MEAN", losses_per_replica, axis=None)

    return train_step


def _mixed_precision(wanted: bool) -> bool:
    """mixed_float16 where it pays (GPUs); a warning and float32 elsewhere."""
    if not wanted:
        return False
    if not tf.config.list_physical_devices("GPU"):
        log.warning("train.mixed_precision: no GPU here; training in float32")
        return False
    keras.mixed_precision.set_global_policy("mixed_float16")
    return True


def _save_weights(model, run: RunFolder, text_tower=None) -> None:
    """best.weights.h5 (and a dual encoder's best.text.weights.h5, written first: the image
    tower's file is the last to change, and both are replaced atomically)."""
    if text_tower is not None:
        with atomic_output(run.best_text_weights) as tmp:
            text_tower.model.save_weights(tmp)
    with atomic_output(run.best_weights) as tmp:
        model.save_weights(tmp)


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


def _summary(config, run, splits, chosen, train_images, train_data, model, step, strategy) -> None:
    skipped = len(getattr(train_data, "skipped", []))
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
