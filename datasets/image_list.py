"""The image list every layer passes around, and the readers that list files share.

An :class:`ImageList` is a data set's images: paths relative to a root, their labels and the
names of all its classes. :func:`open_text` and :func:`csv_rows` read the UTF-8 list files of
every layout (the CSV lists, the benchmark archives' text lists, captions); :func:`existing_files`
checks which listed images exist, a folder listing at a time.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfcbir import UserError


@dataclass
class ImageList:
    """Images of a data set: ``paths[i]`` (posix, relative to ``root``) has class ``labels[i]``.

    ``labels`` ``(N,)`` int32 index ``classes``, the names of ALL the data set's classes (also
    those without an image in this list, e.g. the test classes of a class-disjoint split), so
    train and test lists share one label space.
    """

    root: Path
    paths: list[str]
    labels: np.ndarray
    classes: list[str]

    def __post_init__(self):
        self.root = Path(self.root)
        self.paths = list(self.paths)
        self.labels = np.asarray(self.labels, dtype=np.int32).reshape(-1)
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices) -> ImageList:
        """The images at ``indices`` (integer array or boolean mask), same root and classes."""
        indices = np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        indices = indices.astype(np.int64).reshape(-1)
        return ImageList(
            self.root, [self.paths[i] for i in indices], self.labels[indices], list(self.classes)
        )

    def compact(self) -> ImageList:
        """The same images with ``classes`` cut down to the classes present, labels renumbered
        0..C-1 in the same order: what a loss that learns one vector per class trains on."""
        present, labels = np.unique(self.labels, return_inverse=True)
        return ImageList(self.root, self.paths, labels, [self.classes[i] for i in present])

    def absolute_paths(self) -> list[str]:
        root = str(self.root)
        return [os.path.join(root, p) for p in self.paths]

    def class_counts(self) -> np.ndarray:
        """``(C,)`` int64: number of images of each class of ``classes`` (zero for absent ones)."""
        return np.bincount(self.labels, minlength=len(self.classes)).astype(np.int64)


def open_text(path: str | os.PathLike) -> io.StringIO:
    """The UTF-8 text file ``path``, read whole, as a file to iterate line by line.

    A leading byte-order mark (Excel writes one) is dropped; line ends are kept as written, as
    :mod:`csv` wants them (``newline=""``: lines end at LF, CR or CR LF). Raises UserError (one
    line, naming the file and line) when the file is not UTF-8, e.g. a list saved as Latin-1 or
    Windows-1252; OSError for a missing or unreadable file.
    """
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:  # error.object: the bytes after a byte-order mark
        line = error.object.count(b"\n", 0, error.start) + 1
        raise UserError(
            f"{os.fspath(path)}:{line}: not UTF-8 text (byte 0x{error.object[error.start]:02x}); "
            "save it as UTF-8"
        ) from None
    return io.StringIO(text, newline="")


def csv_rows(path: str | os.PathLike) -> Iterator[list[str]]:
    """The rows of the CSV file ``path`` (UTF-8, read by :func:`open_text`), one list of fields
    per record; blank lines give ``[]``. Raises UserError (one line, naming the file and line)
    for text the :mod:`csv` reader refuses, e.g. a field over its size limit (an unclosed quote
    swallowing the rest of a large file)."""
    reader = csv.reader(open_text(path))
    try:
        yield from reader
    except csv.Error as error:
        raise UserError(
            f"{os.fspath(path)}:{reader.line_num}: not readable as CSV ({error}); check its "
            "quotes and save it as UTF-8 text"
        ) from None


def existing_files(root: str | os.PathLike, paths: list[str]) -> np.ndarray:
    """``(N,)`` bool: whether ``root/paths[i]`` is a file (absolute paths are taken as they are).

    Each folder the paths name is listed once (``os.scandir``) instead of one stat per file, so
    lists of a hundred thousand images are checked quickly; names compare exactly, as the file
    system does on Linux.
    """
    root = os.fspath(root).rstrip("/") + "/"
    by_folder: dict[str, list[int]] = {}
    names = []
    for i, path in enumerate(paths):
        folder, _, name = (path if path.startswith("/") else root + path).rpartition("/")
        by_folder.setdefault(folder, []).append(i)
        names.append(name)
    present = np.zeros(len(paths), dtype=bool)
    for folder, indices in by_folder.items():
        try:
            with os.scandir(folder) as entries:
                files = {entry.name for entry in entries if entry.is_file()}
        except OSError:  # missing, not a folder, unreadable: none of its files is usable
            continue
        for i in indices:
            present[i] = names[i] in files
    return present
