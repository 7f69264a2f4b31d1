"""The HDF5 gallery: a split's embeddings with what is needed to trust and use them.

Layout of ``<run>/embeddings/<split>.h5`` (format 2):

- datasets: ``embeddings`` (N, D) float32; ``labels`` (N,) int64; ``paths`` (N,) UTF-8 strings,
  relative to the data root; ``classes`` (C,) UTF-8 strings, the class name of each label.
- attributes: ``format_version``, ``dim``, ``normalized``, ``model_id`` (the checkpoint's
  identity, e.g. :func:`tfcbir.files.hash_file` of the weights), ``model_step``,
  ``config_hash``, ``items_hash`` (:func:`items_hash` of the whole item list that was embedded,
  unreadable images included), ``created`` (ISO 8601, UTC), ``tfcbir_version``, ``data_root``,
  ``split``,
  ``gallery_id`` (random, new for every gallery written: an index built from it records it and is
  refused once the gallery is re-embedded) and ``extra`` (a JSON object).
- optional dataset ``dropped`` (K,) int64: positions in the list of items that was embedded of
  the images left out because they could not be read (absent when none was).
- optional datasets ``file_sizes`` (N,) int64 (bytes) and ``file_mtimes`` (N,) int64
  (nanoseconds), each item's file as it was when it was embedded (-1: it could not be stat'ed),
  and ``file_sha256`` (N, 32) uint8, its content hash (only when asked for: ``--verify``):
  :class:`FileStats`, what an update (:func:`plan_update`) compares with the files on disk to
  find the changed ones. Galleries written before these existed have none; an update then
  counts every item as changed (see :func:`plan_update`).

A gallery appears atomically: :func:`write_gallery` writes a temporary file and renames it, and
:class:`GalleryWriter` embeds resumably into ``<out>.partial.h5`` (flushed per chunk, so an
interrupted run keeps its finished chunks) and renames it when every item is done.

What a gallery is of is one record, :class:`GalleryIdentity` (model, config, items): writers
record it, readers compare it, and a gallery that does not match what a caller expects is refused
rather than used stale. Format 1 (without ``items_hash``) is refused with the command that
re-embeds.

An update (:func:`plan_update`, done by :func:`retrieval.embedder.update_gallery`) compares a
gallery's items with the list and files as they are now: added, changed, removed and unchanged
items by relative path; only the added and changed ones are embedded again.
"""

from __future__ import annotations

import hashlib
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

FORMAT_VERSION = 2
_STRING = h5py.string_dtype("utf-8")
_ATTRIBUTES = (
    "format_version",
    "dim",
    "normalized",
    "model_id",
    "model_step",
    "config_hash",
    "items_hash",
    "created",
    "tfcbir_version",
    "data_root",
    "split",
    "gallery_id",
    "extra",
)


