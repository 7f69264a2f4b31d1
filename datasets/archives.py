"""The metric-learning benchmarks' archives, read as distributed, with their papers' protocol.

Four layouts, detected from their list files (or forced with ``data.format``):

- ``cub200``, CUB-200-2011: ``images.txt`` (``<image id> <path>``), ``image_class_labels.txt``
  (``<image id> <class id>``), ``classes.txt`` (``<class id> <name>``) and ``images/<path>``.
  The archive unpacks to a ``CUB_200_2011/`` folder: ``data.root`` may be that folder or the one
  holding it. Protocol: classes 1-100 train, 101-200 test (the archive's own
  ``train_test_split.txt`` is a classification split and is not used).
- ``cars196``, Cars196: ``cars_annos.mat`` (a struct array ``annotations`` with fields
  ``relative_im_path``, ``bbox_x1``..``bbox_y2``, ``class``, ``test``, and ``class_names``) and
  ``car_ims/``. Protocol: classes 1-98 train, 99-196 test; the file's own ``test`` flag is a
  classification split and is ignored, as every metric-learning paper does.
- ``sop``, Stanford Online Products: ``Ebay_train.txt`` and ``Ebay_test.txt`` (a header line,
  then ``image_id class_id super_class_id path``). The archive unpacks to
  ``Stanford_Online_Products/``: ``data.root`` may be that folder or the one holding it.
  Protocol: the two files (11,318 training classes, 11,316 test classes).
- ``inshop``, In-shop Clothes Retrieval (DeepFashion): ``list_eval_partition.txt`` (line 1: the
  count, line 2: ``image_name item_id evaluation_status``, then one row per image with status
  train, query or gallery) and the ``img/`` tree its paths start with. The file may sit in
  ``data.root`` or ``data.root/Eval/``, the tree in ``data.root/img/`` or ``data.root/Img/img/``
  (the release's own folders). Protocol: train on ``train``; queries against the gallery.

CUB-200-2011, Cars196 and SOP are class-disjoint and evaluated leave-one-out on the test split;
In-shop's test classes (its query and gallery items) are disjoint from its training classes and
evaluated query against gallery. Class ranges are the protocol's, not configurable: for another
split, use plain class folders.

Reading never opens an image and never stats one file at a time: the folders the lists name are
listed once each (``os.scandir``) and a listed image that is not there is left out, by name, in
:attr:`Archive.missing`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datasets.image_list import ImageList, existing_files, open_text
from tfcbir import UserError
from tfcbir.text import shorten

log = logging.getLogger("tfcbir")

FORMATS = ("cub200", "cars196", "sop", "inshop")  # datasets.lists.ARCHIVE_LAYOUTS

#: Display names, and the full archives' sizes (classes, images) per set, for reports.
NAMES = {
    "cub200": "CUB-200-2011",
    "cars196": "Cars196",
    "sop": "Stanford Online Products",
    "inshop": "In-shop Clothes Retrieval",
}
FULL_SIZES = {
    "cub200": {"train": (100, 5864), "test": (100, 5924)},
    "cars196": {"train": (98, 8054), "test": (98, 8131)},
    "sop": {"train": (11318, 59551), "test": (11316, 60502)},
    "inshop": {"train": (3997, 25882), "query": (3985, 14218), "gallery": (3985, 12612)},
}

CUB_FILES = ("images.txt", "image_class_labels.txt", "classes.txt")
CUB_FOLDER = "CUB_200_2011"
CARS_FILE = "cars_annos.mat"
SOP_FILES = ("Ebay_train.txt", "Ebay_test.txt")
SOP_FOLDER = "Stanford_Online_Products"
INSHOP_FILE = "list_eval_partition.txt"

#: Where each set of a protocol comes from, for messages.
PROTOCOL_SETS = {
    "cub200": {"training": "classes 1-100", "test": "classes 101-200"},
    "cars196": {"training": "classes 1-98", "test": "classes 99-196"},
    "sop": {"training": "Ebay_train.txt", "test": "Ebay_test.txt"},
    "inshop": {"train": "status train", "query": "status query", "gallery": "status gallery"},
}

CUB_TRAIN_CLASSES = range(1, 101)  # class ids 1-100; 101-200 test
CARS_TRAIN_CLASSES = range(1, 99)  # class ids 1-98; 99-196 test


@dataclass
class Archive:
    """A benchmark read with its protocol. All lists share ``root`` and ``classes``.

    ``test`` holds every evaluation image (for In-shop: the queries, then the gallery);
    ``query`` and ``gallery`` are set for In-shop only. ``missing``: listed paths (relative to
    ``root``) whose file is not there; they are in no list.
    """

    format: str
    train: ImageList
    test: ImageList
    query: ImageList | None = None
    gallery: ImageList | None = None
    missing: list[str] = field(default_factory=list)

    def check_protocol(self) -> None:
        """A UserError when a set the protocol needs has no image (a partial archive)."""
        needed = [("training", self.train), ("test", self.test)]
        if self.format == "inshop":
            needed = [("train", self.train), ("query", self.query), ("gallery", self.gallery)]
        for side, images in needed:
            if images is None or len(images) == 0:
                raise UserError(
                    f"data.root: {self.train.root} holds no {side} image of the "
                    f"{NAMES[self.format]} protocol ({PROTOCOL_SETS[self.format][side]}); use "
                    "the whole archive, or data.split.by: none"
                )


def detect(root: Path) -> tuple[str, Path] | None:
    """``(format, folder)`` of the benchmark archive at ``root`` (folder: where its lists are,
    ``root`` or the archive's own top folder inside it), or None."""
    for name in FORMATS:
        folder = _locate(name, root)
        if folder is not None:
            return name, folder
    return None


def locate(name: str, root: Path) -> Path:
    """The folder of archive ``name`` at ``root`` (``data.format`` forced); a UserError naming
    the missing file otherwise."""
    folder = _locate(name, root)
    if folder is None:
        raise UserError(f"data.format: {name!r} but {root} {_expected(name)}; {_fix(name)}")
    return folder


def read(name: str, folder: Path) -> Archive:
    """The archive ``name`` in ``folder`` (from :func:`detect` or :func:`locate`), split by its
    protocol; a set may be empty (a partial archive): see :meth:`Archive.check_protocol`."""
    reader = {"cub200": _read_cub, "cars196": _read_cars, "sop": _read_sop, "inshop": _read_inshop}
    return reader[name](Path(folder))


# -- detection --------------------------------------------------------------------------------


def _locate(name: str, root: Path) -> Path | None:
    if name == "cub200":
        candidates = [root, root / CUB_FOLDER]
        return next((f for f in candidates if all((f / n).is_file() for n in CUB_FILES)), None)
    if name == "cars196":
        return root if (root / CARS_FILE).is_file() else None
    if name == "sop":
        candidates = [root, root / SOP_FOLDER]
        return next((f for f in candidates if all((f / n).is_file() for n in SOP_FILES)), None)
    if (root / INSHOP_FILE).is_file() or (root / "Eval" / INSHOP_FILE).is_file():
        return root
    return None


def _expected(name: str) -> str:
    return {
        "cub200": f"has no {', '.join(CUB_FILES)} (nor {CUB_FOLDER}/ holding them)",
        "cars196": f"has no {CARS_FILE}",
        "sop": f"has no {' and '.join(SOP_FILES)} (nor {SOP_FOLDER}/ holding them)",
        "inshop": f"has no {INSHOP_FILE} (nor Eval/{INSHOP_FILE})",
    }[name]


def _fix(name: str) -> str:
    return {
        "cub200": f"point data.root at the unpacked {CUB_FOLDER} folder",
        "cars196": f"put {CARS_FILE} beside the unpacked car_ims/ folder and point data.root there",
        "sop": f"point data.root at the unpacked {SOP_FOLDER} folder",
        "inshop": f"point data.root at the folder holding {INSHOP_FILE} (or Eval/) and img/",
    }[name]


# -- readers ----------------------------------------------------------------------------------


def _read_cub(folder: Path) -> Archive:
    paths_by_id = _id_table(folder / "images.txt")
    class_by_id = _id_table(folder / "image_class_labels.txt")
    names_by_class = {
        _as_int(c, folder / "classes.txt"): name
        for c, name in _id_table(folder / "classes.txt").items()
    }
    class_ids = sorted(names_by_class)
    classes = [names_by_class[c] for c in class_ids]
    index = {c: i for i, c in enumerate(class_ids)}
    paths, labels = [], []
    for image_id, relative in paths_by_id.items():
        if image_id not in class_by_id:
            raise UserError(
                f"{folder / 'image_class_labels.txt'}: image {image_id} of images.txt has no "
                "class; use the archive's own files"
            )
        class_id = _as_int(class_by_id[image_id], folder / "image_class_labels.txt")
        if class_id not in index:
            raise UserError(
                f"{folder / 'image_class_labels.txt'}: class {class_id} of image {image_id} "
                "is not in classes.txt; use the archive's own files"
            )
        paths.append(f"images/{relative}")
        labels.append(index[class_id])
    train_ids = [c for c in class_ids if c in CUB_TRAIN_CLASSES]
    return _by_class_ids("cub200", folder, paths, labels, classes, class_ids, train_ids)


def _read_cars(folder: Path) -> Archive:
    import scipy.io

    path = folder / CARS_FILE
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, variable_names=["annotations", "class_names"])
    except Exception as error:  # scipy raises several types for a damaged or foreign file
        raise UserError(
            f"{path}: not a readable MATLAB file ({error}); download it again"
        ) from None
    annotations = mat.get("annotations")
    fields = getattr(getattr(annotations, "dtype", None), "names", None) or ()
    if annotations is None or not {"relative_im_path", "class"} <= set(fields):
        raise UserError(
            f"{path}: no 'annotations' struct with fields relative_im_path and class; "
            "use the Cars196 release's cars_annos.mat"
        )
    annotations = np.atleast_1d(annotations)
    paths = [_matlab_str(v) for v in annotations["relative_im_path"]]
    class_ids_per_image = [_matlab_int(v, path) for v in annotations["class"]]
    names = mat.get("class_names")
    class_ids = sorted(set(class_ids_per_image))
    if names is not None:
        names = [_matlab_str(v) for v in np.atleast_1d(names)]
        classes = [names[c - 1] if 1 <= c <= len(names) else str(c) for c in class_ids]
    else:
        classes = [str(c) for c in class_ids]
    index = {c: i for i, c in enumerate(class_ids)}
    labels = [index[c] for c in class_ids_per_image]
    train_ids = [c for c in class_ids if c in CARS_TRAIN_CLASSES]
    return _by_class_ids("cars196", folder, paths, labels, classes, class_ids, train_ids)


