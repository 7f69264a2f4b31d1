"""A run's trained model as an image -> embedding function (the one module here using TF).

``load_embedder(config)`` builds the embedding model from the config, loads the weights the run
layer resolved (:func:`runs.weights.model_source`: the run's best, a given checkpoint, or a
preset as it is) and knows the identity that galleries record
(:class:`retrieval.gallery.GalleryIdentity`): the weights' ``model_id`` and step, the config's
model hash, and the hash of the items embedded. ``load_text_encoder(config)`` is a dual
encoder's text tower, text -> embedding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import config as cfg
import nets
from datasets.pipeline import iter_eval_batches
from datasets.tokenizer import WordTokenizer
from retrieval.gallery import (
    FileStats,
    Gallery,
    GalleryIdentity,
    GalleryWriter,
    UpdatePlan,
    UpdateReport,
    check_identity,
    hash_files,
    items_hash,
    plan_update,
    read_gallery,
    stat_files,
    write_gallery,
)
from retrieval.search import unit_rows
from runs import checkpoint as ckpt
from runs.weights import ModelSource, has_text_tower, model_source, read_checkpoint
from tfcbir import UserError

log = logging.getLogger("tfcbir")


@dataclass
class Embedder:
    model: object  # keras.Model: (B, h, w, 3) pixels -> (B, D) float32
    image_size: tuple[int, int]
    resize: tuple[int, int] | None
    # Embeddings are unit vectors, searched by cosine (config.normalized_embeddings).
    normalized: bool
    model_id: str  # hash of the weights file
    model_step: int
    config_hash: str  # config.model_hash: what turns pixels into embeddings
    weights: Path | None  # None: a pretrained preset as it is (zero-shot)
    # {"image_tower", "text_tower"}: recorded in the galleries' extra (see :func:`towers`)
    towers: dict = field(default_factory=dict)

    @classmethod
    def of_config(
        cls, config: dict, model, *, model_id: str, model_step: int, weights: Path | None
    ) -> Embedder:
        """The embedder of ``model`` built from ``config``: image geometry, search geometry,
        model hash and towers from the config; the weights' identity as given."""
        data = config["data"]
        return cls(
            model=model,
            image_size=tuple(data["image_size"]),
            resize=tuple(data["resize"]) if data["resize"] else None,
            normalized=cfg.normalized_embeddings(config),
            model_id=model_id,
            model_step=model_step,
            config_hash=cfg.model_hash(config),
            weights=weights,
            towers=towers(config),
        )

    @property
    def dim(self) -> int:
        return int(self.model.output_shape[-1])

    def gallery_identity(self, images) -> GalleryIdentity:
        """The identity of a gallery of ``images`` (an ImageList) embedded by this model."""
        return GalleryIdentity(
            model_id=self.model_id,
            config_hash=self.config_hash,
            items_hash=items_hash(images.paths, images.labels, images.classes),
            model_step=self.model_step,
        )

    def embed_pixels(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(B, h, w, 3) uint8 -> (B, D) float32."""
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(
            [self._forward(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        )

    def embed_files(
        self,
        paths: list[str],
        *,
        batch_size: int = 64,
        on_error: Callable[[int, str], None] | None = None,
        workers: int | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches ``(indices (b,), embeddings (b, D))`` of image files; unreadable ones skipped."""
        for indices, images in iter_eval_batches(
            paths,
            image_size=self.image_size,
            resize=self.resize,
            batch_size=batch_size,
            on_error=on_error,
            workers=workers,
        ):
            yield indices, self._forward(images)

    def _forward(self, images) -> np.ndarray:
        if not hasattr(self, "_compiled"):
            import tensorflow as tf

            self._compiled = tf.function(
                lambda x: self.model(x, training=False), reduce_retracing=True
            )
        embeddings = np.asarray(self._compiled(images), np.float32)
        # A loss on angles with a head that does not normalise: searched as unit vectors.
        return unit_rows(embeddings) if self.normalized else embeddings


def towers(config: dict) -> dict:
    """What a gallery records of the model that embedded it (its ``extra``): the image tower
    (``model.backbone``) and the text tower (``model.text.tower``: none, scratch or hub:...)."""
    return {
        "image_tower": config["model"]["backbone"],
        "text_tower": config["model"]["text"]["tower"],
    }


def load_embedder(
    config: dict, checkpoint: str | Path | None = None, source: ModelSource | None = None
) -> Embedder:
    """The embedding model of ``config``'s run with its best weights, or those of ``checkpoint``
    (a ``best.weights.h5``-style file or a training checkpoint ``ckpt-<step>.h5``); ``source``:
    the run's weights if the caller resolved them (:func:`runs.weights.model_source`)."""
    source = source or model_source(config, checkpoint)
    image_size = tuple(config["data"]["image_size"])
    if source.zero_shot:
        log.info(
            "%s has no trained model: using %s as it is (zero-shot)",
            source.run.path,
            config["model"]["backbone"],
        )
        model = nets.build_embedding_model(config["model"], image_size)
        return Embedder.of_config(
            config, model, model_id=source.model_id, model_step=0, weights=None
        )
    model = nets.build_embedding_model(config["model"], image_size, pretrained=False)
    step = source.step
    if source.is_checkpoint:
        saved = read_checkpoint(source.weights)
        ckpt.restore(model.weights, saved.groups.get("model", []), "model", source.weights)
        step = saved.step
    else:
        _load_weights_file(model, source.weights, "model")
    return Embedder.of_config(
        config, model, model_id=source.model_id, model_step=step, weights=source.weights
    )


def _load_weights_file(model, path: Path, what: str) -> None:
    """Load a ``.weights.h5`` file into ``model``; a file of another model is a UserError."""
    try:
        model.load_weights(path)
    except Exception as error:  # Keras raises several types for a file of another model
        raise UserError(
            f"{path}: these weights do not fit the {what} of the config "
            f"({type(error).__name__}); was it trained with another config?"
        ) from None


@dataclass
class TextEncoder:
    """A dual encoder's text tower as a text -> embedding function, with the identity of the
    model it belongs to (the same ``model_id`` as the galleries its image tower embedded)."""

    tower: object  # nets.TextTower
    model_id: str
    model_step: int
    config_hash: str
    towers: dict

    @property
    def dim(self) -> int:
        return int(self.tower.model.output_shape[-1])

    def embed(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """(B, D) float32 unit vectors of B texts (searched by cosine, as the image-text loss
        compares them)."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        ids = self.tower.tokenizer.encode(list(texts))
        if not hasattr(self, "_compiled"):
            import tensorflow as tf

            self._compiled = tf.function(
                lambda x: self.tower.model(x, training=False), reduce_retracing=True
            )
        return unit_rows(
            np.concatenate(
                [
                    np.asarray(self._compiled(ids[i : i + batch_size]), np.float32)
                    for i in range(0, len(ids), batch_size)
                ]
            )
        )

    def unknown_words(self, text: str) -> list[str]:
        """Words of ``text`` the tokenizer can only read as unknown (a scratch tower's
        vocabulary is the training captions' words)."""
        return list(self.tower.tokenizer.unknown_words(text))


def no_text_tower_error(config: dict) -> UserError:
    """The one error for text queries to a model without a text tower (every CLI, the Searcher
    and the server say this)."""
    return UserError(
        f"run {config['name']} searches by image only: its model has no text tower, so it "
        "cannot read words; query with an image, or train a model that reads words too (a "
        "dual encoder, e.g. trainings/demo_text.json: docs/text-queries.md)"
    )


def load_text_encoder(
    config: dict, checkpoint: str | Path | None = None, source: ModelSource | None = None
) -> TextEncoder:
    """The text tower of ``config``'s run, with the best weights (or those of ``checkpoint``,
    as :func:`load_embedder`). UserError for a model without a text tower."""
    if not has_text_tower(config):
        raise no_text_tower_error(config)
    source = source or model_source(config, checkpoint)
    text_cfg = config["model"]["text"]
    dim = nets.text_embedding_dim(config["model"])
    identity = {"config_hash": cfg.model_hash(config), "towers": towers(config)}
    if source.zero_shot:
        tower = nets.build_text_tower(text_cfg, dim)
        return TextEncoder(tower=tower, model_id=source.model_id, model_step=0, **identity)
    tokenizer = None
    if nets.text_tower_kind(text_cfg["tower"]) == "scratch":
        tokenizer = WordTokenizer.load(source.run.text_tokenizer)
    tower = nets.build_text_tower(text_cfg, dim, tokenizer=tokenizer, pretrained=False)
    step = source.step
    if source.is_checkpoint:
        saved = read_checkpoint(source.weights)
        ckpt.restore(
            tower.model.weights, saved.groups.get("text_model", []), "text tower", source.weights
        )
        step = saved.step
    else:
        _load_weights_file(tower.model, source.text_weights, "text tower")
    return TextEncoder(tower=tower, model_id=source.model_id, model_step=step, **identity)


def embed_images(
    embedder: Embedder,
    images,
    out: Path,
    *,
    split: str,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    extra: dict | None = None,
    allow_empty: bool = False,
) -> Path:
    """Embed an ImageList into the gallery ``out`` (resumable; unreadable images left out).

    A complete gallery of the same identity (model, step, config and these very items, see
    :meth:`Embedder.gallery_identity`) and the same ``extra`` entries is kept as it is; any other
    is embedded again. The embedder's tower names are recorded in ``extra`` as information only:
    the identity already covers both towers (a local preset folder by its contents, so a moved
    folder keeps the gallery). A partial one left by an interrupted run is resumed where it
    stopped. A list none of whose images can be read is refused unless ``allow_empty``. Each
    file's size and modification time are recorded (taken before it is read) for
    :func:`update_gallery`.
    """
    required = dict(extra or {})
    identity = embedder.gallery_identity(images)
    if out.exists():
        try:
            found = read_gallery(out, expect=identity)
            if all(found.extra.get(key) == value for key, value in required.items()):
                return out  # up to date
            reason = "other extra entries"
        except UserError as error:
            reason = str(error).split("; ")[0].replace(f"{out} ", "it ")
        log.warning("%s is out of date (%s); embedding it again", out, reason)
    absolute = images.absolute_paths()
    writer = GalleryWriter(
        out,
        paths=images.paths,
        labels=images.labels,
        classes=images.classes,
        dim=embedder.dim,
        normalized=embedder.normalized,
        identity=identity,
        data_root=str(images.root),
        split=split,
        extra={**embedder.towers, **required},
        files=stat_files(absolute),
    )
    failed: list[int] = []
    with writer:
        todo = writer.remaining()
        done = len(images) - len(todo)
        for indices, embeddings in embedder.embed_files(
            [absolute[i] for i in todo],
            batch_size=batch_size,
            on_error=lambda i, _message: failed.append(int(todo[i])),
        ):
            writer.write(todo[indices], embeddings)
            done += len(indices)
            if progress is not None:
                progress(done + len(failed), len(images))
        if len(failed) == len(images) and not allow_empty:
            raise UserError(
                f"none of the {len(images)} images of the {split} set could be read; "
                f"check {images.root}"
            )
        return writer.finalize(drop_missing=bool(failed))


def update_gallery(
    embedder: Embedder,
    images,
    out: Path,
    *,
    split: str,
    verify: bool = False,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    config_path: str | Path | None = None,
) -> UpdateReport:
    """Bring the gallery ``out`` up to date with ``images`` (an ImageList as the data set has it
    now), embedding only the added and changed images (:func:`retrieval.gallery.plan_update`;
    ``verify``: by content hash, which reads every file) and dropping the removed ones.

    The new gallery holds the items in the order of ``images`` and equals a full embedding of
    them (:func:`embed_images`) but for ``created`` and ``gallery_id``; it replaces ``out``
    atomically (an interruption leaves the old one), or ``out`` is left as it is when nothing
    changed (``written`` False). Refused (UserError, one line): no gallery at ``out``, a shard,
    or one embedded by another model or config: a new model needs a full embedding.
    config_path only names the config in those messages. Returns what was done (see
    :class:`retrieval.gallery.UpdateReport`); an index follows with
    :func:`retrieval.faiss_index.update_index`.
    """
    old = _gallery_to_update(embedder, Path(out), split, config_path)
    changes = embed_changes(
        embedder, old, images, split=split, verify=verify, batch_size=batch_size, progress=progress
    )
    plan, files, failed, keep = changes.plan, changes.files, changes.failed, changes.keep
    todo = plan.to_embed
    embeddings = np.zeros((len(images), old.dim), np.float32)
    kept = np.flatnonzero(plan.sources >= 0)
    embeddings[kept] = old.embeddings[plan.sources[kept]]  # no pixels read for these
    embeddings[todo] = changes.embedded
    identity = embedder.gallery_identity(images)
    written = not (
        len(todo) == 0
        and not len(old.dropped)
        and not identity.differences(old.identity)
        and files.same(old.files)
    )
    if written:
        write_gallery(
            out,
            embeddings[keep],
            images.labels[keep],
            [path for path, k in zip(images.paths, keep) if k],
            images.classes,
            normalized=embedder.normalized,
            identity=identity,
            data_root=str(images.root),
            split=split,
            extra={k: v for k, v in old.extra.items() if k != "merged_shards"} | embedder.towers,
            dropped=failed,
            files=files.subset(keep),
        )
    return UpdateReport.of_plan(plan, old, keep, path=Path(out), written=written)


@dataclass(frozen=True)
class Changes:
    """What an update found and embedded (:func:`embed_changes`) for a list of N items."""

    plan: UpdatePlan
    files: FileStats  # (N,) the items' files now (hashes kept from the gallery when it had them)
    embedded: np.ndarray  # (T, D): the embeddings of plan.to_embed (zeros for unreadable ones)
    failed: np.ndarray  # positions (ascending) of the items that could not be read

    @property
    def keep(self) -> np.ndarray:
        """(N,) bool: the items the new gallery holds (the unreadable ones left out)."""
        keep = np.ones(len(self.plan.sources), bool)
        keep[self.failed] = False
        return keep


def embed_changes(
    embedder: Embedder,
    old: Gallery,
    images,
    *,
    split: str,
    verify: bool = False,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> Changes:
    """Compare gallery ``old`` with ``images`` as they are now
    (:func:`retrieval.gallery.plan_update`) and embed the added and changed ones; UserError
    when none of the list's images can be read. An update's first half, for any store."""
    absolute = images.absolute_paths()
    files = stat_files(absolute, hashes=verify)
    plan = plan_update(old, images.paths, images.labels, images.classes, files, verify=verify)
    files = _hashes_kept(files, old, plan.sources, absolute)
    embedded, failed = _embed_items(embedder, absolute, plan.to_embed, batch_size, progress)
    if len(images) and len(failed) == len(images):
        raise UserError(
            f"none of the {len(images)} images of the {split} set could be read; "
            f"check {images.root}"
        )
    return Changes(plan, files, embedded, failed)


def _gallery_to_update(embedder: Embedder, out: Path, split: str, config_path) -> Gallery:
    """The gallery ``out`` as it is, refused (one line) when missing, a shard, or embedded by
    another model or config than ``embedder`` (today's refusal: re-embed it whole)."""
    config = config_path or "<config>"
    advice = f"re-embed it: python embed.py -c {config} --split {split}"
    old = read_gallery(out, config_path=config_path, advice=None)
    expect = GalleryIdentity(
        embedder.model_id, embedder.config_hash, old.items_hash, embedder.model_step
    )
    check_identity(old, expect, advice)
    if "shard" in old.extra:
        raise UserError(
            f"{out} is one shard of a sharded embedding; update the merged gallery instead "
            f"(python embed.py -c {config} --split {split} --update)"
        )
    return old


def _hashes_kept(files: FileStats, old: Gallery, sources: np.ndarray, absolute: list[str]):
    """``files`` with a complete hash column when the old gallery had one (the kept items' old
    hashes, the others' read now), so that a later ``verify`` needs no full embedding."""
    if files.sha256 is not None or old.files is None or old.files.sha256 is None:
        return files
    sha256 = np.zeros((len(files), 32), np.uint8)
    kept = np.flatnonzero(sources >= 0)
    sha256[kept] = old.files.sha256[sources[kept]]
    todo = np.flatnonzero(sources < 0)
    sha256[todo] = hash_files([absolute[i] for i in todo])
    return FileStats(files.sizes, files.mtimes, sha256)


def _embed_items(
    embedder: Embedder,
    absolute: list[str],
    todo: np.ndarray,
    batch_size: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed the files ``absolute[todo]``: their embeddings (T, D) (zeros for unreadable ones)
    and the positions (ascending, from ``todo``) of the unreadable ones."""
    embeddings = np.zeros((len(todo), embedder.dim), np.float32)
    failed: list[int] = []
    if not len(todo):
        return embeddings, np.zeros(0, np.int64)
    done = 0
    for indices, batch in embedder.embed_files(
        [absolute[i] for i in todo],
        batch_size=batch_size,
        on_error=lambda i, _message: failed.append(int(todo[i])),
    ):
        embeddings[indices] = batch
        done += len(indices)
        if progress is not None:
            progress(done + len(failed), len(todo))
    return embeddings, np.array(sorted(failed), np.int64)