def items_hash(
    paths: Sequence[str], labels: Sequence[int] | np.ndarray, classes: Sequence[str]
) -> str:
    """Identity of an item list: its class names, labels (N,) and paths (N,), in order."""
    digest = hashlib.sha256()
    for name in classes:
        digest.update(str(name).encode() + b"\0")
    digest.update(b"\1" + np.asarray(labels, dtype="<i8").tobytes())
    for path in paths:
        digest.update(str(path).encode() + b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class GalleryIdentity:
    """What a gallery is of: the weights that embedded it (``model_id``, e.g. the hash of the
    weights file, and their training step), the config that built the model (``config_hash``,
    :func:`config.model_hash`) and the items (``items_hash``, :func:`items_hash` of the whole list
    that was embedded, unreadable images included).

    As an expectation (:func:`read_gallery`'s ``expect``), ``model_step`` None means any step: the
    model_id already names the weights.
    """

    model_id: str
    config_hash: str
    items_hash: str
    model_step: int | None = None

    def differences(self, found: GalleryIdentity) -> list[str]:
        """The fields (model_id, model_step, config_hash, items_hash) in which ``found``, a
        gallery's identity, is not what this expectation says."""
        differ = [
            name
            for name in ("model_id", "config_hash", "items_hash")
            if getattr(found, name) != getattr(self, name)
        ]
        if self.model_step is not None and found.model_step != self.model_step:
            differ.insert(1, "model_step")
        return differ


@dataclass(frozen=True)
class FileStats:
    """What tells whether each of N item files changed since it was embedded.

    sizes (N,) int64 bytes and mtimes (N,) int64 nanoseconds, -1 for a file that could not be
    stat'ed (missing); sha256 (N, 32) uint8 content hashes, or None when not recorded.
    """

    sizes: np.ndarray
    mtimes: np.ndarray
    sha256: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.sizes)

    def subset(self, rows: np.ndarray) -> FileStats:
        """The stats of items ``rows`` (integer indices or a boolean mask)."""
        sha256 = None if self.sha256 is None else self.sha256[rows]
        return FileStats(self.sizes[rows], self.mtimes[rows], sha256)

    @staticmethod
    def concatenate(parts: Sequence[FileStats | None]) -> FileStats | None:
        """The stats of parts' items one after the other (e.g. of shards); None when a part
        has none; hashes only when every part has them."""
        if not parts or any(part is None for part in parts):
            return None
        hashed = all(part.sha256 is not None for part in parts)
        return FileStats(
            np.concatenate([part.sizes for part in parts]),
            np.concatenate([part.mtimes for part in parts]),
            np.concatenate([part.sha256 for part in parts]) if hashed else None,
        )

    def same(self, other: FileStats | None) -> bool:
        """Whether ``other`` records exactly these stats (and hashes)."""
        return (
            other is not None
            and np.array_equal(self.sizes, other.sizes)
            and np.array_equal(self.mtimes, other.mtimes)
            and (self.sha256 is None) == (other.sha256 is None)
            and (self.sha256 is None or np.array_equal(self.sha256, other.sha256))
        )


def stat_files(paths: Sequence[str], *, hashes: bool = False) -> FileStats:
    """The size and modification time (and with ``hashes`` the SHA-256) of each file (N,);
    -1 (and a zero hash) for one that cannot be stat'ed or read."""
    sizes = np.full(len(paths), -1, np.int64)
    mtimes = np.full(len(paths), -1, np.int64)
    for i, path in enumerate(paths):
        try:
            stat = os.stat(path)
        except OSError:
            continue
        sizes[i], mtimes[i] = stat.st_size, stat.st_mtime_ns
    return FileStats(sizes, mtimes, hash_files(paths) if hashes else None)


def hash_files(paths: Sequence[str]) -> np.ndarray:
    """(N, 32) uint8: the SHA-256 of each file's content; zeros for one that cannot be read."""
    digests = np.zeros((len(paths), 32), np.uint8)
    for i, path in enumerate(paths):
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError:
            continue
        digests[i] = np.frombuffer(digest.digest(), np.uint8)
    return digests


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
    items_hash: str  # of the whole list embedded, the dropped (unreadable) items included
    created: str
    version: str
    data_root: str
    split: str
    gallery_id: str
    extra: dict = field(default_factory=dict)
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (K,) see above
    files: FileStats | None = None  # (N,) each item file's stats when embedded; None: unknown

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def identity(self) -> GalleryIdentity:
        return GalleryIdentity(self.model_id, self.config_hash, self.items_hash, self.model_step)

    def class_names(self, labels: np.ndarray | None = None) -> list[str]:
        """The class name of each label (default: of every item)."""
        labels = self.labels if labels is None else labels
        return [self.classes[int(label)] for label in labels]


