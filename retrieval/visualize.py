"""Pictures of retrieval results: a query beside its top-r answers.

Each answer is a thumbnail framed green (same class as the query), red (another class) or grey
(unknown: the query has no class), with its class name and score underneath. Answers fill rows
of ``columns`` to the right of the query. :class:`GridLayout` holds the geometry, so callers and
tests can find every thumbnail's frame.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from tfcbir.files import atomic_output

MATCH = (0, 170, 0)
MISS = (210, 0, 0)
UNKNOWN = (150, 150, 150)
QUERY = (40, 40, 40)
BACKGROUND = (255, 255, 255)
MOUNT = (235, 235, 235)  # behind a thumbnail that does not fill its square
TEXT = (0, 0, 0)
FONT_SIZE = 12

#: One answer: its image (H, W, 3) uint8, class name, score, and whether it matches the query's
#: class (None when the query's class is unknown).
Result = tuple[np.ndarray, str, float, bool | None]


@dataclass(frozen=True)
class GridLayout:
    """Geometry of a result grid; boxes are (x0, y0, x1, y1) with x1, y1 exclusive."""

    n_results: int
    columns: int = 5
    thumb: int = 128  # thumbnail side; images are shrunk to fit, keeping their aspect
    frame: int = 4  # width of the coloured frame around each thumbnail
    pad: int = 8  # margin around the picture and between cells
    gap: int = 24  # extra space between the query and its answers
    text_height: int = 2 * (FONT_SIZE + 4)  # two lines under each thumbnail
    title: bool = False  # a line of text above everything

    @property
    def title_height(self) -> int:
        return FONT_SIZE + 12 if self.title else 0

    @property
    def cell(self) -> int:
        """Side of a framed thumbnail."""
        return self.thumb + 2 * self.frame

    @property
    def rows(self) -> int:
        return max(1, -(-self.n_results // self.columns))

    def query_box(self) -> tuple[int, int, int, int]:
        x0, y0 = self.pad, self.pad + self.title_height
        return x0, y0, x0 + self.cell, y0 + self.cell

    def result_box(self, i: int) -> tuple[int, int, int, int]:
        """The framed thumbnail of answer i (0-based, best first)."""
        row, column = divmod(i, self.columns)
        x0 = self.pad + self.cell + self.gap + column * (self.cell + self.pad)
        y0 = self.pad + self.title_height + row * (self.cell + self.text_height + self.pad)
        return x0, y0, x0 + self.cell, y0 + self.cell

    @property
    def size(self) -> tuple[int, int]:
        columns = min(self.columns, max(1, self.n_results))
        width = self.pad + self.cell + self.gap + columns * (self.cell + self.pad)
        height = (
            self.pad + self.title_height + self.rows * (self.cell + self.text_height + self.pad)
        )
        return width, height


def result_grid(
    query_image: np.ndarray,
    results: Sequence[Result],
    *,
    query_label: str | None = None,
    title: str | None = None,
    columns: int = 5,
    thumb: int = 128,
) -> Image.Image:
    """The query (H, W, 3) uint8 beside its answers, best first; returns an RGB picture.

    results: (image, class_name, score, is_match) per answer; is_match None draws a grey frame.
    query_label: the query's class name, written under it. title: a line above everything.
    """
    font = default_font()
    layout = GridLayout(
        n_results=len(results),
        columns=columns,
        thumb=thumb,
        title=bool(title),
    )
    picture = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(picture)
    if title:
        draw.text((layout.pad, layout.pad), _fit(draw, title, picture.width, font), TEXT, font)
    box = layout.query_box()
    _paste(picture, draw, query_image, box, QUERY, layout)
    _caption(draw, box, ["query", query_label or "unknown class"], font, layout)
    for i, (image, class_name, score, is_match) in enumerate(results):
        colour = UNKNOWN if is_match is None else MATCH if is_match else MISS
        box = layout.result_box(i)
        _paste(picture, draw, image, box, colour, layout)
        _caption(draw, box, [f"{i + 1}. {class_name}", f"{score:.3f}"], font, layout)
    return picture


def text_tile(text: str, side: int = 256) -> np.ndarray:
    """A ``(side, side, 3)`` uint8 picture of a text query: the words, wrapped and centred in
    quotes on a light square, to stand in the query's place in a result grid."""
    font = default_font(size=max(12, side // 11))
    tile = Image.new("RGB", (side, side), MOUNT)
    draw = ImageDraw.Draw(tile)
    margin = side // 12
    lines = _wrap(draw, f"\u201c{text}\u201d", side - 2 * margin, font)
    line_height = font.size + 6 if hasattr(font, "size") else FONT_SIZE + 6
    shown = lines[: max(1, (side - 2 * margin) // line_height)]
    if len(shown) < len(lines):
        shown[-1] = _fit(draw, shown[-1] + "...", side - 2 * margin, font)
    top = (side - len(shown) * line_height) // 2
    for n, line in enumerate(shown):
        width = draw.textlength(line, font=font)
        draw.text(((side - width) / 2, top + n * line_height), line, TEXT, font)
    return np.asarray(tile)


def _wrap(draw, text: str, width: int, font) -> list[str]:
    """``text`` broken into lines of whole words that fit ``width`` pixels (a word longer than
    a line is cut)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(_fit(draw, word, width, font))
    return lines or [""]


def save_grid(path: str | os.PathLike, image: Image.Image) -> Path:
    """Save a picture atomically; the format follows the suffix (.png, .jpg, ...)."""
    path = Path(path)
    with atomic_output(path) as tmp:
        image.save(tmp)
    return path


def default_font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at ``size`` pixels (the fixed bitmap font where Pillow cannot scale
    it): the labels of every picture, with no font file to ship or find."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _paste(picture, draw, image, box, colour, layout: GridLayout) -> None:
    """Draw the frame, then the image shrunk to fit inside it, centred on a light square."""
    x0, y0, x1, y1 = box
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
    inner = (x0 + layout.frame, y0 + layout.frame, x1 - layout.frame, y1 - layout.frame)
    draw.rectangle((inner[0], inner[1], inner[2] - 1, inner[3] - 1), fill=MOUNT)
    thumbnail = ImageOps.contain(_as_image(image), (layout.thumb, layout.thumb))
    picture.paste(
        thumbnail,
        (
            inner[0] + (layout.thumb - thumbnail.width) // 2,
            inner[1] + (layout.thumb - thumbnail.height) // 2,
        ),
    )


def _caption(draw, box, lines: list[str], font, layout: GridLayout) -> None:
    x0, _, x1, y1 = box
    for n, line in enumerate(lines):
        draw.text((x0, y1 + 2 + n * (FONT_SIZE + 4)), _fit(draw, line, x1 - x0, font), TEXT, font)


def _fit(draw, text: str, width: int, font) -> str:
    """``text`` cut (with "...") to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _as_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"images must be uint8; got {array.dtype}")
    return Image.fromarray(array).convert("RGB")
