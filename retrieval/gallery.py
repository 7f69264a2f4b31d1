"""The HDF5 gallery: a split's embeddings with what is needed to trust and use them.

Layout of ``<run>/embeddings/<split>.h5`` (format 1):

- datasets: ``embeddings`` (N, D) float32; ``labels`` (N,) int64; ``paths`` (N,) UTF-8 strings,
  relative to the data root; ``classes`` (C,) UTF-8 strings, the class name of each label.
- attributes: ``format_version``, ``dim``, ``normalized``, ``model_id`` (the checkpoint's
  identity, e.g. :func:`tfcbir.files.hash_file` of the weights), ``model_step``,
  ``config_hash``, ``created`` (ISO 8601, UTC), ``tfcbir_version``, ``data_root``, ``split``,
  ``gallery_id`` (random, new for every gallery written: an index built from it records it and is
  refused once the gallery is re-embedded) and ``extra`` (a JSON object).
- optional dataset ``dropped`` (K,) int64: positions in the list of items that was embedded of
  the images left out because they could not be read (absent when none was).

A gallery appears atomically: :func:`write_gallery` writes a temporary file and renames it, and
:class:`GalleryWriter` embeds resumably into ``<out>.partial.h5`` (flushed per chunk, so an
interrupted run keeps its finished chunks) and renames it when every item is done.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np

from tfcbir import UserError, __version__
from tfcbir.files import atomic_output

log = logging.getLogger("tfcbir")

FORMAT_VERSION = 1
_STRING = h5py.string_dtype("utf-8")
_ATTRIBUTES = (
    "format_version",
    "dim",
    "normalized",
    "model_id",
    "model_step",
    "config_hash",
    "created",
    "tfcbir_version",
    "data_root",
    "split",
    "gallery_id",
    "extra",
)


@dataclass(frozen=True)
class Gallery:
    """A gallery read from disk; see the module docstring for each field's meaning."""

    path: Path
    embeddings: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    paths: list[str]  # (N,) relative to data_root
    classes: list[str]  # (C,) class name of each label
    normalized: bool
    model_id: str
    model_step: int
    config_hash: str
    created: str
    version: str
    data_root: str
    split: str
    gallery_id: str
    extra: dict = field(default_factory=dict)
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (K,) see above

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def class_names(self, labels: np.ndarray | None = None) -> list[str]:
        """The class name of each label (default: of every item)."""
        labels = self.labels if labels is None else labels
        return [self.classes[int(label)] for label in labels]


def partial_path(path: str | os.PathLike) -> Path:
    """Where :class:`GalleryWriter` keeps an unfinished gallery: ``<out>.partial.h5``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial.h5")


def write_gallery(
    path: str | os.PathLike,
    embeddings: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    paths: Sequence[str],
    classes: Sequence[str],
    *,
    normalized: bool,
    model_id: str,
    model_step: int,
    config_hash: str,
    data_root: str = "",
    split: str = "",
    extra: dict | None = None,
    dropped: Sequence[int] | np.ndarray | None = None,
) -> Path:
    """Write a whole gallery atomically (temporary file, then rename); returns ``path``.

    embeddings: (N, D); labels: (N,) in [0, len(classes)); paths: (N,) relative to data_root;
    dropped: (K,) positions of unreadable images left out (see the module docstring).
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (N, D); got shape {embeddings.shape}")
    labels, paths, classes = _check_items(labels, paths, classes, len(embeddings))
    path = Path(path)
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        _create(
            f,
            embeddings.shape[1],
            labels,
            paths,
            classes,
            normalized=normalized,
            model_id=model_id,
            model_step=model_step,
            config_hash=config_hash,
            data_root=data_root,
            split=split,
            extra=extra,
        )
        f["embeddings"][...] = embeddings
        if dropped is not None and len(dropped):
            f.create_dataset("dropped", data=np.asarray(dropped, dtype=np.int64))
        f.attrs["created"] = _now()
    return path