@dataclass(frozen=True)
class UpdatePlan:
    """How a gallery becomes the gallery of a new item list of N items (the list as the data set
    has it now), found by :func:`plan_update`.

    sources (N,) int64: for each new item, the gallery row whose embedding it keeps (same path,
    file unchanged), or -1 when it is embedded again: added (a path the gallery does not hold,
    e.g. an image moved to another class folder, or one left out before as unreadable) or
    changed (its file differs from the one embedded, or the gallery does not record enough to
    tell: ``unknown`` of them).
    """

    sources: np.ndarray
    added: int
    changed: int
    removed: int  # gallery rows whose path is no longer in the list
    unknown: int  # of ``changed``: the gallery records no stats (or, with verify, no hash)
    relabelled: int  # kept items whose class name is not the one the gallery records

    @property
    def to_embed(self) -> np.ndarray:
        """Positions (ascending) in the new list of the items to embed."""
        return np.flatnonzero(self.sources < 0)

    @property
    def unchanged(self) -> int:
        return int((self.sources >= 0).sum())


def plan_update(
    gallery: Gallery,
    paths: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    files: FileStats,
    *,
    verify: bool = False,
) -> UpdatePlan:
    """Compare a gallery with the item list now (paths, labels (N,), classes) and its files'
    stats now (``files``, :func:`stat_files`; with hashes when ``verify``), by relative path.

    A file is unchanged when its size and modification time are those recorded, or with
    ``verify`` when its content hash is (a touched but identical file is kept; an edit that
    keeps size and time is caught). Items of a gallery that records no stats (written before
    they existed), or with ``verify`` no hashes, cannot be told unchanged: they are embedded
    again, the honest choice (they count as ``unknown``). A changed class name alone (a
    relabelled list) keeps the embedding: the pixels are the same.
    """
    row_of = {path: row for row, path in enumerate(gallery.paths)}
    rows = np.array([row_of.get(str(path), -1) for path in paths], np.int64)
    present = np.flatnonzero(rows >= 0)
    old, known = gallery.files, False
    same = np.zeros(len(present), bool)
    if old is not None and (not verify or old.sha256 is not None):
        known, now, then = True, files.subset(present), old.subset(rows[present])
        if verify:
            same = (now.sha256 == then.sha256).all(axis=1)
        else:
            same = (now.sizes == then.sizes) & (now.mtimes == then.mtimes)
        same &= now.sizes >= 0
    sources = np.full(len(rows), -1, np.int64)
    sources[present[same]] = rows[present[same]]
    kept = np.flatnonzero(sources >= 0)
    old_names = np.asarray(gallery.classes, dtype=object)[gallery.labels[sources[kept]]]
    new_names = np.asarray(list(classes), dtype=object)[np.asarray(labels, np.int64)[kept]]
    return UpdatePlan(
        sources=sources,
        added=int(len(rows) - len(present)),
        changed=int(len(present) - same.sum()),
        removed=len(set(row_of) - {str(path) for path in paths}),
        unknown=0 if known else len(present),
        relabelled=int((old_names != new_names).sum()),
    )


