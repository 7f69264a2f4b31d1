"""A small, seeded demo data set: coloured shapes on cluttered backgrounds.

``generate(out_dir)`` writes ``out_dir/<shape>/<i>.png`` for up to 16 shape classes (circle,
square, triangle, star, ...) and ``out_dir/captions.csv``, two captions per image naming its
colour, size, shape and position ("a small red triangle at the top left", "a red triangle"). Colours, size, rotation, position, the background and its clutter
(lines, blobs, noise) are random, so raw pixels are a poor descriptor while a small CNN learns
the shapes within minutes on a CPU. Every image has its own generator seeded with
``[seed, class, i]``, so the set does not depend on the order of generation.

The set is written to a temporary folder next to ``out_dir`` and renamed into place, with a
manifest of the arguments: a second call with the same arguments does nothing, and an interrupted
one never leaves half a set.

Command line: ``python -m datasets.demo --out DIR [--classes N --per-class N --size N --seed N]``.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tfcbir import UserError

MANIFEST = "demo_manifest.json"
CAPTIONS = "captions.csv"  # path,caption rows (datasets.captions reads them)
# Bump when the drawing or the files change, so old sets are regenerated (2: captions.csv).
_VERSION = 2
_SUPERSAMPLE = 2  # drawn at twice the size and shrunk: smooth edges
# Rotations stay within +-30 degrees so that classes stay apart (a square turned by 45 degrees
# would be a diamond) and a small CNN needs few examples to learn each shape.
MAX_ROTATION = 30.0


def _regular(n: int, phase: float = math.pi / 2) -> list[tuple[float, float]]:
    return [
        (math.cos(phase + 2 * math.pi * k / n), math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _circle(radius: float = 1.0, cx: float = 0.0, cy: float = 0.0, sy: float = 1.0):
    return [(cx + radius * x, cy + radius * sy * y) for x, y in _regular(48, 0.0)]


def _star(points: int = 5, inner: float = 0.42):
    outer = _regular(2 * points)
    return [
        (x * (1 if k % 2 == 0 else inner), y * (1 if k % 2 == 0 else inner))
        for k, (x, y) in enumerate(outer)
    ]


def _heart():
    ts = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    xs = 16 * np.sin(ts) ** 3
    ys = 13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts)
    return [(x / 17.0, -(y + 2.5) / 17.0) for x, y in zip(xs, ys)]


# Each shape: polygons in unit coordinates (about [-1, 1]) drawn in order into a mask, with fill
# 255 (shape) or 0 (a hole), so rings and crescents need no special drawing code.
SHAPES: dict[str, list[tuple[list[tuple[float, float]], int]]] = {
    "circle": [(_circle(), 255)],
    "square": [([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)], 255)],
    "triangle": [(_regular(3), 255)],
    "star": [(_star(), 255)],
    "cross": [
        (
            [
                (-0.3, -1),
                (0.3, -1),
                (0.3, -0.3),
                (1, -0.3),
                (1, 0.3),
                (0.3, 0.3),
                (0.3, 1),
                (-0.3, 1),
                (-0.3, 0.3),
                (-1, 0.3),
                (-1, -0.3),
                (-0.3, -0.3),
            ],
            255,
        )
    ],
    "ring": [(_circle(1.0), 255), (_circle(0.6), 0)],
    "ellipse": [(_circle(1.0, sy=0.5), 255)],
    "pentagon": [(_regular(5), 255)],
    "hexagon": [(_regular(6), 255)],
    "arrow": [
        (
            [
                (-1, -0.22),
                (0.15, -0.22),
                (0.15, -0.6),
                (1, 0),
                (0.15, 0.6),
                (0.15, 0.22),
                (-1, 0.22),
            ],
            255,
        )
    ],
    "crescent": [(_circle(1.0), 255), (_circle(0.85, cx=0.45), 0)],
    "heart": [(_heart(), 255)],
    "diamond": [([(0, -1), (0.5, 0), (0, 1), (-0.5, 0)], 255)],
    "semicircle": [
        ([(x, y * 0.5 + 0.5) for x, y in _regular(48, 0.0) if y <= 0] + [(1, 0.5), (-1, 0.5)], 255)
    ],
    "chevron": [([(-1, -0.8), (-0.45, -0.8), (0.2, 0), (-0.45, 0.8), (-1, 0.8), (-0.35, 0)], 255)],
    "bar": [([(-1, -0.18), (1, -0.18), (1, 0.18), (-1, 0.18)], 255)],
}


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _distinct_colour(rng: np.random.Generator, other) -> tuple[int, int, int]:
    """A colour clearly different from ``other``, so the shape is always visible."""
    while True:
        colour = _colour(rng)
        if np.linalg.norm(np.subtract(colour, other)) > 120:
            return colour


def _clutter(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, side: int, lines: int, blobs: int
) -> None:
    for _ in range(blobs):
        cx, cy = rng.uniform(0, side, 2)
        rx, ry = rng.uniform(0.02, 0.07, 2) * side
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=_colour(rng))
    for _ in range(lines):
        x0, y0, x1, y1 = rng.uniform(0, side, 4)
        width = _SUPERSAMPLE  # thin: clutter, not a shape
        draw.line([x0, y0, x1, y1], fill=_colour(rng), width=width)


def render(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 image of ``shape`` with random colours, pose and clutter."""
    return draw(shape, size, rng)[0]


