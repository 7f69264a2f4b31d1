"""Reading one image file into an RGB uint8 array, and the crops used by the pipelines.

Every image the framework sees goes through :func:`load_image`: it decodes the file with PIL
exactly once, applies the EXIF orientation, turns any colour mode into 8-bit RGB and optionally
resizes. A file that cannot be read raises :class:`ImageError`, a :class:`tfcbir.UserError` whose
one-line message names the file and the problem, so callers can skip it with a warning.

Arrays are ``(H, W, 3)`` uint8; sizes are ``(height, width)`` like NumPy shapes (PIL's own sizes
are ``(width, height)``; the conversion happens only in this module).
"""

from __future__ import annotations

import io
import os
import re
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps, JpegImagePlugin

from tfcbir import UserError

# Lower-case suffixes (with the dot) of the files treated as images; compare with
# ``Path(name).suffix.lower()`` or use :func:`is_image_name`.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)

# PIL's own refusal threshold (2 x Image.MAX_IMAGE_PIXELS): about 13400 x 13400 pixels.
DEFAULT_MAX_PIXELS = 178_956_970

# PIL warns about images between MAX_IMAGE_PIXELS and twice that. load_image applies its own
# limit (max_pixels) to the header size before decoding, so the warning is noise here. A process
# wide filter is used because warnings.catch_warnings() is not thread-safe and images are decoded
# in thread pools.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_ORIENTATION = ExifTags.Base.Orientation
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # orientations that swap width and height


