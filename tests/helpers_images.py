"""Tiny images, broken files and data folders for tests (no fixtures: plain functions).

``make_class_tree`` colour-codes every image: image ``j`` of the ``i``-th class (sorted order of
the given names) is the solid colour :func:`class_colour` ``(i, j)``, so a test can tell from the
pixels which file a batch holds, whatever the crop or flip.
"""

from __future__ import annotations

import contextlib
import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def class_colour(class_index: int, image_index: int) -> tuple[int, int, int]:
    return (class_index * 20) % 256, image_index % 256, 77


def solid(size: tuple[int, int], colour) -> np.ndarray:
    """``(h, w, 3)`` uint8 of one colour."""
    return np.broadcast_to(np.asarray(colour, dtype=np.uint8), (*size, 3)).copy()


def gradient(size: tuple[int, int]) -> np.ndarray:
    """``(h, w, 3)`` uint8 whose red rises left to right and green top to bottom."""
    h, w = size
    red = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    green = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return np.stack([red, green, np.full_like(red, 60)], axis=-1).round().astype(np.uint8)


def write_image(path: str | Path, pixels: np.ndarray | Image.Image, **save_kwargs) -> Path:
    """Save an array or PIL image (format from the suffix unless ``format=`` is given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    image.save(path, **save_kwargs)
    return path


def make_class_tree(
    root: str | Path, counts: dict[str, int], *, size=(8, 8), suffix: str = ".png"
) -> Path:
    """``root/<class>/<j>.png`` with ``counts[class]`` colour-coded images per class."""
    root = Path(root)
    for i, name in enumerate(sorted(counts)):
        for j in range(counts[name]):
            write_image(root / name / f"{j:03d}{suffix}", solid(size, class_colour(i, j)))
    return root


def jpeg_bytes(pixels: np.ndarray, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", **save_kwargs)
    return buffer.getvalue()


def write_truncated_jpeg(path: str | Path, size=(96, 96)) -> Path:
    """A JPEG with an intact header, cut in the middle of its image data."""
    noise = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    data = jpeg_bytes(noise, quality=90)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def write_text(path: str | Path, text: str = "this is not an image\n") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_png_header(path: str | Path, width: int, height: int) -> Path:
    """A PNG that only declares its size (no pixel data): enough for size checks on open."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


class _ListHandler(logging.Handler):
    def __init__(self, messages: list[str]):
        super().__init__(logging.DEBUG)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def captured_warnings(logger_name: str = "tfcbir"):
    """The messages of warnings logged on ``logger_name`` inside the block (a list), whatever
    propagation or handlers other code has set up."""
    messages: list[str] = []
    logger = logging.getLogger(logger_name)
    handler = _ListHandler(messages)
    previous = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
