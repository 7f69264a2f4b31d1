"""The report's pictures: maps, per-class bars, the confusion matrix and training curves (PNG).

Plots are matplotlib ``Figure`` objects saved straight to PNG (no pyplot, so no global backend and
no display needed); the thumbnail map is composed
with Pillow. Every file is written atomically (:func:`tfcbir.files.atomic_output`).

Classes are told apart by colour and marker: :data:`PALETTE` (20 colours) times :data:`MARKERS`
(5 shapes) gives 100 distinct styles, which repeat beyond that; a legend lists at most
``legend_max`` classes, the most frequent on the map, and says so when there are more.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image, ImageDraw, ImageOps

from retrieval.visualize import default_font
from tfcbir.files import atomic_output

# 20 colours chosen to be told apart (Sasha Trubetskoy's list of distinct colours), the most
# distinct first: tab20's light shades looked like their strong pairs beside them on a map.
PALETTE = [
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#ffe119",
    "#800000", "#469990", "#9a6324", "#000075", "#808000", "#bfef45", "#fabed4", "#dcbeff",
    "#aaffc3", "#ffd8b1", "#a9a9a9", "#fffac8",
]  # fmt: skip
MARKERS = ["o", "s", "^", "D", "v"]
DPI = 110
LEGEND_MAX = 20
BARS_MAX = 40  # classes on the per-class bar chart
CONFUSION_LABELLED_MAX = 30  # classes named on the confusion matrix's axes
TITLE_SIZE, TITLE_HEIGHT = 20, 40  # the thumbnail map's title line (pixels)


def class_style(label: int) -> tuple[str, str]:
    """(colour, marker) of class ``label``; 100 distinct styles, then they repeat."""
    colour = PALETTE[label % len(PALETTE)]
    marker = MARKERS[(label // len(PALETTE)) % len(MARKERS)]
    return colour, marker


def save_figure(figure, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure as PNG atomically; returns ``path``."""
    path = Path(path)
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