def _read_sop(folder: Path) -> Archive:
    sides = {}
    for name in SOP_FILES:
        path, rows = folder / name, []
        for line_number, parts in _rows(path, skip=1):
            if len(parts) != 4:
                raise UserError(
                    f"{path}:{line_number}: {' '.join(parts)!r} is not "
                    "'image_id class_id super_class_id path'; use the archive's own file"
                )
            rows.append((_as_int(parts[1], path, line_number), parts[3]))
        sides[name] = rows
    class_ids = sorted({c for rows in sides.values() for c, _ in rows})
    index = {c: i for i, c in enumerate(class_ids)}
    classes = [str(c) for c in class_ids]
    lists = []
    for rows in sides.values():
        labels = np.fromiter((index[c] for c, _ in rows), dtype=np.int32, count=len(rows))
        lists.append(ImageList(folder, [p for _, p in rows], labels, classes))
    train, test = _drop_missing(lists, folder)
    missing = train[1] + test[1]
    return Archive("sop", train[0], test[0], missing=missing)


def _read_inshop(folder: Path) -> Archive:
    listing = folder / INSHOP_FILE
    if not listing.is_file():
        listing = folder / "Eval" / INSHOP_FILE
    prefix = ""
    if not (folder / "img").is_dir() and (folder / "Img" / "img").is_dir():
        prefix = "Img/"  # the release's Img/img.zip unpacked in place
    rows = []
    declared = None
    for line_number, parts in _rows(listing):
        if line_number == 1 and len(parts) == 1 and parts[0].isdigit():
            declared = int(parts[0])
            continue
        if parts[:3] == ["image_name", "item_id", "evaluation_status"]:
            continue
        if len(parts) != 3 or parts[2] not in ("train", "query", "gallery"):
            raise UserError(
                f"{listing}:{line_number}: {' '.join(parts)!r} is not 'image_name item_id "
                "evaluation_status' with status train, query or gallery"
            )
        rows.append(parts)
    if declared is not None and declared != len(rows):
        log.warning(
            "%s: line 1 announces %d images but %d are listed", listing, declared, len(rows)
        )
    classes = sorted({item for _, item, _ in rows})
    index = {c: i for i, c in enumerate(classes)}
    lists = []
    for status in ("train", "query", "gallery"):
        chosen = [(prefix + path, index[item]) for path, item, s in rows if s == status]
        labels = np.fromiter((label for _, label in chosen), dtype=np.int32, count=len(chosen))
        lists.append(ImageList(folder, [p for p, _ in chosen], labels, classes))
    kept = _drop_missing(lists, folder)
    train, query, gallery = (images for images, _ in kept)
    missing = [path for _, gone in kept for path in gone]
    test = ImageList(
        folder,
        query.paths + gallery.paths,
        np.concatenate([query.labels, gallery.labels]),
        classes,
    )
    return Archive("inshop", train, test, query, gallery, missing)


