"""Training-time augmentation of decoded uint8 images, deterministic given a generator.

:class:`Augmentation` holds the settings of ``data.augment`` (the presets are :data:`PRESETS`);
:meth:`Augmentation.apply` turns one decoded image ``(H, W, 3)`` uint8 into one training view
``(h, w, 3)`` uint8. The steps, in order:

1. geometry: a random resized crop (``resized_crop``, as torchvision's RandomResizedCrop: an
   area share in ``scale`` and an aspect ratio in ``ratio``, resized bilinearly to ``(h, w)``)
   or else today's random (``crop``) or centre window; then a horizontal flip (``flip``);
2. RandAugment-style (Cubuk et al., 2020): ``randaugment_ops`` ops drawn with replacement from
   :data:`RANDAUGMENT_OPS`, each at magnitude ``randaugment_magnitude`` of 30 (torchvision's
   scale) with a random sign where the op has one;
3. colour jitter (``brightness``, ``contrast``, ``saturation``, ``hue``: torchvision's
   ColorJitter ranges, applied in a random order);
4. grayscale with probability ``grayscale``.

Every random choice comes from the generators handed in, so a view is a pure function of the
seeds that made them (the pipeline seeds them with ``(seed, step, slot)``). Settings that only
flip and crop draw from the batch's generator exactly as :func:`random_crop_flip` always has, so
configs written before these keys existed give the same pixels.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageEnhance

from datasets.images import random_crop_flip

# Keys of data.augment besides ``preset``, with their defaults (today's crop and flip only).
DEFAULTS: dict = {
    "flip": True,
    "crop": True,
    "resized_crop": False,
    "scale": [0.08, 1.0],
    "ratio": [3 / 4, 4 / 3],
    "brightness": 0.0,
    "contrast": 0.0,
    "saturation": 0.0,
    "hue": 0.0,
    "grayscale": 0.0,
    "randaugment_ops": 0,
    "randaugment_magnitude": 9,
}

# What each preset sets (every key; keys written beside the preset override it).
PRESETS: dict[str, dict] = {
    "none": {**DEFAULTS, "flip": False, "crop": False},
    "light": {
        **DEFAULTS,
        "resized_crop": True,
        "scale": [0.5, 1.0],
        "brightness": 0.1,
        "contrast": 0.1,
        "saturation": 0.1,
    },
    "strong": {
        **DEFAULTS,
        "resized_crop": True,
        "scale": [0.08, 1.0],
        "brightness": 0.4,
        "contrast": 0.4,
        "saturation": 0.4,
        "hue": 0.1,
        "grayscale": 0.2,
        "randaugment_ops": 2,
        "randaugment_magnitude": 9,
    },
}

MAX_MAGNITUDE = 30  # torchvision's RandAugment: 31 magnitude bins, 0 .. 30
RANDAUGMENT_OPS = (
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
    "sharpness",
)
_SIGNED = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y", "sharpness"}


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The settings of ``data.augment`` (see :data:`DEFAULTS`; docs/training.md)."""

    flip: bool = True
    crop: bool = True
    resized_crop: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale: float = 0.0
    randaugment_ops: int = 0
    randaugment_magnitude: int = 9

    @classmethod
    def from_config(cls, augment: dict) -> Augmentation:
        """From a resolved ``data.augment`` (``preset`` already expanded into the keys)."""
        values = {k: augment[k] for k in DEFAULTS if k in augment}
        for pair in ("scale", "ratio"):
            if pair in values:
                values[pair] = tuple(float(v) for v in values[pair])
        return cls(**values)

    @property
    def per_image(self) -> bool:
        """Whether a view needs the image's own generator (anything beyond crop and flip)."""
        return bool(
            self.resized_crop
            or self.randaugment_ops
            or self.grayscale
            or self.brightness
            or self.contrast
            or self.saturation
            or self.hue
        )

    def apply(
        self,
        image: np.ndarray,
        size: tuple[int, int],
        batch_rng: np.random.Generator,
        image_rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """One training view ``(h, w, 3)`` uint8 of ``image`` ``(H, W, 3)`` uint8.

        ``batch_rng`` serves crop and flip when ``resized_crop`` is off (the draws of
        :func:`random_crop_flip`); everything else draws from ``image_rng``, needed when
        :attr:`per_image`. The result may be a view of ``image``."""
        if not self.per_image:
            return random_crop_flip(image, size, batch_rng, flip=self.flip, crop=self.crop)
        if image_rng is None:
            raise ValueError("these augmentation settings need a per-image generator")
        if self.resized_crop:
            top, left, h, w = resized_crop_box(image_rng, image.shape[:2], self.scale, self.ratio)
            view = resize_bilinear(image[top : top + h, left : left + w], size)
            if self.flip and image_rng.random() < 0.5:
                view = view[:, ::-1]
        else:
            view = random_crop_flip(image, size, batch_rng, flip=self.flip, crop=self.crop)
        view = np.ascontiguousarray(view)
        for _ in range(self.randaugment_ops):
            view = random_op(view, self.randaugment_magnitude, image_rng)
        view = self._jitter(view, image_rng)
        if self.grayscale and image_rng.random() < self.grayscale:
            view = to_grayscale(view)
        return view

    def _jitter(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """torchvision's ColorJitter: the four adjustments in a random order, each factor
        uniform in ``[max(0, 1 - x), 1 + x]`` (hue: a shift uniform in ``[-hue, hue]``)."""
        spreads = (self.brightness, self.contrast, self.saturation, self.hue)
        if not any(spreads):
            return image
        order = rng.permutation(4)
        factors = [rng.uniform(max(0.0, 1 - x), 1 + x) if x else 1.0 for x in spreads[:3]]
        shift = rng.uniform(-self.hue, self.hue) if self.hue else 0.0
        adjust = (adjust_brightness, adjust_contrast, adjust_saturation)
        for which in order:
            if which < 3 and spreads[which]:
                image = adjust[which](image, factors[which])
            elif which == 3 and self.hue:
                image = adjust_hue(image, shift)
        return image


# -- geometry ---------------------------------------------------------------------------------


def resized_crop_box(
    rng: np.random.Generator,
    shape: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a window of an image of ``shape`` ``(H, W)``, as torchvision's
    ``RandomResizedCrop.get_params``: up to 10 draws of an area share in ``scale`` and a
    log-uniform aspect ratio (w / h) in ``ratio``; if none fits, the whole image's centre at the
    nearest allowed ratio."""
    height, width = shape
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` ``(H, W, 3)`` uint8 resized to ``size`` ``(h, w)`` with PIL's bilinear filter
    (the filter the pipeline decodes with)."""
    if image.shape[:2] == tuple(size):
        return image
    resized = Image.fromarray(np.ascontiguousarray(image)).resize(
        (size[1], size[0]), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.uint8)


def affine_nearest(image: np.ndarray, matrix: np.ndarray, shift=(0.0, 0.0)) -> np.ndarray:
    """``image`` ``(H, W, 3)`` uint8 warped about its centre: output pixel ``p`` (as ``(x, y)``
    from the centre) takes the nearest input pixel at ``matrix @ p + shift``; outside is 0
    (black). ``matrix`` ``(2, 2)``, ``shift`` ``(dx, dy)`` in pixels. (PIL's affine transform,
    whose coordinates are pixel corners: hence the centre at ``(W / 2, H / 2)``.)"""
    height, width = image.shape[:2]
    (a, b), (d, e) = np.asarray(matrix, np.float64)
    cx, cy = width / 2, height / 2
    coefficients = (
        a,
        b,
        cx + shift[0] - a * cx - b * cy,
        d,
        e,
        cy + shift[1] - d * cx - e * cy,
    )
    warped = Image.fromarray(image).transform(
        (width, height), Image.Transform.AFFINE, coefficients, Image.Resampling.NEAREST
    )
    return np.asarray(warped, dtype=np.uint8)


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotated anticlockwise (as seen) by ``degrees`` about the centre; corners filled black."""
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    return affine_nearest(image, np.array([[cos, -sin], [sin, cos]]))


def shear(image: np.ndarray, amount: float, axis: str) -> np.ndarray:
    """Sheared about the centre: ``axis`` "x" moves row ``y`` (from the centre) by
    ``-amount * y`` pixels along x; "y" moves column ``x`` by ``-amount * x`` along y."""
    matrix = np.array([[1.0, amount], [0.0, 1.0]] if axis == "x" else [[1.0, 0.0], [amount, 1.0]])
    return affine_nearest(image, matrix)


def translate(image: np.ndarray, pixels: int, axis: str) -> np.ndarray:
    """Moved by ``pixels`` (right for "x", down for "y"; negative the other way), black fill."""
    shift = (-pixels, 0) if axis == "x" else (0, -pixels)
    return affine_nearest(image, np.eye(2), shift)


# -- pixel values -----------------------------------------------------------------------------


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
    """Each value keeps its top ``bits`` bits (1..8). ``(H, W, 3)`` uint8, as all below."""
    return image & np.uint8((0xFF << (8 - bits)) & 0xFF)


def solarize(image: np.ndarray, threshold: float) -> np.ndarray:
    """Values at or above ``threshold`` inverted (``255 - v``)."""
    values = np.arange(256)
    table = np.where(values >= threshold, 255 - values, values).astype(np.uint8)
    return np.asarray(Image.fromarray(image).point(np.tile(table, 3).tolist()), np.uint8)


def autocontrast(image: np.ndarray) -> np.ndarray:
    """Each channel stretched linearly so that its darkest value is 0 and its brightest 255
    (truncated, as PIL's ImageOps.autocontrast); a flat channel is left as it is."""
    pixels = image.reshape(-1, image.shape[-1])
    low, high = pixels.min(axis=0).astype(np.float64), pixels.max(axis=0).astype(np.float64)
    scale = 255.0 / np.where(high > low, high - low, 1.0)
    values = np.arange(256, dtype=np.float64)[:, None]
    stretched = np.clip(np.floor(values * scale - low * scale), 0, 255)  # PIL's operations
    tables = np.where(high > low, stretched, values).astype(np.uint8)  # (256, 3)
    return np.asarray(Image.fromarray(image).point(tables.T.ravel().tolist()), np.uint8)


def equalize(image: np.ndarray) -> np.ndarray:
    """Each channel's histogram equalised (PIL's ImageOps.equalize)."""
    from PIL import ImageOps

    return np.asarray(ImageOps.equalize(Image.fromarray(image)), dtype=np.uint8)


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    """Blended with its smoothed self (PIL's ImageEnhance.Sharpness): factor 1 keeps it,
    0 smooths it, above 1 sharpens."""
    return np.asarray(ImageEnhance.Sharpness(Image.fromarray(image)).enhance(factor), np.uint8)


def _blend(image: np.ndarray, other, factor: float) -> np.ndarray:
    """``other + factor * (image - other)``, rounded and clipped to uint8."""
    mixed = other + np.float32(factor) * (image.astype(np.float32) - other)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _blend_table(image: np.ndarray, other: float, factor: float) -> np.ndarray:
    """:func:`_blend` with one value ``other`` for all pixels, as a lookup table (the same
    arithmetic on the 256 values, then PIL's table lookup: several times faster)."""
    table = _blend(np.arange(256, dtype=np.uint8), np.float32(other), factor)
    return np.asarray(Image.fromarray(image).point(np.tile(table, 3).tolist()), np.uint8)


def luma(image: np.ndarray) -> np.ndarray:
    """``(H, W, 1)`` float32 grey values: PIL's convert("L") (ITU-R 601-2 weights 0.299,
    0.587, 0.114, rounded), the grey torchvision's jitter blends with."""
    return np.asarray(Image.fromarray(image).convert("L"), np.float32)[..., None]


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Values times ``factor`` (a blend with black)."""
    return _blend_table(image, 0.0, factor)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """A blend with the image's mean grey value."""
    return _blend_table(image, float(luma(image).mean()), factor)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """A blend with the image's own grey version (0: grey, 1: unchanged)."""
    return _blend(image, luma(image), factor)


def adjust_hue(image: np.ndarray, shift: float) -> np.ndarray:
    """The hue turned by ``shift`` of a full turn (-0.5 .. 0.5): colours rotated about the grey
    axis (1, 1, 1), which keeps greys and each pixel's mean value; a third of a turn takes red
    to green exactly. (Ten times faster than a round trip through PIL's HSV, which torchvision
    uses, and close to it.)"""
    theta = 2 * math.pi * shift
    cos, sin = math.cos(theta), math.sin(theta)
    axis = np.full(3, 1 / math.sqrt(3))
    cross = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / math.sqrt(3)
    rotation = cos * np.eye(3) + sin * cross + (1 - cos) * np.outer(axis, axis)
    matrix = np.concatenate([rotation, np.zeros((3, 1))], axis=1)  # PIL's (3, 4): no offset
    turned = Image.fromarray(image).convert("RGB", tuple(matrix.ravel().tolist()))
    return np.asarray(turned, dtype=np.uint8)


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """The grey version (PIL's convert("L")) in all three channels."""
    grey = np.asarray(Image.fromarray(image).convert("L"))
    return np.repeat(grey[..., None], 3, axis=2)


# -- RandAugment ------------------------------------------------------------------------------


def apply_op(image: np.ndarray, name: str, magnitude: int, negative: bool = False) -> np.ndarray:
    """RandAugment op ``name`` at ``magnitude`` (0..30) on ``image`` ``(h, w, 3)`` uint8, with
    torchvision's magnitude scale: rotate 30 degrees, shear 0.3, translate 150/331 of the side,
    sharpness 1 +- 0.9, posterize 8 - 4 bits, solarize threshold 255 - 0 at full magnitude.
    ``negative`` turns the signed ops the other way."""
    level = magnitude / MAX_MAGNITUDE
    sign = -1.0 if negative else 1.0
    height, width = image.shape[:2]
    if name == "rotate":
        return rotate(image, sign * 30.0 * level)
    if name in ("shear_x", "shear_y"):
        return shear(image, sign * 0.3 * level, name[-1])
    if name == "translate_x":
        return translate(image, int(sign * 150 / 331 * width * level), "x")
    if name == "translate_y":
        return translate(image, int(sign * 150 / 331 * height * level), "y")
    if name == "posterize":
        return posterize(image, 8 - int(round(4 * level)))
    if name == "solarize":
        return solarize(image, 255.0 * (1 - level))
    if name == "autocontrast":
        return autocontrast(image)
    if name == "equalize":
        return equalize(image)
    if name == "sharpness":
        return sharpness(image, 1.0 + sign * 0.9 * level)
    raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(RANDAUGMENT_OPS)}")


def random_op(image: np.ndarray, magnitude: int, rng: np.random.Generator) -> np.ndarray:
    """One op drawn uniformly from :data:`RANDAUGMENT_OPS` (then its sign, always drawn)."""
    name = RANDAUGMENT_OPS[int(rng.integers(len(RANDAUGMENT_OPS)))]
    negative = bool(rng.random() < 0.5)
    return apply_op(image, name, magnitude, negative and name in _SIGNED)


__all__ = [
    "DEFAULTS",
    "PRESETS",
    "RANDAUGMENT_OPS",
    "MAX_MAGNITUDE",
    "Augmentation",
    "resized_crop_box",
    "resize_bilinear",
    "affine_nearest",
    "rotate",
    "shear",
    "translate",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
    "sharpness",
    "luma",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "to_grayscale",
    "apply_op",
    "random_op",
]
