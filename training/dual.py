"""The text side of dual-encoder training: caption pairs, their batches, the step and validation.

A dual encoder trains the image tower (the embedding model) and a text tower together with an
image-text loss (``clip``, ``siglip``) on image-caption pairs:

- :func:`caption_table`, :func:`caption_pairs`: the captions file, read once, and the captioned
  images of a list with their captions, tokenized (``data.captions``: the captions file and/or
  templates; images without a caption are left out of text training);
- :func:`run_tokenizer`: a scratch tower's tokenizer, built from the training captions and
  saved in the run folder (a resumed run checks that the captions still give it);
- :class:`PairBatches`: P x K batches of images by class (one caption of each image, drawn
  from its captions), or, for a list with a single class, P * K distinct images of it, as a pure
  function of (seed, step) like the image batches; with each pair's group
  (:func:`datasets.captions.pair_groups`);
- :func:`build`: the text tower, the loss (an image-text loss, maybe with an image loss) and
  what trains at which rate;
- :func:`make_step`: the training step (both towers, or a frozen text tower);
- :class:`TextValidator`: text-to-image Recall@1 (or MAP@R) of held-out images' captions;
- :class:`DualEncoderTask`: all of it as the training loop asks for it
  (:class:`training.task.TrainingTask`).
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

import losses
import nets
from config import data_root
from datasets.captions import (
    Captions,
    image_captions,
    load_caption_table,
    only_captioned,
    pair_groups,
    resolve_group_by,
)
from datasets.lists import ImageList, Splits, ValidationSplit
from datasets.pipeline import TrainData
from datasets.tokenizer import WordTokenizer
from nets.catalog import SCRATCH_MAX_LENGTH, text_tower_kind
from retrieval.metrics import evaluate, selection_score
from retrieval.search import unit_rows
from runs.folder import DUAL_CSV_FIELDS, RunFolder
from tfcbir import UserError
from tfcbir.files import atomic_output
from training import distribute
from training.optim import VariableGroup, create_loss_variables, trainable_groups
from training.task import make_train_data, random_states
from training.validation import DecodedImages

log = logging.getLogger("tfcbir")

_CAPTION_STREAM = 4  # the caption draws of step s come from default_rng([seed, s, 4])


class CaptionPairs:
    """The captioned images of a list and their captions: ``images`` (ImageList), ``captions``
    (Captions indexing ``images``), ``text_ids`` (M,) int64 (equal texts, equal ids),
    ``group_by`` (image or class), and, once :meth:`tokenize` ran, ``token_ids`` (M, L)."""

    def __init__(self, images: ImageList, captions: Captions, group_by: str):
        self.images, self.captions, self.group_by = images, captions, group_by
        _, self.text_ids = np.unique(np.array(captions.texts, dtype=object), return_inverse=True)
        self.text_ids = self.text_ids.astype(np.int64).reshape(-1)
        order = np.argsort(captions.image, kind="stable")
        if not np.array_equal(order, np.arange(len(order))):
            raise ValueError("captions must be ordered by image")
        # The captions of image i are starts[i] .. starts[i] + counts[i] - 1.
        self.counts = np.bincount(captions.image, minlength=len(images)).astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.token_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def tokenize(self, tokenizer) -> CaptionPairs:
        self.token_ids = np.asarray(tokenizer.encode(self.captions.texts), np.int32)
        return self

    def groups(self, image_positions: np.ndarray, caption_positions: np.ndarray) -> np.ndarray:
        """(B,) group ids of the pairs (image, caption) at these positions."""
        classes = self.images.labels[image_positions] if self.group_by == "class" else None
        return pair_groups(image_positions, self.text_ids[caption_positions], classes)


def caption_table(config: dict) -> dict[str, list[str]] | None:
    """The run's captions file (``data.captions.file``) read, or None when there is none."""
    return load_caption_table(data_root(config), config["data"]["captions"]["file"])


