"""``train.py --check``: a config and its data checked without training (no model is built).

:func:`check` resolves what a run and its evaluation would use (the layout of ``data.root``, the
split, the validation holdout, the evaluation protocol and its query and gallery sets), decodes
every image those sets name once (as training decodes them), and returns a report (a dict that
is also the ``--json`` output). :func:`report` renders it for people.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np

import config as cfg
from datasets import archives
from datasets.lists import ImageList
from datasets.pipeline import find_unreadable
from retrieval import sets
from retrieval.rerank import RerankSpec
from training.validation import choose_validation

MISSING = "listed, but the file does not exist"


def check(
    config: dict,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """The report of a resolved config: a dict with keys

    - ``data_root`` (absolute), ``layout`` (one of ``datasets.lists.LAYOUTS``), ``split`` (the
      split used: images, classes, folders, csv, protocol or none);
    - ``splits``: ``{"train", "validation", "test", "query", "gallery"}``, each
      ``{"classes": int, "images": int}`` or None when the run has no such set ("train" is what
      training samples from, the validation holdout taken out; "query" and "gallery" are set
      for the query_gallery protocol);
    - ``validation``: ``{"source": holdout|test|none}``;
    - ``protocol``: ``{"name", "queries", "gallery"}`` (set names), ``query_images``,
      ``gallery_images`` and ``on_training_images``;
    - ``images_checked`` (distinct files decoded) and ``unreadable``: ``[{"path", "problem"}]``
      with absolute paths: listed files that do not exist, then the files that cannot be
      decoded, in list order;
    - ``notes``: lines a user should read (a partial archive, optimistic validation, ...);
    - ``config``: the resolved config.

    Raises UserError for what would stop a run (a bad root, an impossible split or protocol).
    """
    RerankSpec.parse(config["eval"]["rerank"])  # checked where it is used, and here
    made = sets.splits(config)
    chosen = choose_validation(config, made)
    train_images, validation, source = chosen.train, chosen.validation, chosen.source
    protocol = sets.protocol(config, made)
    queries = sets.images(config, protocol.queries, made)
    gallery = sets.images(config, protocol.gallery, made)

    paths, unreadable = _unreadable(
        config, made, [made.train, made.test, queries, gallery], workers, progress
    )
    query_gallery = protocol.name == "query_gallery"
    result = {
        "data_root": str(cfg.data_root(config)),
        "layout": made.layout,
        "split": made.kind,
        "splits": {
            "train": _counts(train_images),
            "validation": _counts(validation),
            "test": _counts(made.test),
            "query": _counts(queries) if query_gallery else None,
            "gallery": _counts(gallery) if query_gallery else None,
        },
        "validation": {"source": source},
        "protocol": {
            "name": protocol.name,
            "queries": protocol.queries,
            "gallery": protocol.gallery,
            "query_images": len(queries),
            "gallery_images": len(gallery),
            "on_training_images": protocol.queries == "train",
        },
        "images_checked": len(paths),
        "unreadable": unreadable,
        "notes": [],
        "config": config,
    }
    result["notes"] = _notes(result, made)
    return result


def _unreadable(config: dict, made, lists: list, workers, progress) -> tuple[list, list]:
    """The distinct files of ``lists`` (absolute paths, in order) and the report's
    ``unreadable``: the listed files that do not exist, then those that cannot be decoded."""
    paths = [p for images in lists if images is not None for p in images.absolute_paths()]
    paths = list(dict.fromkeys(paths))  # test, query and gallery overlap
    data = config["data"]
    size = data["resize"] or data["image_size"]
    failures = find_unreadable(paths, size=tuple(size), workers=workers, progress=progress)
    root = made.train.root
    unreadable = [{"path": os.path.join(root, p), "problem": MISSING} for p in made.missing]
    unreadable += [{"path": paths[i], "problem": error.problem} for i, error in failures]
    return paths, unreadable


def _counts(images: ImageList | None) -> dict | None:
    if images is None:
        return None
    return {"classes": int(np.unique(images.labels).size), "images": len(images)}


def _notes(result: dict, made) -> list[str]:
    notes = []
    layout = result["layout"]
    if layout in archives.FULL_SIZES and result["split"] == "protocol":
        found = {
            "train": made.train,
            "test": made.test,
            "query": made.query,
            "gallery": made.gallery,
        }
        for name, (classes, images) in archives.FULL_SIZES[layout].items():
            counts = _counts(found[name])
            if counts != {"classes": classes, "images": images}:
                notes.append(
                    f"the full {archives.NAMES[layout]} archive has {classes:,} classes and "
                    f"{images:,} images in its {name} set; found {counts['classes']:,} and "
                    f"{counts['images']:,}: results are not comparable with published ones"
                )
    if result["validation"]["source"] == "test":
        notes.append(
            "validation runs on the test split: the best model is chosen on the test queries, "
            "so its test metrics are optimistic (train.validation.source: holdout avoids it)"
        )
    if result["protocol"]["on_training_images"]:
        notes.append("there is no test split: evaluation would score the training images")
    return notes


def report(result: dict) -> str:
    """The human-readable form of :func:`check`'s result."""
    lines = ["resolved config:"]
    lines += [f"  {key} = {value}" for key, value in _flat(result["config"])]
    archive = archives.NAMES.get(result["layout"])
    lines.append(
        f"data {result['data_root']}: layout {result['layout']}"
        + (f" ({archive})" if archive else "")
        + f", split by {result['split']}"
    )
    source = result["validation"]["source"]
    for name, counts in result["splits"].items():
        if counts is None:
            continue
        what = ""
        if name == "validation":
            what = " (the test split)" if source == "test" else " (held out of training)"
        lines.append(
            f"  {name:<10} {counts['classes']:>8,} classes {counts['images']:>9,} images{what}"
        )
    if source == "none":
        lines.append("  validation none (the last weights are the model)")
    protocol = result["protocol"]
    if protocol["queries"] == protocol["gallery"]:
        sets_text = (
            f"the {protocol['queries']} set against itself ({protocol['query_images']:,} images)"
        )
    else:
        sets_text = (
            f"{protocol['query_images']:,} {protocol['queries']} images against "
            f"{protocol['gallery_images']:,} {protocol['gallery']} images"
        )
    lines.append(f"evaluation: {protocol['name']}, {sets_text}")
    unreadable = result["unreadable"]
    if unreadable:
        lines.append(
            f"images: {result['images_checked']:,} checked, {len(unreadable):,} unreadable "
            "(training and embedding skip them):"
        )
        lines += [f"  {item['path']}: {item['problem']}" for item in unreadable]
    else:
        lines.append(f"images: {result['images_checked']:,} checked, all readable")
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)


def _flat(value, prefix: str = ""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flat(item, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, json.dumps(value)
