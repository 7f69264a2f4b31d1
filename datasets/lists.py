"""Image lists and train/test splits of a data root.

A data root is laid out in one of these ways (its *layout*, detected or forced by ``format``):

- ``class_folders``: ``root/<class>/<image>``, one sub-folder per class (split here by images or
  by classes);
- ``split_folders``: ``root/train/<class>/<image>`` and ``root/test/<class>/<image>``;
- ``csv``: ``root/x_train.csv`` and ``root/x_test.csv``, the original system's lists, one
  ``label,relative/path`` line per image (see :func:`read_csv_list`);
- ``cub200``, ``cars196``, ``sop``, ``inshop``: a metric-learning benchmark's archive as
  distributed, split by its papers' protocol (:mod:`datasets.archives`).

:func:`load_splits` turns a root and the config's ``data.split`` section into a :class:`Splits`
of :class:`~datasets.image_list.ImageList` (defined below this module, with the list-file readers,
so that :mod:`datasets.archives` reads its lists without this module and this module imports it).
Everything is deterministic: folders and files are sorted, and the random splits use NumPy
generators seeded with the run's seed.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datasets import archives
from datasets.image_list import ImageList, csv_rows, existing_files
from datasets.images import IMAGE_EXTENSIONS, is_image_name
from tfcbir import UserError
from tfcbir.text import shorten

log = logging.getLogger("tfcbir")

SPLIT_KINDS = ("images", "classes", "folders", "csv", "protocol", "none")
CLASS_ORDERS = ("random", "sorted")
TRAIN_CSV, TEST_CSV = "x_train.csv", "x_test.csv"
ARCHIVE_LAYOUTS = archives.FORMATS
LAYOUTS = ("class_folders", "split_folders", "csv", *ARCHIVE_LAYOUTS)

# The split's own random stream, kept apart from the sampler's [seed, round] streams.
_SPLIT_STREAM = 0x5911


@dataclass
class Splits:
    """The training list, the test list (None when there is none) and how they were made.

    ``kind`` is the split actually used: images, classes, folders, csv, protocol (a benchmark
    archive's own) or none (never auto). ``layout`` is the root's layout (one of
    :data:`LAYOUTS`). ``query`` and ``gallery``: the data set's own query and gallery lists
    (In-shop), whose images are ``test``'s; None otherwise. ``missing``: listed images (paths
    relative to the root) that do not exist and are in no list.
    """

    train: ImageList
    test: ImageList | None
    kind: str
    layout: str = "class_folders"
    query: ImageList | None = None
    gallery: ImageList | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def class_disjoint(self) -> bool:
        """Whether no test class has a training image (the metric-learning benchmarks' protocol):
        True for ``by: classes`` and for lists or folders whose classes happen not to overlap."""
        if self.test is None:
            return False
        return len(np.intersect1d(self.train.labels, self.test.labels)) == 0


@dataclass
class ValidationSplit:
    """The images a run trains on, those it selects its model on, and where those came from.

    ``source`` is the resolved ``train.validation.source``: holdout (carved out of the training
    split: whole classes when the split is class-disjoint, else a share of each class's images),
    test (the test split itself) or none.
    """

    train: ImageList
    validation: ImageList | None
    source: str


def load_splits(root: str | os.PathLike, split: dict, seed: int, format: str = "auto") -> Splits:
    """Read the data root and split it as ``split`` says.

    ``split``: ``{"by": auto|images|classes|folders|csv|protocol|none, "test_fraction": 0.2,
    "train_classes": 0.5, "order": "random"}`` (missing keys take these defaults).
    ``format``: the root's layout, one of :data:`LAYOUTS`, or auto: a benchmark archive if its
    list files are there (:func:`datasets.archives.detect`), else split_folders if root/train
    and root/test exist, else csv if root/x_train.csv exists, else class_folders.

    - auto: the layout's own split: protocol for an archive, folders, csv, or images for class
      folders.
    - images: stratified; each class gives round(test_fraction * n) of its n images (rounded half
      up) to test, drawn at random, but always keeps at least one for training, so a class with a
      single image stays in train only.
    - classes: class-disjoint; round(train_classes * C) classes (half up) train, the rest test.
      order=random (default) takes the first classes of a seeded permutation; order=sorted takes
      the first classes in sorted name order (for class folders named so that they sort by class
      number).
    - folders, csv: the lists given; csv without x_test.csv has no test list.
    - protocol: a benchmark archive's fixed split (:mod:`datasets.archives`); In-shop also gives
      ``query`` and ``gallery``.
    - none: every image is for training (on a pre-split root: train and test together).

    Raises UserError (one line) for a missing root, no classes or images, an empty side of a
    split, or a ``by`` or ``format`` that does not match the root.
    """
    root = Path(os.path.abspath(os.fspath(root)))
    by = split.get("by", "auto")
    test_fraction = float(split.get("test_fraction", 0.2))
    train_classes = float(split.get("train_classes", 0.5))
    order = split.get("order", "random")
    _check_split_options(root, by, order, format)
    layout, folder = _layout(root, format)
    if by == "auto":
        by = {"split_folders": "folders", "csv": "csv", "class_folders": "images"}.get(
            layout, "protocol"
        )
    _check_split_fits(by, layout, root)
    if layout in ARCHIVE_LAYOUTS:
        return _archive_splits(layout, folder, by)
    if layout == "split_folders":
        train, test = _read_split_folders(root)
        if by == "none":
            return Splits(_concat(train, test), None, "none", layout)
        return Splits(train, test, "folders", layout)
    if layout == "csv":
        train, test, missing = _read_csv_lists(root)
        if by == "none":
            return Splits(_concat(train, test), None, "none", layout, missing=missing)
        return Splits(train, test, "csv", layout, missing=missing)
    return _class_folder_splits(root, by, test_fraction, train_classes, order, seed)


def _check_split_options(root: Path, by: str, order: str, format: str) -> None:
    """UserError for a ``by``, ``order`` or ``format`` that is not one of the choices, or a root
    that is not a folder."""
    if by not in ("auto", *SPLIT_KINDS):
        raise UserError(f"data.split.by: {by!r} is not one of auto, {', '.join(SPLIT_KINDS)}")
    if order not in CLASS_ORDERS:
        raise UserError(f"data.split.order: {order!r} is not one of {', '.join(CLASS_ORDERS)}")
    if format not in ("auto", *LAYOUTS):
        raise UserError(f"data.format: {format!r} is not one of auto, {', '.join(LAYOUTS)}")
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise UserError(
            f"data.root: {root} {what}; give the folder holding the class folders "
            "(or train/ and test/, x_train.csv, or a benchmark archive)"
        )


def _archive_splits(layout: str, folder: Path, by: str) -> Splits:
    """A benchmark archive's protocol split (``by`` protocol), or all its images (``by`` none)."""
    archive = archives.read(layout, folder)
    if by == "none":
        images = _concat(archive.train, archive.test)
        return Splits(images, None, "none", layout, missing=archive.missing)
    archive.check_protocol()
    return Splits(
        archive.train,
        archive.test,
        "protocol",
        layout,
        archive.query,
        archive.gallery,
        archive.missing,
    )


def _class_folder_splits(
    root: Path, by: str, test_fraction: float, train_classes: float, order: str, seed: int
) -> Splits:
    """The images of ``root/<class>/`` split ``by`` images (stratified), classes, or none."""
    images = scan_class_folders(root)
    if by == "none":
        return Splits(images, None, "none", "class_folders")
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    if by == "images":
        test_mask = _stratified_test_mask(images.labels, len(images.classes), test_fraction, rng)
        if not test_mask.any():
            raise UserError(
                f"data.split.test_fraction: {test_fraction:g} leaves no test image "
                f"in {root} (each class keeps one image for training); raise it, "
                "add images, or use data.split.by: none"
            )
    else:
        test_mask = _class_disjoint_test_mask(images, train_classes, order, rng, root)
    return Splits(images.subset(~test_mask), images.subset(test_mask), by, "class_folders")


def _check_split_fits(by: str, layout: str, root: Path) -> None:
    """A UserError when ``data.split.by`` cannot split a root of this layout."""
    if by in ("images", "classes") and layout != "class_folders":
        where = {
            "split_folders": "train/ and test/ folders",
            "csv": TRAIN_CSV,
        }.get(layout, f"the {layout} archive, whose split is its protocol's")
        raise UserError(
            f"data.split.by: {by!r} but {root} is already split ({where}); use "
            "data.split.by: auto, or point data.root at a folder of class folders"
        )
    if by == "folders" and layout != "split_folders":
        raise UserError(
            f"data.split.by: 'folders' but {root} has no train/ and test/ folders; "
            "add root/train/<class>/ and root/test/<class>/, or use data.split.by: "
            "auto"
        )
    if by == "csv" and layout != "csv":
        raise UserError(
            f"data.split.by: 'csv' but {root / TRAIN_CSV} does not exist; write the "
            "lists (lines 'label,relative/path') or use data.split.by: auto"
        )
    if by == "protocol" and layout not in ARCHIVE_LAYOUTS:
        raise UserError(
            f"data.split.by: 'protocol' but {root} is not a benchmark archive "
            f"({', '.join(ARCHIVE_LAYOUTS)}); use data.split.by: auto, or set data.format"
        )


def _layout(root: Path, format: str = "auto") -> tuple[str, Path]:
    """``(layout, folder)``: one of :data:`LAYOUTS`, and the folder holding its files (root,
    or a benchmark archive's own top folder inside it)."""
    if format in ARCHIVE_LAYOUTS:
        return format, archives.locate(format, root)
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if format == "split_folders":
        if not (has_train and has_test):
            raise UserError(
                f"data.format: 'split_folders' but {root} has no train/ and test/ folders; "
                "add them, or use data.format: auto"
            )
        return format, root
    if format == "csv":
        if not (root / TRAIN_CSV).is_file():
            raise UserError(
                f"data.format: 'csv' but {root / TRAIN_CSV} does not exist; write the lists "
                "(lines 'label,relative/path') or use data.format: auto"
            )
        return format, root
    if format == "class_folders":
        return format, root
    found = archives.detect(root)
    if found is not None:
        return found
    if has_train and has_test:
        return "split_folders", root
    if (root / TRAIN_CSV).is_file():
        return "csv", root
    if has_train != has_test:
        present, absent = ("train", "test") if has_train else ("test", "train")
        raise UserError(
            f"data.root: {root} has {present}/ but no {absent}/; add "
            f"{root / absent}/<class>/ folders, or rename {present}/ if it is a class"
        )
    return "class_folders", root


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5 + 1e-9)  # 1e-9: 0.1 * 25 = 2.5000000000000004 and 2.4999... alike


def _stratified_test_mask(
    labels: np.ndarray, num_classes: int, test_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """``(N,)`` bool: round(test_fraction * n) random images of each class, n - 1 at most."""
    test = np.zeros(len(labels), dtype=bool)
    # Each class's members in ascending index order, as slices of one stable sort: O(N log N)
    # for sets of many classes (a scan per class would be O(C N)).
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    for start, count in zip(starts, counts):  # in label order, so the draws are reproducible
        n_test = min(_round_half_up(test_fraction * count), count - 1)
        if n_test > 0:
            test[rng.permutation(order[start : start + count])[:n_test]] = True
    return test


def _class_disjoint_test_mask(
    images: ImageList, train_classes: float, order: str, rng: np.random.Generator, root: Path
) -> np.ndarray:
    """``(N,)`` bool: the images of the test classes."""
    num_classes = len(images.classes)
    n_train = _round_half_up(train_classes * num_classes)
    if n_train < 1 or n_train >= num_classes:
        side = "no training class" if n_train < 1 else "no test class"
        raise UserError(
            f"data.split.train_classes: {train_classes:g} of the {num_classes} "
            f"classes in {root} leaves {side}; choose a share that keeps at least one "
            "class on each side, or use data.split.by: images"
        )
    ranked = np.arange(num_classes) if order == "sorted" else rng.permutation(num_classes)
    is_test_class = np.ones(num_classes, dtype=bool)
    is_test_class[ranked[:n_train]] = False
    return is_test_class[images.labels]


def _list_images(folder: Path) -> list[str]:
    """Names of the visible image files directly inside ``folder``, sorted."""
    with os.scandir(folder) as entries:
        return sorted(
            e.name
            for e in entries
            if not e.name.startswith(".") and is_image_name(e.name) and e.is_file()
        )


def _class_folders(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def _scan(folder: Path) -> dict[str, list[str]]:
    """``{class: [image names]}`` of a folder of class folders; folders without images left out
    with a warning."""
    found = {}
    empty = []
    for name in _class_folders(folder):
        files = _list_images(folder / name)
        if files:
            found[name] = files
        else:
            empty.append(name)
    if empty:
        shown = shorten(empty, 10)
        log.warning("%s: %d class folder(s) without images ignored: %s", folder, len(empty), shown)
    return found


def _no_images_error(folder: Path, has_folders: bool) -> UserError:
    suffixes = ", ".join(sorted(IMAGE_EXTENSIONS))
    if has_folders:
        return UserError(
            f"data.root: the class folders in {folder} hold no images ({suffixes}); "
            "put each class's images directly in its folder"
        )
    return UserError(
        f"data.root: {folder} has no class folders; put the images of each class "
        "in a sub-folder named after the class (root/<class>/<image>)"
    )


def scan_class_folders(root: str | os.PathLike) -> ImageList:
    """All images of ``root/<class>/<image>``: classes are the sorted folder names, images the
    sorted visible files with an image suffix directly in each (hidden ones ignored)."""
    root = Path(os.path.abspath(os.fspath(root)))
    found = _scan(root)
    if not found:
        raise _no_images_error(root, bool(_class_folders(root)))
    classes = sorted(found)
    paths, labels = [], []
    for label, name in enumerate(classes):
        paths += [f"{name}/{file}" for file in found[name]]
        labels += [label] * len(found[name])
    return ImageList(root, paths, np.array(labels, dtype=np.int32), classes)


def _read_split_folders(root: Path) -> tuple[ImageList, ImageList]:
    """root/train/<class>/ and root/test/<class>/: one label space, the union of the classes."""
    sides = {side: _scan(root / side) for side in ("train", "test")}
    for side, found in sides.items():
        if not found:
            raise _no_images_error(root / side, bool(_class_folders(root / side)))
    classes = sorted(set(sides["train"]) | set(sides["test"]))
    index = {name: i for i, name in enumerate(classes)}
    lists = []
    for side, found in sides.items():
        paths, labels = [], []
        for name in sorted(found):
            paths += [f"{side}/{name}/{file}" for file in found[name]]
            labels += [index[name]] * len(found[name])
        lists.append(ImageList(root, paths, np.array(labels, dtype=np.int32), classes))
    return lists[0], lists[1]


def read_csv_list(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``[(label, relative path), ...]`` of a ``label,relative/path`` list.

    The label is a class name or an integer; a path may contain commas (everything after the
    first field is the path) or be quoted. Blank lines are skipped. The first line is a header,
    and skipped, when its path does not end with an image suffix and no such file exists.
    """
    path = Path(path)
    rows = []
    for line_number, row in enumerate(csv_rows(path), start=1):
        if not row or all(not field.strip() for field in row):
            continue
        if len(row) < 2:
            raise UserError(
                f"{path}:{line_number}: {','.join(row)!r} is not "
                "'label,relative/path'; give the class and the image path"
            )
        label, relative = row[0].strip(), ",".join(row[1:]).strip()
        if not rows and line_number == 1 and _looks_like_header(path.parent, relative):
            continue
        rows.append((label, relative))
    return rows


def _looks_like_header(root: Path, relative: str) -> bool:
    return not is_image_name(relative) and not (root / relative).is_file()


def _read_csv_lists(root: Path) -> tuple[ImageList, ImageList | None, list[str]]:
    """x_train.csv (and x_test.csv if present): labels by class name or integer; and the listed
    paths whose file does not exist (left out)."""
    files = [root / TRAIN_CSV] + ([root / TEST_CSV] if (root / TEST_CSV).is_file() else [])
    if len(files) == 1:
        log.warning("%s: no %s next to %s; there is no test list", root, TEST_CSV, TRAIN_CSV)
    entries, missing = [], []
    for file in files:
        kept, gone = _existing(file, read_csv_list(file), root)
        entries.append(kept)
        missing += gone
    names = {label for rows in entries for label, _ in rows}
    if all(_is_int(name) for name in names):
        classes = sorted(names, key=int)  # numeric order: "2" before "10"
    else:
        classes = sorted(names)
    index = {name: i for i, name in enumerate(classes)}
    lists = [
        ImageList(
            root,
            [p for _, p in rows],
            np.array([index[c] for c, _ in rows], dtype=np.int32),
            classes,
        )
        for rows in entries
    ]
    return lists[0], (lists[1] if len(lists) > 1 else None), missing


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _existing(
    file: Path, rows: list[tuple[str, str]], root: Path
) -> tuple[list[tuple[str, str]], list[str]]:
    """Rows whose image exists, paths made posix and relative to root, and the (normalised)
    paths of the missing ones, dropped with a warning (a UserError if none exists)."""
    if not rows:
        raise UserError(
            f"{file}: the list is empty; write one 'label,relative/path' line per image"
        )
    normalised = [(label, relative_to_root(relative, root)) for label, relative in rows]
    present = existing_files(root, [path for _, path in normalised])
    kept = [row for row, ok in zip(normalised, present) if ok]
    missing = [path for (_, path), ok in zip(normalised, present) if not ok]
    if not kept:
        raise UserError(
            f"{file}: none of its {len(rows)} images exist (first: "
            f"{root / missing[0]}); paths must be relative to {root}"
        )
    if missing:
        shown = shorten(missing, 10)
        log.warning(
            "%s: %d of %d listed images do not exist and are left out: %s",
            file,
            len(missing),
            len(rows),
            shown,
        )
    return kept, missing


def relative_to_root(relative: str, root: Path) -> str:
    """A CSV path as posix text relative to root ('./a\\b.jpg' -> 'a/b.jpg'); absolute paths
    outside root stay absolute (``root / absolute`` is still the file)."""
    text = relative.replace("\\", "/")
    if os.path.isabs(text):
        try:
            return Path(text).relative_to(root).as_posix()
        except ValueError:
            return Path(text).as_posix()
    return Path(os.path.normpath(text)).as_posix()


def _concat(first: ImageList, second: ImageList | None) -> ImageList:
    """One list of two that share root and classes."""
    if second is None:
        return first
    return ImageList(
        first.root,
        first.paths + second.paths,
        np.concatenate([first.labels, second.labels]),
        first.classes,
    )


# The holdout's own random stream, apart from the split's and the sampler's.
_HOLDOUT_STREAM = 7
VALIDATION_SOURCES = ("auto", "holdout", "test", "none")


def validation_split(splits: Splits, source: str, share: float, seed: int) -> ValidationSplit:
    """Carve the validation images for model selection out of ``splits``.

    source: auto or holdout (the default: never the test split, whose metrics would then be
    optimistic), test (the test split; its numbers are then optimistic) or none.
    share: the held-out share (of the classes for a class-disjoint split, else of each class's
    images; a class keeps at least one training image). Seeded by ``seed``.
    A holdout that would leave nothing out (every class has one image) becomes ``none``.
    Raises UserError for ``test`` without a test split, or a holdout leaving no training class.
    """
    if source not in VALIDATION_SOURCES:
        raise UserError(
            f"train.validation.source: {source!r} is not one of {', '.join(VALIDATION_SOURCES)}"
        )
    if source == "none":
        return ValidationSplit(splits.train, None, "none")
    if source == "test":
        if splits.test is None:
            raise UserError(
                "train.validation.source: 'test' but the split has no test part; "
                "use 'holdout' (the default)"
            )
        return ValidationSplit(splits.train, splits.test, "test")
    images = splits.train
    rng = np.random.default_rng([seed, _HOLDOUT_STREAM])
    labels = images.labels
    classes = np.unique(labels)
    if splits.class_disjoint:
        count = max(1, _round_half_up(share * len(classes)))
        if count >= len(classes):
            raise UserError(
                f"train.validation.holdout: {share:g} of the {len(classes)} training classes "
                "leaves no class to train on; lower it, or set train.validation.source: none"
            )
        held = np.isin(labels, rng.permutation(classes)[:count])
    else:
        held = _stratified_test_mask(labels, len(images.classes), share, rng)
    if not held.any():
        log.warning(
            "train.validation: no image can be held out of %d training images (one per class?); "
            "training without validation, the last weights are the model",
            len(images),
        )
        return ValidationSplit(images, None, "none")
    return ValidationSplit(images.subset(~held), images.subset(held), "holdout")