def caption_pairs(
    config: dict,
    images: ImageList,
    table: dict[str, list[str]] | None = None,
    group_by: str | None = None,
) -> CaptionPairs:
    """The captioned images of ``images`` with their captions (``data.captions``).

    table: the captions file as :func:`caption_table` read it (read here when None). group_by:
    how the pairs are grouped, e.g. the training pairs' for the held-out ones, so both group
    alike; None resolves ``data.captions.group_by`` (``auto``) on these captions."""
    settings = config["data"]["captions"]
    if table is None:
        table = caption_table(config)
    captions = image_captions(images, table, settings["templates"])
    kept, captions = only_captioned(images, captions)
    return CaptionPairs(
        kept, captions, resolve_group_by(group_by or settings["group_by"], captions)
    )


def check_captions(pairs: CaptionPairs, images: ImageList, config: dict) -> None:
    """Refuse training without captions; say how many images have none."""
    if len(pairs) == 0:
        file = data_root(config) / config["data"]["captions"]["file"]
        raise UserError(
            f"data.captions: none of the {len(images)} training images has a caption; write "
            f"{file} (header path,caption) or set data.captions.templates, e.g. "
            '["a photo of a {class}."]'
        )
    if len(pairs) < len(images):
        log.warning(
            "data.captions: %d of the %d training images have no caption and are left out of "
            "training (give them rows in the captions file, or set data.captions.templates)",
            len(images) - len(pairs),
            len(images),
        )


def run_tokenizer(config: dict, run, pairs: CaptionPairs, resuming: bool):
    """A scratch tower's tokenizer, built from the training captions (deterministically) and
    saved in the run folder; a resumed run checks it against the saved one (refusing captions
    that changed since the run started). None for a hub tower (its preset has its own)."""
    text = config["model"]["text"]
    if text_tower_kind(text["tower"]) != "scratch":
        return None
    tokenizer = WordTokenizer.build(
        pairs.captions.texts,
        vocab_size=text["vocab_size"],
        max_length=text["max_length"] or SCRATCH_MAX_LENGTH,
    )
    if resuming and run.text_tokenizer.exists():
        if WordTokenizer.load(run.text_tokenizer) != tokenizer:
            raise UserError(
                f"{run.text_tokenizer}: the training captions changed since the run started (its "
                "vocabulary differs); run with --restart to start over, or give the config "
                "another name"
            )
        return tokenizer
    tokenizer.save(run.text_tokenizer)
    log.info(
        "text tokenizer: %d tokens from %d training captions -> %s",
        tokenizer.vocab_size,
        len(pairs.captions),
        run.text_tokenizer,
    )
    return tokenizer