class ImageError(UserError):
    """An image file that cannot be used: missing, empty, truncated, not an image or too large.

    ``path`` and ``problem`` are kept apart so callers can list skipped files; ``str(error)`` is
    the one-line message ``"<path>: <problem>"``.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self):  # keeps the two-argument constructor picklable
        return type(self), (self.path, self.problem)


class ImageTooLarge(ImageError):
    """An image with more pixels than may be decoded (``max_pixels``, or PIL's own limit)."""


def is_image_name(name: str | os.PathLike) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(str(name))[1].lower() in IMAGE_EXTENSIONS


def load_image(
    path: str | os.PathLike | bytes,
    size: tuple[int, int] | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> np.ndarray:
    """Decode ``path`` into an RGB array ``(H, W, 3)`` uint8, resized to ``size=(h, w)`` if given.

    ``path`` may also be the encoded image itself (``bytes``, e.g. an upload), named ``name`` in
    error messages (default ``"<image data>"``); it is decoded from memory, nothing is written.

    - The EXIF orientation is applied, so the array is upright as a viewer shows it.
    - Colour modes: grey (L, 1), palette (P, with transparency), CMYK, YCbCr become RGB; anything
      with alpha (RGBA, LA, PA, tRNS) is composited on white; 16-bit (``I;16*``) and 32-bit
      integer (``I``) grey with values in [0, 65535] are scaled by 255/65535 (other ``I`` ranges
      and float ``F`` images are stretched from their minimum to their maximum; ``F`` images
      within [0, 1] are scaled by 255).
    - ``size`` resizes to exactly (h, w), not keeping the aspect ratio, with PIL's bilinear filter
      (antialiased when shrinking). JPEGs much larger than ``size`` are first decoded at 1/2, 1/4
      or 1/8 scale (``Image.draft``), never below ``size``.
    - Images whose header says more than ``max_pixels`` pixels are refused before decoding.
      PIL itself refuses more than 2 x ``Image.MAX_IMAGE_PIXELS`` whatever ``max_pixels`` says.

    Raises ImageError (missing, empty, not an image, truncated/corrupt), ImageTooLarge (a
    subclass: more than ``max_pixels`` pixels).
    """
    source, path = _source(path, name)
    with _open(source, path, max_pixels) as image:
        rgb = _decode(image, path, size, max_pixels)
    if size is not None and (rgb.height, rgb.width) != tuple(size):
        rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _source(path: str | os.PathLike | bytes, name: str | None) -> tuple[io.BytesIO | str, str]:
    """What PIL opens (a file path, or the bytes as a file) and the name errors give it;
    ImageError for no data, an empty file or one that cannot be read."""
    if isinstance(path, bytes | bytearray | memoryview):
        source, path = io.BytesIO(path), name or "<image data>"
        if not source.getbuffer().nbytes:
            raise ImageError(path, "no image data (0 bytes)")
        return source, path
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            raise ImageError(path, "the file is empty; delete it or replace it with the image")
    except OSError:
        raise ImageError(path, "the file does not exist or cannot be read") from None
    return path, path


def _open(source: io.BytesIO | str, path: str, max_pixels: int) -> Image.Image:
    """The image opened (its header read, nothing decoded); ImageError for what PIL refuses."""
    try:
        return Image.open(source)
    except Image.DecompressionBombError as error:
        # PIL refuses before it returns the image, so its message is the only word on the size.
        found = re.search(r"\((\d+) pixels\)", str(error))
        pixels = int(found.group(1)) if found else None
        raise ImageTooLarge(path, _too_large_text(None, max_pixels, pixels)) from None
    except Image.UnidentifiedImageError:
        raise ImageError(
            path, "not an image file PIL can read (JPEG, PNG, GIF, BMP, TIFF, WebP, ...)"
        ) from None
    except Exception as error:  # PIL raises many types for malformed headers
        raise ImageError(
            path, f"cannot open the image: truncated or corrupt header ({_describe(error)})"
        ) from None


def _decode(
    image: Image.Image, path: str, size: tuple[int, int] | None, max_pixels: int
) -> Image.Image:
    """An opened image decoded once, upright and in 8-bit RGB (JPEGs at a reduced scale when
    ``size`` allows); ImageTooLarge beyond ``max_pixels``, ImageError for corrupt data."""
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(path, _too_large_text((height, width), max_pixels))
    if size is not None and isinstance(image, JpegImagePlugin.JpegImageFile):  # also MPO
        _draft_jpeg(image, size)
    try:
        # The single decode. Everything below works on decoded pixels.
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image, path)
    except ImageError:
        raise
    except Exception as error:  # truncated data, bad compression streams, ...
        raise ImageError(
            path, f"truncated or corrupt image data ({_describe(error)}); re-create the file"
        ) from None


def _too_large_text(hw: tuple[int, int] | None, max_pixels: int, pixels: int | None = None) -> str:
    if hw:
        shape = f"{hw[1]}x{hw[0]} pixels"
    else:
        shape = f"the image ({pixels:,} pixels)" if pixels else "the image"
    return (
        f"{shape} is more than the {max_pixels:,} pixels that can be decoded safely; "
        "shrink the image or remove it"
    )


def _describe(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _draft_jpeg(image: Image.Image, size: tuple[int, int]) -> None:
    """Let libjpeg decode at a reduced scale that stays at least ``size`` after orientation."""
    height, width = size
    if image.getexif().get(_ORIENTATION, 1) in _TRANSPOSING_ORIENTATIONS:
        height, width = width, height  # the stored image is rotated by 90 degrees
    image.draft(None, (width, height))


def _to_rgb(image: Image.Image, path: str) -> Image.Image:
    """Any PIL mode -> an 8-bit RGB image (see load_image for the rules)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I") or mode == "F":
        grey = Image.fromarray(_to_uint8(np.asarray(image), mode), "L")
        return grey.convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ImageError(path, f"colour mode {mode} cannot be converted to RGB ({error})") from None


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer or float grey ``(H, W)`` -> uint8, scaled rather than clipped."""
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    values = np.where(finite, values, 0.0)
    low, high = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 0.0)
    if mode != "F" and low >= 0 and high <= 65535:
        scaled = values * (255.0 / 65535.0)  # the usual 16-bit range
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The central ``(h, w)`` window of ``image`` ``(H, W, C)`` (a view). H >= h and W >= w."""
    height, width = image.shape[:2]
    h, w = size
    if h > height or w > width:
        raise ValueError(f"crop {size} does not fit in an image of {(height, width)}")
    top, left = (height - h) // 2, (width - w) // 2
    return image[top : top + h, left : left + w]


def random_crop_flip(
    image: np.ndarray,
    size: tuple[int, int],
    rng: np.random.Generator,
    flip: bool,
    crop: bool,
) -> np.ndarray:
    """A random ``(h, w)`` window (centre if ``crop`` is False), mirrored with probability 1/2.

    ``image`` is ``(H, W, C)``; the result is a view ``(h, w, C)``. The draws from ``rng`` are
    always made in the same order (top, left, flip) for a given (crop, flip), so a generator
    seeded per batch gives the same augmentation every time.
    """
    height, width = image.shape[:2]
    h, w = size
    if h > height or w > width:
        raise ValueError(f"crop {size} does not fit in an image of {(height, width)}")
    if crop:
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        window = image[top : top + h, left : left + w]
    else:
        window = center_crop(image, size)
    if flip and rng.random() < 0.5:
        window = window[:, ::-1]
    return window


def load_and_fit(
    path: str | os.PathLike | bytes,
    image_size: tuple[int, int],
    resize: tuple[int, int] | None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> np.ndarray:
    """The evaluation view of an image (a file, or its bytes named ``name``, as
    :func:`load_image`): resized to ``resize`` then centre-cropped to ``image_size``, or resized
    straight to ``image_size`` when ``resize`` is None. ``(h, w, 3)``.
    """
    if resize is None:
        return load_image(path, image_size, max_pixels=max_pixels, name=name)
    return center_crop(load_image(path, resize, max_pixels=max_pixels, name=name), image_size)


def fit_image(
    image: np.ndarray, image_size: tuple[int, int], resize: tuple[int, int] | None
) -> np.ndarray:
    """:func:`load_and_fit`'s view of an image decoded already (``(H, W, 3)`` uint8): resized
    with the same filter to ``resize``, then centre-cropped to ``image_size`` (or resized straight
    to ``image_size`` when ``resize`` is None). Equal to load_and_fit's pixels except for JPEGs
    that load_and_fit decodes at a reduced scale (much larger than the size)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    target = tuple(image_size) if resize is None else tuple(resize)
    if image.shape[:2] != target:
        resized = Image.fromarray(image).resize((target[1], target[0]), Image.Resampling.BILINEAR)
        image = np.asarray(resized, dtype=np.uint8)
    return image if resize is None else center_crop(image, image_size)


def as_size(value, name: str) -> tuple[int, int]:
    """``(h, w)`` from a pair of positive integers; a UserError naming ``name`` otherwise."""
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(
            f"{name}: {value!r} is not a [height, width] pair; give two integers"
        ) from None
    if h < 1 or w < 1:
        raise UserError(f"{name}: {value!r} must be positive; give two integers >= 1")
    return h, w


__all__ = [
    "IMAGE_EXTENSIONS",
    "DEFAULT_MAX_PIXELS",
    "ImageError",
    "ImageTooLarge",
    "is_image_name",
    "load_image",
    "load_and_fit",
    "fit_image",
    "center_crop",
    "random_crop_flip",
    "as_size",
]
