"""Image-caption pairs: ``<data root>/captions.csv``, or captions made from class names.

Two sources, usable together:

- a captions file (``captions.csv`` in the data root by default): a header line ``path,caption``,
  then one row per caption; ``path`` is the image's path relative to the data root (``/`` or
  ``\\`` separators), and an image may have several rows. A caption holding commas is quoted as
  CSV quotes it (``"a red, shiny bag"``).
- templates such as ``["a photo of a {class}."]``: every image of a class gets one caption per
  template, ``{class}`` replaced by :func:`class_phrase` of its folder name
  (``golden_retriever`` -> ``golden retriever``). Images without a row in the file get these.

:func:`image_captions` gives the captions of an :class:`~datasets.image_list.ImageList`;
:func:`pair_groups` says which pairs of a batch must not be each other's negatives. Plain
arguments only: this module never reads the config.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.image_list import ImageList, csv_rows, existing_files
from tfcbir import UserError
from tfcbir.text import shorten

log = logging.getLogger("tfcbir")

CAPTIONS_FILE = "captions.csv"
CLASS_FIELD = "{class}"
GROUP_BY = ("auto", "image", "class")
_HEADER = ["path", "caption"]


def class_phrase(name: str) -> str:
    """A class folder's name as words: ``_`` and ``-`` read as spaces, runs of spaces as one."""
    return " ".join(re.sub(r"[_\-]+", " ", name).split())


def check_template(template: str) -> str | None:
    """Why ``template`` is not a usable caption template (None if it is), for the config."""
    if CLASS_FIELD not in template:
        return f"has no {CLASS_FIELD} field; write e.g. 'a photo of a {CLASS_FIELD}.'"
    return None


def fill_template(template: str, class_name: str) -> str:
    """``template`` with every ``{class}`` replaced by :func:`class_phrase` of ``class_name``;
    other braces are kept as written."""
    return template.replace(CLASS_FIELD, class_phrase(class_name))


def class_prompts(classes: list[str], templates: list[str]) -> list[list[str]]:
    """``(C, T)``: each class's caption from each template, in the order given."""
    return [[fill_template(t, name) for t in templates] for name in classes]


def read_captions_file(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{relative posix path: [captions in file order]}`` of a captions file.

    Raises UserError (naming the file and line) for a missing file, a missing or wrong header,
    a row without two fields or with an empty caption. Captions are stripped; blank lines are
    skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data.captions.file: {path} does not exist")
    captions: dict[str, list[str]] = {}
    rows = csv_rows(path)
    header = next(rows, None)
    if header is None or [field.strip().lower() for field in header] != _HEADER:
        shown = ",".join(header) if header else "nothing"
        raise UserError(
            f"{path}:1: the first line is {shown!r}; it must be the header 'path,caption'"
        )
    for line_number, row in enumerate(rows, start=2):
        if not row or all(not field.strip() for field in row):
            continue
        if len(row) != 2:
            raise UserError(
                f"{path}:{line_number}: {len(row)} fields; give 'path,caption' (quote a "
                'caption that holds commas: "a red, shiny bag")'
            )
        relative, caption = _posix(row[0].strip()), " ".join(row[1].split())
        if not relative or not caption:
            what = "path" if not relative else "caption"
            raise UserError(f"{path}:{line_number}: empty {what}; give 'path,caption'")
        captions.setdefault(relative, []).append(caption)
    if not captions:
        raise UserError(f"{path}: no captions below the header; add 'path,caption' rows")
    return captions


def _posix(relative: str) -> str:
    text = relative.replace("\\", "/")
    return Path(os.path.normpath(text)).as_posix() if text else ""


@dataclass
class Captions:
    """Captions of an image list: ``texts[m]`` describes image ``image[m]`` of the list.

    ``texts`` (M,) strings; ``image`` (M,) int64 positions in the list, ascending (an image's
    captions are consecutive: its rows in file order, or else one per template); ``from_file``
    (M,) bool, whether each caption came from the captions file (False: a template's).
    """

    texts: list[str]
    image: np.ndarray
    from_file: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)

    def captioned_images(self) -> np.ndarray:
        """Positions (ascending, unique) of the images with at least one caption."""
        return np.unique(self.image)

    def subset(self, keep: np.ndarray) -> Captions:
        """The captions where the (M,) boolean mask ``keep`` is true."""
        keep = np.asarray(keep, bool)
        return Captions(
            [t for t, k in zip(self.texts, keep) if k], self.image[keep], self.from_file[keep]
        )


