"""Which images are queries and which the gallery, by ``eval.protocol``.

- ``train_gallery``: test-split queries against the training split (a catalogue searched with
  new photos);
- ``leave_one_out``: the test split against itself, each query left out of its own answers (the
  class-disjoint benchmarks' protocol);
- ``query_gallery``: explicit query and gallery lists: ``eval.query_list`` and
  ``eval.gallery_list`` (CSV ``label,relative/path`` files in the data root), or else the data
  set's own (the In-shop archive's ``list_eval_partition.txt``).
``auto`` is query_gallery when the data set has its own query and gallery lists (In-shop),
leave_one_out when test and training classes are disjoint, else train_gallery.
Each set of images is embedded once into ``<run>/embeddings/<set>.h5``
(:meth:`runs.folder.RunFolder.gallery`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

import config as cfg
from datasets.lists import ImageList, Splits, load_splits, read_csv_list
from tfcbir import UserError

SET_NAMES = ["train", "test", "all", "query", "gallery"]


@dataclass(frozen=True)
class Protocol:
    name: str
    queries: str  # the set the queries come from
    gallery: str  # the set searched

    @property
    def leave_one_out(self) -> bool:
        return self.queries == self.gallery


def splits(config: dict) -> Splits:
    data = config["data"]
    return load_splits(cfg.data_root(config), data["split"], config["seed"], data["format"])


def needs_splits(config: dict, *names: str) -> bool:
    """Whether resolving ``config``'s protocol or the images of the sets ``names`` reads the data
    set's split (:func:`splits`, which lists the data root): all but a ``query_gallery`` protocol
    whose query and gallery come from ``eval.query_list`` and ``eval.gallery_list``. Commands
    that open several sets read it once and pass it on as ``made``."""
    listed = bool(config["eval"]["query_list"] or config["eval"]["gallery_list"])
    if config["eval"]["protocol"] != "query_gallery":
        return True
    return any(name not in ("query", "gallery") or not listed for name in names)


def protocol(config: dict, made: Splits | None = None) -> Protocol:
    """The evaluation protocol of ``config``, ``auto`` resolved from the split."""
    name = config["eval"]["protocol"]
    if name == "auto":
        made = made or splits(config)
        if made.query is not None and made.gallery is not None:
            name = "query_gallery"
        elif made.test is None or made.class_disjoint:
            name = "leave_one_out"
        else:
            name = "train_gallery"
    if name == "train_gallery":
        return Protocol(name, "test", "train")
    if name == "leave_one_out":
        made = made or splits(config)
        return Protocol(
            name,
            "test" if made.test is not None else "train",
            "test" if made.test is not None else "train",
        )
    return Protocol(name, "query", "gallery")


def images(config: dict, name: str, made: Splits | None = None) -> ImageList:
    """The images of set ``name``: train, test, all (both), query or gallery.

    query and gallery come from ``eval.query_list`` and ``eval.gallery_list`` when they are set,
    else from the data set's own lists (In-shop)."""
    if name in ("query", "gallery"):
        if config["eval"]["query_list"] or config["eval"]["gallery_list"]:
            return _listed(config, name)
        made = made or splits(config)
        own = made.query if name == "query" else made.gallery
        if own is None:
            raise UserError(
                f"eval.{name}_list: not set, and {cfg.data_root(config)} has no query and "
                "gallery lists of its own; set eval.query_list and eval.gallery_list (CSV "
                "files of label,relative/path), or use another eval.protocol"
            )
        return own
    made = made or splits(config)
    if name == "train":
        return made.train
    if name == "test":
        if made.test is None:
            raise UserError(
                f"the data set {cfg.data_root(config)} has no test split "
                f"(data.split.by: {config['data']['split']['by']}); use --split train "
                "or all"
            )
        return made.test
    if made.test is None:
        return made.train
    return ImageList(
        made.train.root,
        made.train.paths + made.test.paths,
        np.concatenate([made.train.labels, made.test.labels]),
        made.train.classes,
    )


def _listed(config: dict, name: str) -> ImageList:
    key = f"eval.{name}_list"
    relative = config["eval"][f"{name}_list"]
    if not relative:
        raise UserError(
            f"{key}: not set; query and gallery sets need eval.query_list and "
            "eval.gallery_list (CSV files of label,relative/path)"
        )
    root = cfg.data_root(config)
    lists = {}
    for which in ("query", "gallery"):
        path = root / config["eval"][f"{which}_list"] if config["eval"][f"{which}_list"] else None
        if path is not None:
            if not path.is_file():
                raise UserError(f"eval.{which}_list: {path} does not exist")
            lists[which] = read_csv_list(path)
    classes = sorted({label for rows in lists.values() for label, _ in rows})
    index = {c: i for i, c in enumerate(classes)}
    rows = lists[name]
    missing = [p for _, p in rows if not (root / p).is_file()]
    if missing:
        raise UserError(
            f"{key}: {len(missing)} listed images do not exist under {root}, e.g. {missing[0]}"
        )
    return ImageList(
        Path(root),
        [p for _, p in rows],
        np.array([index[label] for label, _ in rows], np.int32),
        classes,
    )