class PairBatches:
    """Image-caption batches on top of the image batches of :class:`TrainData`.

    Batch ``step``: the images, labels and positions of ``TrainData.batch_items(step)``, and for
    each image one of its captions, drawn from ``default_rng([seed, step, 4])``; with the
    groups of the pairs. A pure function of (seed, step).
    """

    def __init__(self, data: TrainData, pairs: CaptionPairs, seed: int):
        if pairs.token_ids is None:
            raise ValueError("tokenize the captions first")
        self.data, self.pairs, self.seed = data, pairs, int(seed)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(images (B, h, w, 3) uint8, labels (B,) int32, token ids (B, L) int32, groups (B,)
        int64)``."""
        images, labels, positions = self.data.batch_items(step)
        rng = np.random.default_rng([self.seed, int(step), _CAPTION_STREAM])
        counts = self.pairs.counts[positions]
        captions = self.pairs.starts[positions] + (rng.random(len(positions)) * counts).astype(
            np.int64
        )
        groups = self.pairs.groups(positions, captions)
        return images, labels, self.pairs.token_ids[captions], groups

    def dataset(self, start_step: int, stop_step: int) -> tf.data.Dataset:
        """The batches ``start_step .. stop_step - 1`` in order, with static shapes, prefetched."""
        size, length = self.data.batch_size, self.pairs.token_ids.shape[1]
        shapes = ((size, *self.data.image_size, 3), (size,), (size, length), (size,))

        def make(step):
            tensors = tf.numpy_function(
                self.batch, [step], (tf.uint8, tf.int32, tf.int32, tf.int64), stateful=False
            )
            for tensor, shape in zip(tensors, shapes):
                tensor.set_shape(shape)
            return tuple(tensors)

        parallel = 2 if self.data.cached else max(2, min(4, self.data.workers))
        return (
            tf.data.Dataset.range(int(start_step), int(stop_step))
            .map(make, num_parallel_calls=parallel, deterministic=True)
            .prefetch(2)
        )


def build(config: dict, model, tokenizer, num_classes: int, pretrained: bool, hub_backbone=None):
    """The text tower and the loss of a dual encoder beside the image tower ``model`` (inside the
    strategy's scope), and what trains: ``(text_tower, loss, loss_variables, groups)``.

    ``loss_variables`` are the loss's weights in checkpoint order (the temperature and bias,
    then an image loss's class vectors, created here by one call). ``groups``
    (:class:`training.optim.VariableGroup`, the optimiser's order): the image tower's backbone
    and head (as for image losses), the text tower, the temperature and bias (no weight decay:
    open_clip's choice), an image loss's class vectors at their own learning rate.
    hub_backbone: the keras-hub preset the image tower was built from, when the text tower is
    the same preset's (:func:`nets.shared_hub_backbone`).
    """
    model_cfg = config["model"]
    text_tower = nets.build_text_tower(
        model_cfg["text"],
        nets.text_embedding_dim(model_cfg),
        tokenizer=tokenizer,
        pretrained=pretrained,
        hub_backbone=hub_backbone,
    )
    image_dim, text_dim = model.output_shape[-1], text_tower.model.output_shape[-1]
    if image_dim != text_dim:
        raise UserError(
            f"model.text.tower: {text_tower.tower} embeds texts in {text_dim} dimensions, the image "
            f"tower images in {image_dim}; use the same preset for both, or a head that projects "
            "both to model.embedding_dim (e.g. direct_normalize)"
        )
    loss = losses.get_dual(config["loss"], num_classes=num_classes)
    image_variables = (
        []
        if loss.image is None
        else create_loss_variables(loss.image, model, config["data"]["image_size"])
    )
    groups = trainable_groups(
        model,
        loss.image,
        image_variables,
        config["train"],
        others=(
            VariableGroup("text", list(text_tower.model.trainable_variables)),
            VariableGroup("temperature", loss.pair_variables, weight_decay=False),
        ),
    )
    return text_tower, loss, loss.weights, groups


def make_step(model, text_model, loss, optimizer, groups, strategy, mixed: bool):
    """The dual encoder's training step ``step(images, labels, token_ids, groups)`` -> (total
    loss, image-text part, image part (0 without an image loss)), means over the replicas.

    One optimiser update of every variable of ``groups`` (each group at its learning rate). A
    text tower without trainable weights (frozen) runs in inference mode."""
    train_text = bool(text_model.trainable_variables)
    variables = [variable for group in groups for variable in group.variables]
    replicas = strategy.num_replicas_in_sync

    def replica_step(images, labels, token_ids, pair_groups):
        with tf.GradientTape() as tape:
            image_embeddings = tf.cast(model(images, training=True), tf.float32)
            text_embeddings = tf.cast(text_model(token_ids, training=train_text), tf.float32)
            total, parts = loss(
                distribute.gather(image_embeddings),
                distribute.gather(text_embeddings),
                distribute.gather(pair_groups),
                distribute.gather(labels),
            )
            regular = list(model.losses) + list(text_model.losses)
            objective = (total + tf.add_n(regular) if regular else total) / replicas
            if mixed:
                objective = optimizer.scale_loss(objective)
        grads = tape.gradient(objective, variables)
        optimizer.apply_gradients(zip(grads, variables))
        image_part = parts.get("image", tf.zeros_like(total))
        return total, parts["pair"], image_part

    @tf.function
    def step(images, labels, token_ids, pair_groups):
        per_replica = strategy.run(replica_step, args=(images, labels, token_ids, pair_groups))
        return tuple(strategy.reduce("MEAN", value, axis=None) for value in per_replica)

    return step


class TextValidator:
    """Text-to-image Recall@1 of held-out images' captions: every caption of (a sample of) the
    held-out images is a query against those images; an image is a match when it is in the
    caption's group (its own image, an image with the same words, or, grouped by class, an image
    of its class). Recall@1 as :mod:`retrieval.metrics`, cosine scores.

    ``pairs``: the held-out images' captions (tokenised here with ``tokenizer``, after the sample
    of ``max_images`` is drawn). An unreadable image is left out of the gallery; its captions
    stay queries, and one whose group then has no image is left out of Recall@1."""

    def __init__(self, pairs: CaptionPairs, data: dict, max_images: int, seed: int, tokenizer):
        keep = np.sort(_sample_positions(len(pairs), max_images, seed))
        images = pairs.images.subset(keep)
        captions = pairs.captions.subset(np.isin(pairs.captions.image, keep))
        renumber = np.full(len(pairs), -1, np.int64)
        renumber[keep] = np.arange(len(keep))
        captions.image = renumber[captions.image]
        self.sample = CaptionPairs(images, captions, pairs.group_by).tokenize(tokenizer)
        self.token_ids = self.sample.token_ids
        self.images = DecodedImages(images, data)
        # One group per caption over the whole sample; an image's group is its captions'.
        self.query_groups = self.sample.groups(captions.image, np.arange(len(captions)))
        image_groups = np.empty(len(images), np.int64)
        image_groups[captions.image] = self.query_groups
        self.image_groups = image_groups[self.images.indices]  # of the images decoded
        if len(np.unique(self.image_groups)) < 2:
            log.warning(
                "train.validation: the %d held-out images form a single group, so text-to-image "
                "Recall@1 is 1 whatever the model",
                len(self.image_groups),
            )

    def recall_at_1(self, model, text_model, batch_size: int = 256) -> float:
        return self.score(model, text_model, "recall@1", batch_size)

    def score(self, model, text_model, metric: str, batch_size: int = 256) -> float:
        """Text-to-image ``metric`` (a key of :data:`retrieval.metrics.SELECTION_METRICS`)."""
        images = self.images.embed(model, normalized=True)
        texts = np.concatenate(
            [
                np.asarray(text_model(self.token_ids[i : i + batch_size], training=False))
                for i in range(0, len(self.token_ids), batch_size)
            ]
        )
        metrics = evaluate(
            unit_rows(texts.astype(np.float32)),
            self.query_groups,
            images,
            self.image_groups,
            normalized=True,
            r=1,
            ks=(1,),
            nmi=False,
        )
        return selection_score(metrics, metric)


def _sample_positions(n: int, max_images: int, seed: int) -> np.ndarray:
    """A seeded sample of at most ``max_images`` of the positions 0 .. n - 1."""
    if n <= max_images:
        return np.arange(n)
    return np.random.default_rng([seed, 11]).permutation(n)[:max_images]


class DualEncoderTask:
    """The dual encoder's part of training (:class:`training.task.TrainingTask`): the captioned
    training images in pair batches, the image tower (``model``) and the text tower, an
    image-text loss (maybe with an image loss), text-to-image validation, both towers' weights.

    Its checkpoints add the group ``text_model`` (the text tower's weights) after the image
    tower's; its metrics.csv adds the columns of ``DUAL_CSV_FIELDS``."""

    csv_fields = DUAL_CSV_FIELDS

    def __init__(self, config: dict, chosen: ValidationSplit, run: RunFolder, resuming: bool):
        self.config = config
        P, K = config["train"]["batch"]["P"], config["train"]["batch"]["K"]
        images = chosen.train.compact()
        # Only captioned images train a dual encoder.
        self.table = caption_table(config)
        self.pairs = caption_pairs(config, images, self.table)
        check_captions(self.pairs, images, config)
        self.images = self.pairs.images
        if len(np.unique(self.images.labels)) == 1:  # no classes: plain shuffled batches
            P, K = 1, P * K
        self.data = make_train_data(config, self.images, P, K)
        self.tokenizer = run_tokenizer(config, run, self.pairs, resuming=resuming)

    def build(self, pretrained: bool) -> None:
        config = self.config
        model_cfg, image_size = config["model"], config["data"]["image_size"]
        # A CLIP or SigLIP preset's two towers are loaded once and share it.
        hub_backbone = nets.shared_hub_backbone(model_cfg, image_size, pretrained=pretrained)
        self.model = nets.build_embedding_model(
            model_cfg, tuple(image_size), pretrained=pretrained, hub_backbone=hub_backbone
        )
        self.text_tower, self.loss, self.loss_variables, self.variable_groups = build(
            config,
            self.model,
            self.tokenizer,
            len(self.images.classes),
            pretrained,
            hub_backbone,
        )
        self.pairs.tokenize(self.text_tower.tokenizer)

    def variables(self) -> dict[str, list]:
        text_model = self.text_tower.model
        return {
            "loss": self.loss_variables,
            "rng": random_states(self.model) + random_states(text_model),
            "text_model": text_model.weights,
        }

    def validation(self, chosen: ValidationSplit, splits: Splits):
        """Text-to-image ``train.validation.metric`` of the held-out images' captions (from the captions file the
        training pairs came from, grouped as the training pairs are); None when none has a
        caption."""
        pairs = caption_pairs(self.config, chosen.validation, self.table, self.pairs.group_by)
        if len(pairs) == 0:
            log.warning(
                "train.validation: none of the %d held-out images has a caption; training "
                "without validation, the last weights are the model",
                len(chosen.validation),
            )
            return None
        validator = TextValidator(
            pairs,
            self.config["data"],
            self.config["train"]["validation"]["max_images"],
            self.config["seed"],
            tokenizer=self.text_tower.tokenizer,
        )
        metric = self.config["train"]["validation"]["metric"]
        return lambda: validator.score(self.model, self.text_tower.model, metric)

    def describe(self) -> list[str]:
        return [
            f"text tower {self.text_tower.tower}; {len(self.pairs)} training pairs' images, "
            f"captions grouped by {self.pairs.group_by}"
        ]

    def make_step(self, optimizer, strategy, mixed: bool):
        step = make_step(
            self.model,
            self.text_tower.model,
            self.loss,
            optimizer,
            self.variable_groups,
            strategy,
            mixed,
        )
        return lambda *batch: [float(value) for value in step(*batch)]

    def batches(self, start_step: int, stop_step: int) -> tf.data.Dataset:
        return PairBatches(self.data, self.pairs, self.config["seed"]).dataset(
            start_step, stop_step
        )

    def log_row(self, step: int, values: list[float], writer) -> dict[str, str]:
        """The epoch (of the training pairs), the logit scale and the loss's two terms."""
        _, pair, image = values
        scale = self.loss.pair.logit_scale
        epoch = step * self.data.batch_size / max(self.data.num_images, 1)
        with writer.as_default(step=step):
            tf.summary.scalar("logit_scale", scale)
            tf.summary.scalar("pair_loss", pair)
            if self.loss.image is not None:
                tf.summary.scalar("image_loss", image)
        return {
            "epoch": f"{epoch:.4g}",
            "logit_scale": f"{scale:.6g}",
            "pair_loss": f"{pair:.6g}",
            "image_loss": f"{image:.6g}" if self.loss.image is not None else "",
        }

    def save_weights(self, run: RunFolder) -> None:
        """best.text.weights.h5, then best.weights.h5 (the image tower's file is the last to
        change; both are replaced atomically)."""
        with atomic_output(run.best_text_weights) as tmp:
            self.text_tower.model.save_weights(tmp)
        with atomic_output(run.best_weights) as tmp:
            self.model.save_weights(tmp)