def draw(shape: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """:func:`render`'s image and what it shows: ``{"shape", "colour" (RGB), "radius" and
    "centre" (fractions of the side)}``, from the same draws of ``rng``."""
    side = size * _SUPERSAMPLE
    background = _colour(rng)
    canvas = Image.new("RGB", (side, side), background)
    canvas_draw = ImageDraw.Draw(canvas)
    _clutter(canvas_draw, rng, side, lines=int(rng.integers(1, 5)), blobs=int(rng.integers(1, 4)))

    radius = rng.uniform(0.22, 0.36) * side
    stretch = rng.uniform(0.85, 1.15)  # mild aspect changes within a class
    angle = math.radians(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    cx, cy = rng.uniform(radius * 0.9, side - radius * 0.9, 2)
    cos, sin = math.cos(angle), math.sin(angle)
    mask = Image.new("L", (side, side), 0)
    mask_draw = ImageDraw.Draw(mask)
    for points, fill in SHAPES[shape]:
        placed = [
            (
                cx + radius * (x * stretch * cos - y * sin),
                cy + radius * (x * stretch * sin + y * cos),
            )
            for x, y in points
        ]
        mask_draw.polygon(placed, fill=fill)
    colour = _distinct_colour(rng, background)
    canvas.paste(colour, (0, 0, side, side), mask)
    # A few lines across the shape too, so it is not a clean silhouette.
    _clutter(canvas_draw, rng, side, lines=int(rng.integers(0, 2)), blobs=0)

    small = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    noise = rng.normal(0.0, rng.uniform(2.0, 6.0), small.shape)
    image = np.clip(np.rint(small + noise), 0, 255).astype(np.uint8)
    shown = {
        "shape": shape,
        "colour": colour,
        "radius": radius / side,
        "centre": (cx / side, cy / side),
    }
    return image, shown


# --- captions -----------------------------------------------------------------------------------


def colour_name(rgb) -> str:
    """A plain English name for an RGB colour (0..255): black, white or grey when it has little
    colour, else its hue's name (brown for dark oranges)."""
    r, g, b = (float(v) / 255.0 for v in rgb)
    hue, saturation, value = colorsys.rgb_to_hsv(r, g, b)
    if value < 0.25:
        return "black"
    if saturation < 0.25:
        return "white" if value > 0.75 else "grey"
    degrees = hue * 360.0
    for limit, name in _HUES:
        if degrees < limit:
            return "brown" if name == "orange" and value < 0.6 else name
    return "red"


# Hue names by their upper limit in degrees (red wraps around 360).
_HUES = (
    (15, "red"),
    (40, "orange"),
    (70, "yellow"),
    (160, "green"),
    (200, "cyan"),
    (260, "blue"),
    (300, "purple"),
    (345, "pink"),
)


def size_word(radius: float) -> str:
    """small, medium or large: thirds of the radii drawn (0.22 to 0.36 of the side)."""
    return "small" if radius < 0.2667 else "large" if radius > 0.3133 else "medium"


def position_words(centre: tuple[float, float]) -> str:
    """Where the shape sits, e.g. "at the top left", "in the centre", "on the right"."""
    x, y = centre
    column = "left" if x < 0.4 else "right" if x > 0.6 else ""
    row = "top" if y < 0.4 else "bottom" if y > 0.6 else ""
    if row:
        return f"at the {row} {column}".rstrip()
    return f"on the {column}" if column else "in the centre"


def captions(shown: dict) -> list[str]:
    """Two captions of a drawn image: colour, size, shape and position, and a short one:
    ``["a small red triangle at the top left", "a red triangle"]``."""
    colour = colour_name(shown["colour"])
    size = size_word(shown["radius"])
    where = position_words(shown["centre"])
    return [
        f"a {size} {colour} {shown['shape']} {where}",
        f"{indefinite_article(colour)} {colour} {shown['shape']}",
    ]


def indefinite_article(word: str) -> str:
    """``an`` before a vowel sound (``an orange``), else ``a`` (``a red``)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _check(classes: int, per_class: int, size: int, seed: int) -> None:
    if not 2 <= classes <= len(SHAPES):
        raise UserError(
            f"--classes: {classes} is not between 2 and the {len(SHAPES)} shapes "
            f"available; give a number from 2 to {len(SHAPES)}"
        )
    if per_class < 1:
        raise UserError(f"--per-class: {per_class} must be at least 1")
    if not 16 <= size <= 1024:
        raise UserError(f"--size: {size} is not between 16 and 1024 pixels")
    if seed < 0:
        raise UserError(f"--seed: {seed} must be 0 or more")


def _files(classes: int, per_class: int) -> list[str]:
    width = max(3, len(str(per_class - 1)))  # zero-padded: sorted order is numeric order
    return [
        f"{name}/{i:0{width}d}.png" for name in list(SHAPES)[:classes] for i in range(per_class)
    ]


def _is_complete(out_dir: Path, manifest: dict) -> bool:
    try:
        found = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if found != manifest:
        return False
    files = [CAPTIONS] + _files(manifest["classes"], manifest["per_class"])
    return all((out_dir / f).is_file() for f in files)


def generate(
    out_dir: str | os.PathLike,
    *,
    classes: int = 12,
    per_class: int = 60,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write (or find) the demo set in ``out_dir``; return ``out_dir`` as an absolute Path.

    Layout: ``out_dir/<shape>/<i>.png`` (``classes`` shapes in :data:`SHAPES` order,
    ``per_class`` images of ``size`` x ``size``), ``out_dir/captions.csv`` (``path,caption``: two
    captions of each image, see :func:`captions`) and ``out_dir/demo_manifest.json``. An existing
    demo set made with other arguments is replaced; a non-empty folder that is not a demo set is
    left alone (UserError).
    """
    _check(classes, per_class, size, seed)
    out_dir = Path(os.path.abspath(os.fspath(out_dir)))
    manifest = {
        "generator": "datasets.demo",
        "version": _VERSION,
        "classes": classes,
        "per_class": per_class,
        "size": size,
        "seed": seed,
    }
    if _is_complete(out_dir, manifest):
        return out_dir
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"--out: {out_dir} is a file; give a folder")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
            raise UserError(
                f"--out: {out_dir} is not empty and holds no demo set; give a new or empty folder"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    temp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        rows = []
        for label, name in enumerate(list(SHAPES)[:classes]):
            (temp / name).mkdir()
            for i, file in enumerate(
                _files(classes, per_class)[label * per_class : (label + 1) * per_class]
            ):
                rng = np.random.default_rng([seed, label, i])
                image, shown = draw(name, size, rng)
                Image.fromarray(image).save(temp / file, optimize=False)
                rows += [(file, caption) for caption in captions(shown)]
        with open(temp / CAPTIONS, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["path", "caption"])
            writer.writerows(rows)
        # Written last: a manifest means a complete set.
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if _is_complete(out_dir, manifest):  # another process finished it meanwhile
            return out_dir
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "set")
            os.rename(temp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(temp, out_dir)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m datasets.demo",
        description="Write a seeded demo data set of shapes: OUT/<shape>/<i>.png.",
    )
    parser.add_argument("--out", required=True, help="folder to write (created if missing)")
    parser.add_argument("--classes", type=int, default=12, help=f"2 to {len(SHAPES)} (12)")
    parser.add_argument("--per-class", type=int, default=60, help="images per class (60)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    args = parser.parse_args(argv)
    try:
        out = generate(
            args.out, classes=args.classes, per_class=args.per_class, size=args.size, seed=args.seed
        )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{out}: {args.classes} classes x {args.per_class} images of {args.size}x{args.size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