def read_gallery(
    path: str | os.PathLike,
    *,
    expect_model_id: str | None = None,
    expect_config_hash: str | None = None,
    config_path: str | os.PathLike | None = None,
    advice: str | None = None,
) -> Gallery:
    """Read a gallery; refuse (UserError) a missing or damaged file, or one made by another model
    (``expect_model_id``) or config (``expect_config_hash``). ``config_path`` only names the
    config in the re-embedding advice; ``advice`` replaces that advice (e.g. for a shard)."""
    path = Path(path)
    config = config_path or "<config>"
    if not path.is_file():
        raise UserError(
            f"{path}: no gallery there; embed the split first: "
            f"python embed.py -c {config} --split {path.stem}"
        )
    try:
        with h5py.File(path, "r") as f:
            attrs = {key: hdf5_value(f.attrs[key]) for key in _ATTRIBUTES}
            embeddings = f["embeddings"][...]
            labels = f["labels"][...].astype(np.int64)
            paths = list(f["paths"].asstr()[...])
            classes = list(f["classes"].asstr()[...])
            dropped = f["dropped"][...].astype(np.int64) if "dropped" in f else np.zeros(0, int)
    except (OSError, KeyError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"{path}: not a readable tfcbir gallery ({reason}); delete it and "
            f"{advice or f're-embed: python embed.py -c {config} --split {path.stem}'}"
        ) from None
    split = attrs["split"] or path.stem
    advice = advice or f"re-embed it: python embed.py -c {config} --split {split}"
    if attrs["format_version"] != FORMAT_VERSION:
        raise UserError(
            f"{path}: gallery format {attrs['format_version']}, this tfcbir reads "
            f"format {FORMAT_VERSION}; {advice}"
        )
    n = len(labels)
    if embeddings.shape != (n, attrs["dim"]) or len(paths) != n:
        raise UserError(f"{path}: the gallery is damaged (datasets of different lengths); {advice}")
    if not np.isfinite(embeddings).all():
        raise UserError(
            f"{path}: the embeddings contain NaN or infinite values (did training "
            f"diverge?); check the model, then {advice}"
        )
    for what, expected in (("model_id", expect_model_id), ("config_hash", expect_config_hash)):
        if expected is not None and attrs[what] != expected:
            made_by = "another model checkpoint" if what == "model_id" else "another config"
            raise UserError(
                f"{path} was embedded with {made_by} ({what} {attrs[what]}, "
                f"expected {expected}); {advice}"
            )
    return Gallery(
        path=path,
        embeddings=np.ascontiguousarray(embeddings, dtype=np.float32),
        labels=labels,
        paths=paths,
        classes=classes,
        normalized=bool(attrs["normalized"]),
        model_id=attrs["model_id"],
        model_step=int(attrs["model_step"]),
        config_hash=attrs["config_hash"],
        created=attrs["created"],
        version=attrs["tfcbir_version"],
        data_root=attrs["data_root"],
        split=split,
        gallery_id=attrs["gallery_id"],
        extra=json.loads(attrs["extra"]),
        dropped=dropped.astype(np.int64),
    )