def _by_class_ids(name, folder, paths, labels, classes, class_ids, train_ids) -> Archive:
    """Train on the images of ``train_ids``, test on the rest (CUB-200-2011, Cars196)."""
    images = ImageList(folder, paths, np.asarray(labels, dtype=np.int32), classes)
    is_train_class = np.isin(np.asarray(class_ids), train_ids)
    on_train = is_train_class[images.labels]
    (train, gone_train), (test, gone_test) = _drop_missing(
        [images.subset(on_train), images.subset(~on_train)], folder
    )
    return Archive(name, train, test, missing=gone_train + gone_test)


# -- files ------------------------------------------------------------------------------------


def _rows(path: Path, skip: int = 0):
    """``(line number, whitespace-split fields)`` of the non-blank lines after the first
    ``skip`` lines; a UserError naming the file when it is not UTF-8."""
    for line_number, line in enumerate(open_text(path), start=1):
        if line_number <= skip:
            continue
        parts = line.split()
        if parts:
            yield line_number, parts


def _id_table(path: Path) -> dict[str, str]:
    """``{first field: the rest}`` of a CUB list (``<id> <value>`` lines), in file order."""
    table = {}
    for line_number, parts in _rows(path):
        if len(parts) < 2:
            raise UserError(
                f"{path}:{line_number}: {' '.join(parts)!r} is not '<id> <value>'; use the "
                "archive's own file"
            )
        table[parts[0]] = " ".join(parts[1:])
    if not table:
        raise UserError(f"{path}: the list is empty; use the archive's own file")
    return table