def only_captioned(images: ImageList, captions: Captions) -> tuple[ImageList, Captions]:
    """The images that have a caption, and their captions renumbered to index that list."""
    kept = captions.captioned_images()
    renumber = np.full(len(images), -1, np.int64)
    renumber[kept] = np.arange(len(kept))
    return images.subset(kept), Captions(
        list(captions.texts), renumber[captions.image], captions.from_file.copy()
    )


def load_caption_table(root: str | os.PathLike, file: str | None) -> dict[str, list[str]] | None:
    """The captions file ``file`` (relative to ``root``, or absolute) read, or None when there is
    none; rows naming images that do not exist under ``root`` are dropped with one warning (each
    folder they name is listed once: :func:`datasets.image_list.existing_files`)."""
    if not file:
        return None
    root = Path(root)
    path = Path(file) if Path(file).is_absolute() else root / file
    if not path.is_file():
        return None
    table = read_captions_file(path)
    present = existing_files(root, list(table))
    missing = [relative for relative, ok in zip(table, present) if not ok]
    if missing:
        shown = shorten(missing, 5)
        log.warning(
            "%s: %d of the %d images it captions do not exist under %s and are left out: %s",
            path,
            len(missing),
            len(table),
            root,
            shown,
        )
        for relative in missing:
            del table[relative]
    return table


def image_captions(
    images: ImageList,
    table: dict[str, list[str]] | None,
    templates: list[str] | None,
) -> Captions:
    """The captions of every image of ``images``: its rows in ``table`` (a captions file read by
    :func:`load_caption_table`), else one per template of its class. An image with neither has
    no caption (it is not in :meth:`Captions.captioned_images`)."""
    table = table or {}
    templates = list(templates or [])
    texts: list[str] = []
    image: list[int] = []
    from_file: list[bool] = []
    prompts = class_prompts(images.classes, templates) if templates else None
    for position, (relative, label) in enumerate(zip(images.paths, images.labels)):
        rows = table.get(relative)
        if rows:
            texts += rows
            from_file += [True] * len(rows)
        elif prompts is not None:
            rows = prompts[int(label)]
            texts += rows
            from_file += [False] * len(rows)
        else:
            continue
        image += [position] * len(rows)
    return Captions(texts, np.asarray(image, np.int64), np.asarray(from_file, bool))


def resolve_group_by(group_by: str, captions: Captions) -> str:
    """``auto`` -> ``class`` when every caption comes from the templates (captions of one class
    are then the same words), else ``image``; ``image`` and ``class`` stay."""
    if group_by not in GROUP_BY:
        raise UserError(f"data.captions.group_by: {group_by!r} is not one of {', '.join(GROUP_BY)}")
    if group_by != "auto":
        return group_by
    return "image" if captions.from_file.any() else "class"


def pair_groups(
    images: np.ndarray, texts: np.ndarray, classes: np.ndarray | None = None
) -> np.ndarray:
    """``(B,)`` int64 group ids of a batch of pairs: pairs i and j share a group when they show
    the same image, have the same caption (``texts``: (B,) caption ids) or, with ``classes``
    given, the same class (transitively). Pairs of one group are not negatives of each other.

    images, texts, classes: (B,) integer ids. Groups are numbered 0.. in order of first pair.
    """
    keys = [np.asarray(images), np.asarray(texts)]
    if classes is not None:
        keys.append(np.asarray(classes))
    size = len(keys[0])
    parent = np.arange(size)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for key in keys:
        first: dict[int, int] = {}
        for i, value in enumerate(key.tolist()):
            if value in first:
                a, b = find(i), find(first[value])
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first[value] = i
    roots = np.array([find(i) for i in range(size)], np.int64)
    _, groups = np.unique(roots, return_inverse=True)  # roots are each group's first pair
    return groups.astype(np.int64)
