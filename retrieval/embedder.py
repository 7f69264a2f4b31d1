"""A run's trained model as an image -> embedding function (the one module here using TF).

``load_embedder(config)`` builds the embedding model from the config, loads the run's best
weights (or a given checkpoint) and knows the identity that galleries record: the weights file's
hash and step, and the config's model hash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import config as cfg
from datasets.pipeline import iter_eval_batches
from retrieval.search import unit_rows
from tfcbir import UserError
from tfcbir.files import hash_file


@dataclass
class Embedder:
    model: object  # keras.Model: (B, h, w, 3) pixels -> (B, D) float32
    image_size: tuple[int, int]
    resize: tuple[int, int] | None
    normalized: (
        bool  # embeddings are unit vectors, searched by cosine (config.normalized_embeddings)
    )
    model_id: str  # hash of the weights file
    model_step: int
    config_hash: str  # config.model_hash: what turns pixels into embeddings
    weights: Path

    @property
    def dim(self) -> int:
        return int(self.model.output_shape[-1])

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


def load_embedder(config: dict, checkpoint: str | Path | None = None) -> Embedder:
    """The embedding model of ``config``'s run with its best weights, or those of ``checkpoint``
    (a ``best.weights.h5``-style file or a training checkpoint ``ckpt-<step>.h5``)."""
    import nets
    from training import checkpoint as ckpt
    from training.run import RunFolder

    run = RunFolder(cfg.run_dir(config))
    data = config["data"]
    if checkpoint is None:
        weights = run.best_weights
        if not weights.exists():
            raise UserError(
                f"{run.path} has no trained model yet; train it first: "
                f"python train.py -c <config> (run {config['name']})"
            )
        step = int((run.best() or {}).get("step", 0))
    else:
        weights = Path(checkpoint)
        if not weights.is_file():
            raise UserError(
                f"--checkpoint {weights}: no such file; give a .weights.h5 file or "
                f"a checkpoint from {run.checkpoints}"
            )
        step = 0
    model = nets.build_embedding_model(config["model"], tuple(data["image_size"]), pretrained=False)
    if weights.name.endswith(".weights.h5"):
        try:
            model.load_weights(weights)
        except Exception as error:  # Keras raises several types for a file of another model
            raise UserError(
                f"{weights}: these weights do not fit the model of the config "
                f"({type(error).__name__}); was it trained with another config?"
            ) from None
    else:
        try:
            saved = ckpt.read(weights)
        except (OSError, KeyError, ValueError) as error:
            raise UserError(f"{weights}: not a tfcbir checkpoint ({error})") from None
        ckpt.restore(model.weights, saved.groups.get("model", []), "model", weights)
        step = saved.step
    return Embedder(
        model=model,
        image_size=tuple(data["image_size"]),
        resize=tuple(data["resize"]) if data["resize"] else None,
        normalized=cfg.normalized_embeddings(config),
        model_id=hash_file(weights),
        model_step=step,
        config_hash=cfg.model_hash(config),
        weights=weights,
    )


def expected_model_id(config: dict, checkpoint: str | Path | None = None) -> str | None:
    """The ``model_id`` that :func:`load_embedder` gives (without building the model): of
    ``checkpoint``, else of the run's best weights; None when the run has none."""
    from training.run import RunFolder

    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise UserError(
                f"--checkpoint {checkpoint}: no such file; give the weights the shards were "
                "embedded with"
            )
        return hash_file(checkpoint)
    weights = RunFolder(cfg.run_dir(config)).best_weights
    return hash_file(weights) if weights.is_file() else None


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

    A complete gallery of the same model and config (and the same ``extra`` entries, recorded in
    the gallery) is kept as it is; a partial one left by an interrupted run is resumed where it
    stopped. A list none of whose images can be read is refused unless ``allow_empty``.
    """
    from retrieval.gallery import GalleryWriter, read_gallery

    if out.exists():
        try:
            found = read_gallery(
                out, expect_model_id=embedder.model_id, expect_config_hash=embedder.config_hash
            )
            if all(found.extra.get(key) == value for key, value in (extra or {}).items()):
                return out  # up to date
        except UserError:
            pass  # another model or config: embed again
    writer = GalleryWriter(
        out,
        paths=images.paths,
        labels=images.labels,
        classes=images.classes,
        dim=embedder.dim,
        normalized=embedder.normalized,
        model_id=embedder.model_id,
        model_step=embedder.model_step,
        config_hash=embedder.config_hash,
        data_root=str(images.root),
        split=split,
        extra=extra,
    )
    failed: list[int] = []
    with writer:
        todo = writer.remaining()
        absolute = images.absolute_paths()
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