@dataclass(frozen=True)
class UpdateReport:
    """What :func:`retrieval.embedder.update_gallery` did to the gallery ``path``.

    ``kept_old`` and ``kept_new`` (M,) int64: the old and new gallery rows of the M items whose
    embeddings were kept, what an index needs to follow (:func:`retrieval.faiss_index.update_index`);
    every other old row is gone, every other new row was embedded. ``written`` False: nothing
    changed, the file was left as it was.
    """

    path: Path
    written: bool
    added: int
    changed: int
    removed: int
    unchanged: int
    unknown: int
    relabelled: int
    unreadable: int  # items to embed that could not be read (left out, as a full embedding does)
    old_gallery_id: str
    old_size: int
    new_size: int
    kept_old: np.ndarray
    kept_new: np.ndarray

    @classmethod
    def of_plan(
        cls, plan: UpdatePlan, old: Gallery, keep: np.ndarray, *, path: Path, written: bool
    ) -> UpdateReport:
        """The report of ``plan`` carried out on ``old``; keep (N,) bool: the new list's items
        in the new gallery (False: unreadable, left out)."""
        kept = np.flatnonzero(plan.sources >= 0)
        new_rows = np.cumsum(keep) - 1  # an item's row once the unreadable ones are left out
        return cls(
            path=path,
            written=written,
            added=plan.added,
            changed=plan.changed,
            removed=plan.removed,
            unchanged=plan.unchanged,
            unknown=plan.unknown,
            relabelled=plan.relabelled,
            unreadable=int((~keep).sum()),
            old_gallery_id=old.gallery_id,
            old_size=len(old),
            new_size=int(keep.sum()),
            kept_old=plan.sources[kept],
            kept_new=new_rows[kept],
        )

    def summary(self) -> str:
        """One line: the counts, e.g. ``2 added, 1 changed, 1 removed, 96 unchanged``."""
        changed = f"{self.changed} changed"
        if self.unknown:  # see plan_update
            changed += f" ({self.unknown} of them not recorded: no file stats or hashes)"
        parts = [
            f"{self.added} added",
            changed,
            f"{self.removed} removed",
            f"{self.unchanged} unchanged",
        ]
        if self.relabelled:
            parts.append(f"{self.relabelled} relabelled")
        if self.unreadable:
            parts.append(f"{self.unreadable} unreadable left out")
        return ", ".join(parts)


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
    identity: GalleryIdentity,
    data_root: str = "",
    split: str = "",
    extra: dict | None = None,
    dropped: Sequence[int] | np.ndarray | None = None,
    files: FileStats | None = None,
) -> Path:
    """Write a whole gallery atomically (temporary file, then rename); returns ``path``.

    embeddings: (N, D); labels: (N,) in [0, len(classes)); paths: (N,) relative to data_root;
    dropped: (K,) positions of unreadable images left out (see the module docstring);
    files: the (N,) item files' stats when they were embedded (None: not recorded);
    identity: what the gallery is of; its ``items_hash`` is of the list before ``dropped`` left
    it (without dropped items, ``items_hash(paths, labels, classes)``).
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
            identity=identity,
            data_root=data_root,
            split=split,
            extra=extra,
        )
        f["embeddings"][...] = embeddings
        if dropped is not None and len(dropped):
            f.create_dataset("dropped", data=np.asarray(dropped, dtype=np.int64))
        _write_files(f, files, len(embeddings))
        f.attrs["created"] = _now()
    return path


def read_gallery(
    path: str | os.PathLike,
    *,
    expect: GalleryIdentity | None = None,
    config_path: str | os.PathLike | None = None,
    advice: str | None = None,
) -> Gallery:
    """Read a gallery; refuse (UserError) a missing or damaged file, one of another format, or one
    that is not what ``expect`` says: made by other weights or another config, or of another
    item list (images added, removed or relabelled since it was embedded). ``config_path`` only
    names the config in the re-embedding advice; ``advice`` replaces that advice (e.g. for a
    shard)."""
    path = Path(path)
    config = config_path or "<config>"
    if not path.is_file():
        raise UserError(
            f"{path}: no gallery there; embed the split first: "
            f"python embed.py -c {config} --split {path.stem}"
        )
    stored = _read_stored(path, config, advice)
    split = stored["attrs"]["split"] or path.stem
    advice = advice or f"re-embed it: python embed.py -c {config} --split {split}"
    _check_stored(path, stored, advice)
    gallery = _gallery_of(path, stored, split)
    if expect is not None:
        check_identity(gallery, expect, advice)
    return gallery


def _read_stored(path: Path, config: str | os.PathLike, advice: str | None) -> dict:
    """The attributes and datasets of a gallery file of this tfcbir's format: ``attrs``,
    ``embeddings`` (N, D), ``labels`` (N,), ``paths``, ``classes``, ``dropped`` (M,). UserError for
    a file h5py cannot read or one of another format."""
    try:
        with h5py.File(path, "r") as f:
            version = hdf5_value(f.attrs.get("format_version"))
            if version == FORMAT_VERSION:
                return {
                    "attrs": {key: hdf5_value(f.attrs[key]) for key in _ATTRIBUTES},
                    "embeddings": f["embeddings"][...],
                    "labels": f["labels"][...].astype(np.int64),
                    "paths": list(f["paths"].asstr()[...]),
                    "classes": list(f["classes"].asstr()[...]),
                    "dropped": (
                        f["dropped"][...].astype(np.int64) if "dropped" in f else np.zeros(0, int)
                    ),
                    "files": _read_files(f),
                }
            split = hdf5_value(f.attrs.get("split")) or path.stem
    except (OSError, KeyError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"{path}: not a readable tfcbir gallery ({reason}); delete it and "
            f"{advice or f're-embed: python embed.py -c {config} --split {path.stem}'}"
        ) from None
    advice = advice or f"re-embed it: python embed.py -c {config} --split {split}"
    raise UserError(
        f"{path}: gallery format {version}, this tfcbir reads format {FORMAT_VERSION}; {advice}"
    )


def _check_stored(path: Path, stored: dict, advice: str) -> None:
    """UserError for datasets of different lengths or embeddings that are not finite."""
    n = len(stored["labels"])
    embeddings = stored["embeddings"]
    files = stored["files"]
    if (
        embeddings.shape != (n, stored["attrs"]["dim"])
        or len(stored["paths"]) != n
        or (files is not None and len(files) != n)
    ):
        raise UserError(f"{path}: the gallery is damaged (datasets of different lengths); {advice}")
    if not np.isfinite(embeddings).all():
        raise UserError(
            f"{path}: the embeddings contain NaN or infinite values (did training "
            f"diverge?); check the model, then {advice}"
        )


def _gallery_of(path: Path, stored: dict, split: str) -> Gallery:
    """The :class:`Gallery` of what :func:`_read_stored` read."""
    attrs = stored["attrs"]
    return Gallery(
        path=path,
        embeddings=np.ascontiguousarray(stored["embeddings"], dtype=np.float32),
        labels=stored["labels"],
        paths=stored["paths"],
        classes=stored["classes"],
        normalized=bool(attrs["normalized"]),
        model_id=attrs["model_id"],
        model_step=int(attrs["model_step"]),
        config_hash=attrs["config_hash"],
        items_hash=attrs["items_hash"],
        created=attrs["created"],
        version=attrs["tfcbir_version"],
        data_root=attrs["data_root"],
        split=split,
        gallery_id=attrs["gallery_id"],
        extra=json.loads(attrs["extra"]),
        dropped=stored["dropped"].astype(np.int64),
        files=stored["files"],
    )


def check_identity(gallery: Gallery, expect: GalleryIdentity, advice: str) -> None:
    """Refuse (one-line UserError ending in ``advice``), naming the first difference, a gallery
    that is not of what ``expect`` says."""
    differ = expect.differences(gallery.identity)
    if not differ:
        return
    what = differ[0]
    if what == "items_hash":
        then = len(gallery) + len(gallery.dropped)
        raise UserError(
            f"{gallery.path} was embedded from another list of {gallery.split} images ({then} "
            "then; images were added, removed or relabelled since, or the list files changed); "
            f"{advice}"
        )
    made_by = {
        "model_id": "another model checkpoint",
        "model_step": "another training step",
        "config_hash": "another config",
    }[what]
    raise UserError(
        f"{gallery.path} was embedded with {made_by} ({what} {getattr(gallery, what)}, "
        f"expected {getattr(expect, what)}); {advice}"
    )


class GalleryWriter:
    """Resumable embedding: chunks go into ``<out>.partial.h5``, which becomes ``<out>`` when done.

    The item list (paths, labels, classes) is fixed up front; ``identity`` (its ``items_hash`` of
    these items) is recorded, and ``files``, the item files' stats (:func:`stat_files`, taken
    before they are read: a file changed after that is found changed by an update). An existing
    partial file is resumed when it has the same identity,
    items and ``extra``; otherwise it is started over with a warning. Each :meth:`write` is flushed to disk before it returns, and
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
        identity: GalleryIdentity,
        data_root: str = "",
        split: str = "",
        extra: dict | None = None,
        files: FileStats | None = None,
    ):
        self.path = Path(path)
        self.partial_path = partial_path(self.path)
        labels, paths, classes = _check_items(labels, paths, classes, len(paths))
        if identity.items_hash != items_hash(paths, labels, classes):
            raise ValueError("identity.items_hash is not the hash of these items")
        recorded = {
            "format_version": FORMAT_VERSION,
            "dim": int(dim),
            "normalized": bool(normalized),
            "model_id": identity.model_id,
            "model_step": int(identity.model_step or 0),
            "config_hash": identity.config_hash,
            "items_hash": identity.items_hash,
            "extra": json.dumps(extra or {}, sort_keys=True),
        }
        self._file = self._resume(recorded, labels, paths, classes)
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
                identity=identity,
                data_root=data_root,
                split=split,
                extra=extra,
            )
            _write_files(self._file, files, len(labels))
            self._file.create_dataset("done", shape=(len(labels),), dtype=bool)
            self._file.flush()
        self._done = self._file["done"][...]

    def _resume(self, recorded: dict, labels, paths, classes) -> h5py.File | None:
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
                key for key, value in recorded.items() if hdf5_value(f.attrs.get(key)) != value
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
        files = _read_files(f)
        write_gallery(
            self.path,
            f["embeddings"][...][keep],
            f["labels"][...][keep],
            [p for p, k in zip(f["paths"].asstr()[...], keep) if k],
            list(f["classes"].asstr()[...]),
            normalized=bool(attrs["normalized"]),
            identity=GalleryIdentity(
                attrs["model_id"],
                attrs["config_hash"],
                attrs["items_hash"],
                int(attrs["model_step"]),
            ),
            data_root=attrs["data_root"],
            split=attrs["split"],
            extra=json.loads(attrs["extra"]),
            dropped=np.flatnonzero(~keep),
            files=None if files is None else files.subset(keep),
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
    identity: GalleryIdentity,
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
            "model_id": str(identity.model_id),
            "model_step": int(identity.model_step or 0),
            "config_hash": str(identity.config_hash),
            "items_hash": str(identity.items_hash),
            "created": "",
            "tfcbir_version": __version__,
            "data_root": str(data_root),
            "split": str(split),
            "gallery_id": uuid.uuid4().hex,
            "extra": json.dumps(extra or {}, sort_keys=True),
        }
    )


def _write_files(f: h5py.File, files: FileStats | None, n: int) -> None:
    """Store the item files' stats (see the module docstring); nothing when ``files`` is None."""
    if files is None:
        return
    if len(files) != n:
        raise ValueError(f"{n} items but the stats of {len(files)} files")
    f.create_dataset("file_sizes", data=np.asarray(files.sizes, np.int64))
    f.create_dataset("file_mtimes", data=np.asarray(files.mtimes, np.int64))
    if files.sha256 is not None:
        f.create_dataset("file_sha256", data=np.asarray(files.sha256, np.uint8).reshape(n, 32))


def _read_files(f: h5py.File) -> FileStats | None:
    """The item files' stats a gallery records, or None (a gallery written before them)."""
    if "file_sizes" not in f or "file_mtimes" not in f:
        return None
    sha256 = f["file_sha256"][...].astype(np.uint8) if "file_sha256" in f else None
    return FileStats(
        f["file_sizes"][...].astype(np.int64), f["file_mtimes"][...].astype(np.int64), sha256
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