def save_image(image: Image.Image, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def _short(name: str, length: int = 28) -> str:
    return name if len(name) <= length else name[: length - 3] + "..."


def map_figure(
    coords: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    *,
    title: str,
    note: str = "",
    legend_max: int = LEGEND_MAX,
):
    """A scatter of 2-D points (n, 2) coloured by class (labels (n,) into ``classes``)."""
    figure = Figure(figsize=(9.5, 7.5))
    axes = figure.subplots()
    labels = np.asarray(labels)
    _scatter_classes(axes, coords, labels)
    _class_legend(axes, labels, classes, legend_max)
    axes.set_title(title + (f"\n{note}" if note else ""), fontsize=11)
    axes.set_xticks([])
    axes.set_yticks([])
    return figure


def _scatter_classes(axes, coords: np.ndarray, labels: np.ndarray) -> None:
    """The points (n, 2) in their class's colour and marker, one scatter per marker."""
    size = float(np.clip(6000 / max(len(labels), 1), 4, 40))
    for marker_group in range(len(MARKERS)):
        shown = (labels // len(PALETTE)) % len(MARKERS) == marker_group
        if not shown.any():
            continue
        colours = [class_style(int(label))[0] for label in labels[shown]]
        axes.scatter(
            coords[shown, 0],
            coords[shown, 1],
            c=colours,
            marker=MARKERS[marker_group],
            s=size,
            alpha=0.8,
            linewidths=0,
        )


def _class_legend(axes, labels: np.ndarray, classes: Sequence[str], legend_max: int) -> None:
    """A legend of the ``legend_max`` most frequent classes on the map (all of them when few),
    beside the axes; its title says when some classes are left out."""
    present, counts = np.unique(labels, return_counts=True)
    listed = present[np.lexsort((present, -counts))][:legend_max]
    handles = []
    for label in sorted(listed):
        colour, marker = class_style(int(label))
        handles.append(
            Line2D(
                [],
                [],
                color=colour,
                marker=marker,
                linestyle="",
                markersize=7,
                label=_short(classes[int(label)]),
            )
        )
    legend_title = (
        f"{len(listed)} most frequent of {len(present)} classes"
        if len(present) > len(listed)
        else "class"
    )
    axes.legend(
        handles=handles,
        title=legend_title,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        title_fontsize=9,
        frameon=False,
    )


def thumbnail_map(
    coords: np.ndarray,
    images: Sequence[np.ndarray | None],
    labels: np.ndarray,
    *,
    title: str = "",
    side: int = 1600,
    thumb: int = 44,
    frame: int = 3,
    classes: Sequence[str] | None = None,
    legend_max: int = LEGEND_MAX,
) -> Image.Image:
    """Thumbnails of ``images`` (each (H, W, 3) uint8, or None for one that could not be read:
    a grey square) placed at their 2-D positions (n, 2) on a ``side`` x ``side`` area under a
    line of ``title``, each framed in its class colour (labels (n,)), as on the map; with
    ``classes`` (the labels' names), a legend of the ``legend_max`` most frequent below."""
    top = TITLE_HEIGHT if title else 0
    shown = _legend_labels(labels, legend_max) if classes is not None else []
    rows = -(-len(shown) // LEGEND_COLUMNS) + (1 if shown else 0)
    picture = Image.new("RGB", (side, side + top + rows * LEGEND_ROW), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    if title:
        draw.text((10, 8), title, fill=(0, 0, 0), font=default_font(TITLE_SIZE))
    if len(coords) == 0:
        return picture
    cell = thumb + 2 * frame
    low, high = coords.min(axis=0), coords.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    positions = (coords - low) / span * (side - cell)
    for (x, y), image, label in zip(positions, images, labels):
        x0, y0 = int(x), int(top + side - cell - y)  # y grows downwards in a picture
        draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=class_style(int(label))[0])
        if image is None:
            tile = Image.new("RGB", (thumb, thumb), (200, 200, 200))
        else:
            tile = ImageOps.fit(Image.fromarray(image).convert("RGB"), (thumb, thumb))
        picture.paste(tile, (x0 + frame, y0 + frame))
    if shown:
        _thumbnail_legend(draw, shown, labels, classes, top + side, side)
    return picture


LEGEND_COLUMNS, LEGEND_ROW = 4, 26  # the thumbnail map's legend: columns, row height (pixels)


def _legend_labels(labels: np.ndarray, legend_max: int) -> list[int]:
    """The ``legend_max`` most frequent labels, most frequent first (ties: lower label)."""
    values, counts = np.unique(np.asarray(labels, np.int64), return_counts=True)
    order = np.lexsort((values, -counts))
    return [int(values[i]) for i in order[:legend_max]]


def _thumbnail_legend(draw, shown: list[int], labels, classes, y: int, side: int) -> None:
    """Frame colour -> class name under the map, and how many classes it leaves out."""
    font = default_font(14)
    width = side // LEGEND_COLUMNS
    for n, label in enumerate(shown):
        x0, y0 = 10 + (n % LEGEND_COLUMNS) * width, y + 6 + (n // LEGEND_COLUMNS) * LEGEND_ROW
        draw.rectangle((x0, y0, x0 + 16, y0 + 16), fill=class_style(label)[0])
        draw.text((x0 + 24, y0), _short(str(classes[label]), 40), fill=(0, 0, 0), font=font)
    left = len(np.unique(labels)) - len(shown)
    note = f"frame colour: class; {left} more classes not listed" if left else "frame colour: class"
    rows = -(-len(shown) // LEGEND_COLUMNS)
    draw.text((10, y + 6 + rows * LEGEND_ROW), note, fill=(90, 90, 90), font=font)


def per_class_figure(
    classes: Sequence[str],
    recall_at_1: np.ndarray,
    map_at_r: np.ndarray,
    order: np.ndarray,
    *,
    title: str,
    bars_max: int = BARS_MAX,
):
    """Horizontal bars of Recall@1 and MAP@R per class, in ``order`` (worst first, at the top);
    at most ``bars_max`` classes, the title says how many are shown."""
    shown = np.asarray(order)[:bars_max]
    n = len(shown)
    figure = Figure(figsize=(9, max(2.5, 0.28 * n + 1.5)))
    axes = figure.subplots()
    y = np.arange(n)
    height = 0.4
    axes.barh(y - height / 2, recall_at_1[shown], height, label="Recall@1", color="#1f77b4")
    axes.barh(y + height / 2, map_at_r[shown], height, label="MAP@R", color="#ff7f0e")
    axes.set_yticks(y, [_short(classes[c], 32) for c in shown], fontsize=8)
    axes.invert_yaxis()  # worst at the top
    axes.set_xlim(0, 1)
    axes.set_xlabel("score (leave-one-out within the set)")
    axes.grid(axis="x", alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    scope = f"the {n} worst of {len(order)} classes" if len(order) > n else f"{n} classes"
    axes.set_title(f"{title}\n{scope}, worst Recall@1 first", fontsize=11)
    return figure


def confusion_figure(
    confusion: np.ndarray,
    classes: Sequence[str],
    *,
    title: str,
    labelled_max: int = CONFUSION_LABELLED_MAX,
):
    """The nearest-neighbour class confusion (C, C), each row divided by its sum (the query
    class's evaluated queries); class names on the axes when C <= ``labelled_max``."""
    n = len(classes)
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    side = float(np.clip(0.28 * n + 3, 5, 11))
    figure = Figure(figsize=(side + 1.2, side))
    axes = figure.subplots()
    shown = axes.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04, label="share of the row's queries")
    if n <= labelled_max:
        names = [_short(c, 24) for c in classes]
        axes.set_xticks(np.arange(n), names, rotation=90, fontsize=7)
        axes.set_yticks(np.arange(n), names, fontsize=7)
        note = ""
    else:
        axes.set_xticks([])
        axes.set_yticks([])
        note = f"\n{n} classes in class order, too many to name (see the table of pairs)"
    axes.set_xlabel("class of the nearest other image")
    axes.set_ylabel("class of the query")
    axes.set_title(title + note, fontsize=11)
    return figure


def curves_figure(metrics: dict[str, np.ndarray], *, title: str):
    """Training loss, learning rate and the validation score (Recall@1, or MAP@R for a run
    selected on it) against step, from metrics.csv's columns
    (:meth:`runs.folder.RunFolder.read_metrics`)."""
    figure = Figure(figsize=(13, 3.6))
    panels = figure.subplots(1, 3)
    step = metrics["step"]
    validation = (
        ("val_map@r", "validation MAP@R")
        if "val_map@r" in metrics
        else ("val_recall@1", "validation Recall@1")
    )
    for axes, (column, name) in zip(
        panels, [("loss", "training loss"), ("lr", "learning rate"), validation]
    ):
        values = metrics[column]
        known = ~np.isnan(values) & ~np.isnan(step)
        if known.any():
            marker = "o" if column == validation[0] else None
            axes.plot(step[known], values[known], marker=marker, markersize=4, linewidth=1.2)
            if column == "loss" and known.sum() >= 20:  # a smoothed line over the noisy batches
                window = max(5, int(known.sum()) // 20)
                smooth = np.convolve(values[known], np.ones(window) / window, mode="valid")
                axes.lines[-1].set_label("each logged step")
                axes.plot(
                    step[known][window - 1 :],
                    smooth,
                    color="black",
                    linewidth=1.5,
                    label=f"mean of the last {window} logged steps",
                )
                axes.legend(fontsize=8, loc="upper right")
        else:
            axes.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=axes.transAxes)
        axes.set_title(name, fontsize=10)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    return figure
