"""The baseline of ``analysis.py --baseline``: the run's model before training, on the same images.

The model of the config is built as training starts it (``nets.build_embedding_model`` with the
config's ``model.weights``: ImageNet weights or a weights file for the backbone, random init
otherwise; the head is always random), after seeding Keras with the run's seed as ``train.py``
does, and embeds the images of the analysed gallery. The embeddings are kept in
``<report>/baseline.h5`` (a gallery file in the report's folder, never among the run's galleries)
and reused while the model, the seed and the images are the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

import config as cfg
import nets
from retrieval.embedder import Embedder
from retrieval.gallery import Gallery, GalleryIdentity, items_hash, read_gallery, write_gallery
from tfcbir import UserError
from tfcbir.files import hash_file

log = logging.getLogger("tfcbir")

FILE_NAME = "baseline.h5"


def describe(config: dict) -> str:
    """What the untrained model is, in words."""
    model = config["model"]
    weights = model["weights"]
    seed = config["seed"]
    if weights == "none":
        return f"untrained {model['backbone']} (random init, seed {seed})"
    backbone = "ImageNet weights" if weights == "imagenet" else f"weights {weights}"
    return f"untrained {model['backbone']} ({backbone}; head random init, seed {seed})"


def identity(config: dict) -> str:
    """The ``model_id`` recorded for the untrained model: its weights source and seed."""
    weights = config["model"]["weights"]
    if weights not in ("imagenet", "none"):
        path = Path(weights).expanduser()
        weights = f"file-{hash_file(path)}" if path.is_file() else weights
    return f"untrained-{weights}-seed{config['seed']}"


def baseline_embeddings(
    config: dict,
    gallery: Gallery,
    folder: Path,
    *,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Embeddings (N, D) of the gallery's images by the untrained model of ``config``, in the
    gallery's order; read from ``folder/baseline.h5`` when it holds them, else computed and
    written there. Raises UserError when an image of the gallery cannot be read any more."""
    path = Path(folder) / FILE_NAME
    expected = GalleryIdentity(
        model_id=identity(config),
        config_hash=cfg.model_hash(config),
        items_hash=items_hash(gallery.paths, gallery.labels, gallery.classes),
        model_step=0,
    )
    if path.is_file():
        try:
            return read_gallery(path, expect=expected).embeddings
        except UserError:
            pass  # another model, config or image list: embed again
    embeddings = _embed(config, gallery, batch_size, progress)
    write_gallery(
        path,
        embeddings,
        gallery.labels,
        gallery.paths,
        gallery.classes,
        normalized=cfg.normalized_embeddings(config),
        identity=expected,
        data_root=gallery.data_root,
        split=gallery.split,
        extra={"baseline_of": str(gallery.path)},
    )
    return embeddings


def image_root(config: dict, gallery: Gallery) -> Path:
    """Where the gallery's relative paths point: its recorded data root, else the config's."""
    recorded = Path(gallery.data_root) if gallery.data_root else None
    return recorded if recorded is not None and recorded.is_dir() else cfg.data_root(config)


def _embed(config: dict, gallery: Gallery, batch_size: int, progress) -> np.ndarray:
    import keras

    data = config["data"]
    keras.utils.set_random_seed(config["seed"])  # as train.py seeds the start of a run
    model = nets.build_embedding_model(config["model"], tuple(data["image_size"]), pretrained=True)
    embedder = Embedder.of_config(
        config,
        model,
        model_id=identity(config),
        model_step=0,
        weights=Path(config["model"]["weights"]),
    )
    root = image_root(config, gallery)
    files = [str(root / p) for p in gallery.paths]
    out = np.zeros((len(files), embedder.dim), dtype=np.float32)
    failed: list[tuple[int, str]] = []
    done = 0
    for indices, embeddings in embedder.embed_files(
        files, batch_size=batch_size, on_error=lambda i, message: failed.append((i, message))
    ):
        out[indices] = embeddings
        done += len(indices)
        if progress is not None:
            progress(done + len(failed), len(files))
    if failed:
        raise UserError(
            f"{len(failed)} images of {gallery.path} cannot be read any more, e.g. "
            f"{failed[0][1]}; restore them, or re-embed the set: python embed.py -c <config> "
            f"--split {gallery.split}"
        )
    return out