class GalleryWriter:
    """Resumable embedding: chunks go into ``<out>.partial.h5``, which becomes ``<out>`` when done.

    The item list (paths, labels, classes) is fixed up front. An existing partial file is resumed
    when it was made by the same model and config for the same items and ``extra``; otherwise it
    is started over with a warning. Each :meth:`write` is flushed to disk before it returns, and
    items are marked done only after their embeddings are written, so a run killed between chunks
    resumes at :meth:`remaining`. Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        paths: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        classes: Sequence[str],
        dim: int,
        normalized: bool,
        model_id: str,
        model_step: int,
        config_hash: str,
        data_root: str = "",
        split: str = "",
        extra: dict | None = None,
    ):
        self.path = Path(path)
        self.partial_path = partial_path(self.path)
        labels, paths, classes = _check_items(labels, paths, classes, len(paths))
        identity = {
            "dim": int(dim),
            "normalized": bool(normalized),
            "model_id": model_id,
            "model_step": int(model_step),
            "config_hash": config_hash,
            "extra": json.dumps(extra or {}, sort_keys=True),
        }
        self._file = self._resume(identity, labels, paths, classes)
        if self._file is None:
            self.partial_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = h5py.File(self.partial_path, "w")
            _create(
                self._file,
                dim,
                labels,
                paths,
                classes,
                normalized=normalized,
                model_id=model_id,
                model_step=model_step,
                config_hash=config_hash,
                data_root=data_root,
                split=split,
                extra=extra,
            )
            self._file.create_dataset("done", shape=(len(labels),), dtype=bool)
            self._file.flush()
        self._done = self._file["done"][...]

    def _resume(self, identity: dict, labels, paths, classes) -> h5py.File | None:
        """The partial file opened for appending, or None when there is none or it is foreign."""
        if not self.partial_path.exists():
            return None
        try:
            f = h5py.File(self.partial_path, "r+")
        except OSError as error:
            log.warning(
                "%s cannot be read (%s); starting the embedding over",
                self.partial_path,
                str(error).splitlines()[0],
            )
            self.partial_path.unlink()
            return None
        try:
            differs = [
                key for key, value in identity.items() if hdf5_value(f.attrs.get(key)) != value
            ]
            if "done" not in f or not (
                np.array_equal(f["labels"][...], labels)
                and list(f["paths"].asstr()[...]) == paths
                and list(f["classes"].asstr()[...]) == classes
            ):
                differs.append("items")
        except (OSError, KeyError, ValueError):
            differs = ["damaged file"]
        if not differs:
            return f
        f.close()
        log.warning(
            "%s was made by another run (%s differs); starting the embedding over",
            self.partial_path,
            ", ".join(differs),
        )
        self.partial_path.unlink()
        return None

    def __len__(self) -> int:
        return len(self._done)

    @property
    def done(self) -> np.ndarray:
        """(N,) bool: the items whose embeddings are on disk."""
        return self._done.copy()

    def remaining(self) -> np.ndarray:
        """Indices (ascending) of the items still to embed."""
        return np.flatnonzero(~self._done)

    def write(self, indices: Sequence[int] | np.ndarray, embeddings: np.ndarray) -> None:
        """Store the embeddings (B, D) of items ``indices`` (B,) and flush them to disk."""
        indices = np.asarray(indices, dtype=np.int64)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.shape != (len(indices), self._file.attrs["dim"]):
            raise ValueError(
                f"embeddings have shape {embeddings.shape}; expected "
                f"({len(indices)}, {self._file.attrs['dim']})"
            )
        if len(indices) == 0:
            return
        order = np.argsort(indices)
        indices, embeddings = indices[order], embeddings[order]
        if len(np.unique(indices)) != len(indices):
            raise ValueError("indices contain duplicates")
        # A contiguous run is a slice write; h5py's fancy indexing needs increasing indices.
        if indices[-1] - indices[0] + 1 == len(indices):
            where = slice(int(indices[0]), int(indices[-1]) + 1)
        else:
            where = indices
        self._file["embeddings"][where] = embeddings
        self._file.flush()  # the embeddings reach the disk before they are marked done
        self._file["done"][where] = True
        self._file.flush()
        self._done[indices] = True

    def finalize(self, *, drop_missing: bool = False) -> Path:
        """Rename the finished partial file to the gallery's path (atomic); returns that path.

        drop_missing: items never written (unreadable images) are left out of the gallery
        instead of being an error; the gallery is then rewritten without them, and their
        positions are recorded in its ``dropped`` dataset.
        """
        if not self._done.all():
            if not drop_missing:
                raise ValueError(
                    f"{len(self.remaining())} of {len(self)} items are not embedded yet"
                )
            return self._finalize_without_missing()
        del self._file["done"]
        self._file.attrs["created"] = _now()
        self._file.attrs["gallery_id"] = uuid.uuid4().hex
        self._file.close()
        with open(self.partial_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self.partial_path, self.path)
        return self.path

    def _finalize_without_missing(self) -> Path:
        f, keep = self._file, self._done
        attrs = {key: hdf5_value(f.attrs[key]) for key in _ATTRIBUTES}
        write_gallery(
            self.path,
            f["embeddings"][...][keep],
            f["labels"][...][keep],
            [p for p, k in zip(f["paths"].asstr()[...], keep) if k],
            list(f["classes"].asstr()[...]),
            normalized=bool(attrs["normalized"]),
            model_id=attrs["model_id"],
            model_step=int(attrs["model_step"]),
            config_hash=attrs["config_hash"],
            data_root=attrs["data_root"],
            split=attrs["split"],
            extra=json.loads(attrs["extra"]),
            dropped=np.flatnonzero(~keep),
        )
        f.close()
        self.partial_path.unlink()
        return self.path

    def close(self) -> None:
        """Close the partial file, keeping it for a later resume."""
        if self._file:
            self._file.close()

    def __enter__(self) -> GalleryWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_items(labels, paths, classes, n: int) -> tuple[np.ndarray, list[str], list[str]]:
    labels = np.asarray(labels, dtype=np.int64)
    paths, classes = [str(p) for p in paths], [str(c) for c in classes]
    if labels.shape != (n,) or len(paths) != n:
        raise ValueError(f"{n} items but {labels.shape} labels and {len(paths)} paths")
    if n and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"labels must lie in [0, {len(classes)}) (one class name per label)")
    return labels, paths, classes


def _create(
    f: h5py.File,
    dim: int,
    labels: np.ndarray,
    paths: list[str],
    classes: list[str],
    *,
    normalized: bool,
    model_id: str,
    model_step: int,
    config_hash: str,
    data_root: str,
    split: str,
    extra: dict | None,
) -> None:
    """Create the datasets and attributes of a gallery; ``embeddings`` is left to fill."""
    f.create_dataset("embeddings", shape=(len(labels), dim), dtype=np.float32)
    f.create_dataset("labels", data=labels)
    f.create_dataset("paths", data=paths, dtype=_STRING)
    f.create_dataset("classes", data=classes, dtype=_STRING)
    f.attrs.update(
        {
            "format_version": FORMAT_VERSION,
            "dim": int(dim),
            "normalized": bool(normalized),
            "model_id": str(model_id),
            "model_step": int(model_step),
            "config_hash": str(config_hash),
            "created": "",
            "tfcbir_version": __version__,
            "data_root": str(data_root),
            "split": str(split),
            "gallery_id": uuid.uuid4().hex,
            "extra": json.dumps(extra or {}, sort_keys=True),
        }
    )


def hdf5_value(value):
    """HDF5 attributes come back as NumPy scalars or bytes; make them plain Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