def _as_int(text: str, path: Path, line_number: int | None = None) -> int:
    try:
        return int(text)
    except ValueError:
        where = f"{path}:{line_number}" if line_number else str(path)
        raise UserError(f"{where}: {text!r} is not a class number") from None


def _matlab_str(value) -> str:
    while isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else ""
    return str(value)


def _matlab_int(value, path: Path) -> int:
    while isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{path}: annotation class {value!r} is not a number") from None


def _drop_missing(lists: list[ImageList], root: Path) -> list[tuple[ImageList, list[str]]]:
    """Each list without the paths whose file is not there, and those paths; a UserError when
    none of them exists (a wrong root, or images not unpacked)."""
    every = [p for images in lists for p in images.paths]
    present = existing_files(root, every)
    if every and not present.any():
        raise UserError(
            f"data.root: none of the {len(every)} listed images exist under {root} (first: "
            f"{every[0]}); unpack the archive's images there"
        )
    out, start = [], 0
    for images in lists:
        mask = present[start : start + len(images)]
        start += len(images)
        gone = [p for p, ok in zip(images.paths, mask) if not ok]
        out.append((images.subset(mask) if gone else images, gone))
    gone_all = [path for _, gone in out for path in gone]
    if gone_all:
        shown = shorten(gone_all, 10)
        log.warning(
            "%s: %d of %d listed images do not exist and are left out: %s",
            root,
            len(gone_all),
            len(every),
            shown,
        )
    return out
