"""``analysis.py --duplicates``'s work: the near-duplicate groups of a run's gallery of one set
(:func:`retrieval.duplicates.duplicate_groups`, over the run's index), written as
``<run>/analysis/duplicates-<split>.csv`` and a picture of the largest groups,
``duplicates-<split>.png``.

The threshold is a score (the index's: cosine for normalised galleries, the negative Euclidean
distance otherwise); by default the run's same-item threshold, which
``evaluation.py --verification`` saves in ``<run>/evaluation/verification.json``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.images import ImageError, load_image
from report.baseline import image_root
from report.figures import save_image
from retrieval import sets
from retrieval.duplicates import duplicate_groups
from retrieval.evaluate import open_gallery, same_item_threshold
from retrieval.faiss_index import open_index
from retrieval.gallery import Gallery
from retrieval.lance_gallery import uses_lancedb
from retrieval.search import similarity
from retrieval.visualize import BACKGROUND, result_grid
from runs.folder import RunFolder
from tfcbir import UserError
from tfcbir.files import atomic_output

#: Groups drawn in the picture, and members drawn of each (the first item and its followers).
GROUPS_SHOWN = 8
MEMBERS_SHOWN = 8
THUMB = 96
FIELDS = ["group", "size", "path", "class", "score"]


def check_threshold(text: str, normalized: bool) -> float:
    """--threshold's value as a score: a finite number, in [-1, 1] for cosine scores and <= 0
    for negative distances; UserError otherwise."""
    try:
        threshold = float(text)
    except ValueError:
        threshold = math.nan
    if not math.isfinite(threshold):
        raise UserError(f"--threshold {text}: give a finite number (a score)")
    if normalized and not -1 <= threshold <= 1:
        raise UserError(f"--threshold {text}: cosine scores lie in [-1, 1]")
    if not normalized and threshold > 0:
        raise UserError(f"--threshold {text}: scores are negative Euclidean distances (<= 0)")
    return threshold


def find_duplicates(
    config: dict,
    split: str,
    threshold: str | None = None,
    *,
    config_path: str | None = None,
    checkpoint=None,
) -> dict:
    """Group the near-duplicates of the gallery of ``split``, write the CSV and the picture
    into ``<run>/analysis/``; returns the numbers (:func:`summary` prints them)."""
    if split not in sets.SET_NAMES:
        raise UserError(f"--split {split}: unknown set; give one of {', '.join(sets.SET_NAMES)}")
    gallery = open_gallery(config, split, config_path, checkpoint=checkpoint)
    if threshold is None:
        score = same_item_threshold(
            config,
            gallery.model_id,
            needed_by="--duplicates",
            config_path=config_path,
            instead="give --threshold, or ",
        )
    else:
        score = check_threshold(threshold, gallery.normalized)
    index = open_index(  # a LanceDB gallery's vectors are searched here exactly
        gallery,
        "exact" if uses_lancedb(config) else config["index"]["type"],
        search_parameters=config["index"]["search_parameters"],
        config_path=config_path,
    )
    groups = duplicate_groups(index, gallery.embeddings, score)
    folder = RunFolder.of(config).analyses
    folder.mkdir(parents=True, exist_ok=True)
    result = {
        "split": split,
        "threshold": score,
        "score": "cosine" if gallery.normalized else "negative Euclidean distance",
        "images": len(gallery),
        "groups": len(groups),
        "images_in_groups": int(sum(len(group) for group in groups)),
        "largest_group": int(len(groups[0])) if groups else 0,
        "csv": str(write_groups(folder / f"duplicates-{split}.csv", gallery, groups)),
        "picture": None,
    }
    picture_path = folder / f"duplicates-{split}.png"
    if groups:
        picture = groups_picture(gallery, groups, image_root(config, gallery))
        result["picture"] = str(save_image(picture, picture_path))
    else:  # a picture of an earlier threshold's groups would contradict the CSV
        picture_path.unlink(missing_ok=True)
    return result


def scores_to_first(gallery: Gallery, group: np.ndarray) -> np.ndarray:
    """The score (G,) of each member of ``group`` (G,) to its first item (its own: the top
    score, 1 for cosine or 0 for distances)."""
    first = gallery.embeddings[group[:1]]
    return similarity(first, gallery.embeddings[group], normalized=gallery.normalized)[0]


def write_groups(path: Path, gallery: Gallery, groups: list[np.ndarray]) -> Path:
    """The CSV: one row per image in a group (group number from 1, largest first; its size; the
    image's path and class; its score to the group's first item); a header alone when none."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(FIELDS)
        for number, group in enumerate(groups, start=1):
            for item, score in zip(group, scores_to_first(gallery, group), strict=True):
                label = int(gallery.labels[item])
                row = [number, len(group), gallery.paths[item], gallery.classes[label]]
                writer.writerow(row + [f"{score:.6f}"])
    return path


def groups_picture(gallery: Gallery, groups: list[np.ndarray], root: Path) -> Image.Image:
    """One row per group (the largest :data:`GROUPS_SHOWN`): its first item, then up to
    :data:`MEMBERS_SHOWN` - 1 others with their score to it, framed green when of the first's
    class and red otherwise; unreadable images are grey squares."""
    rows = []
    for number, group in enumerate(groups[:GROUPS_SHOWN], start=1):
        shown = group[:MEMBERS_SHOWN]
        scores = scores_to_first(gallery, shown)
        first_label = gallery.labels[shown[0]]
        results = [
            (
                _thumbnail(root / gallery.paths[item]),
                gallery.classes[int(gallery.labels[item])],
                float(score),
                bool(gallery.labels[item] == first_label),
            )
            for item, score in zip(shown[1:], scores[1:], strict=True)
        ]
        rows.append(
            result_grid(
                _thumbnail(root / gallery.paths[shown[0]]),
                results,
                query_label=gallery.classes[int(first_label)],
                title=f"group {number}: {len(group)} images" + _more(len(group) - len(shown)),
                columns=MEMBERS_SHOWN - 1,
                thumb=THUMB,
            )
        )
    return _stack(rows)


def _more(hidden: int) -> str:
    return f" ({hidden} more not shown)" if hidden else ""


def _thumbnail(path: Path) -> np.ndarray:
    try:
        return load_image(path, (THUMB, THUMB))
    except ImageError:
        return np.full((THUMB, THUMB, 3), 128, dtype=np.uint8)


def _stack(pictures: list[Image.Image]) -> Image.Image:
    """Pictures one under the other, left-aligned, on the grids' background."""
    width = max(picture.width for picture in pictures)
    stacked = Image.new("RGB", (width, sum(p.height for p in pictures)), BACKGROUND)
    top = 0
    for picture in pictures:
        stacked.paste(picture, (0, top))
        top += picture.height
    return stacked


def summary(result: dict) -> str:
    """What ``analysis.py --duplicates`` prints."""
    head = (
        f"{result['split']} set: {result['images']:,} images, threshold {result['threshold']:.4f} "
        f"({result['score']})"
    )
    if not result["groups"]:
        return f"{head}\nno pair of images scores at or above the threshold: no duplicates"
    return (
        f"{head}\n{result['groups']:,} groups of near-duplicates, {result['images_in_groups']:,} "
        f"images in groups, the largest of {result['largest_group']:,}\n"
        f"saved to {result['csv']} and {result['picture']}"
    )
