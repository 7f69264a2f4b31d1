"""datasets.augment: each op against PIL or a hand-worked case, determinism per (seed, step,
slot), the data.augment presets and errors, today's crop/flip unchanged, exact resume."""

import numpy as np
import pytest
from PIL import Image, ImageOps

import config
from datasets.augment import (
    DEFAULTS,
    PRESETS,
    RANDAUGMENT_OPS,
    Augmentation,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_op,
    autocontrast,
    equalize,
    posterize,
    resized_crop_box,
    rotate,
    sharpness,
    shear,
    solarize,
    to_grayscale,
    translate,
)
from datasets.images import load_image, random_crop_flip
from datasets.lists import scan_class_folders
from datasets.pipeline import TrainData
from runs import checkpoint
from tests.conftest import tiny_config
from tests.helpers_images import gradient, write_image
from tfcbir import UserError
from training.trainer import train


def _random_image(shape=(9, 11), seed=0, low=0, high=256) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, (*shape, 3), dtype=np.uint8)


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image)


# -- each op ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 4, 7, 8])
def test_posterize_keeps_the_top_bits_as_pil(bits):
    image = _random_image()
    expected = np.asarray(ImageOps.posterize(_pil(image), bits))
    np.testing.assert_array_equal(posterize(image, bits), expected)
    assert posterize(np.array([[[0b10110111] * 3]], np.uint8), 3)[0, 0, 0] == 0b10100000


@pytest.mark.parametrize("threshold", [0, 100, 178.5, 255, 256])
def test_solarize_inverts_values_at_or_above_the_threshold_as_pil(threshold):
    image = _random_image()
    expected = np.asarray(ImageOps.solarize(_pil(image), threshold))
    np.testing.assert_array_equal(solarize(image, threshold), expected)


def test_autocontrast_stretches_each_channel_as_pil():
    image = _random_image(low=40, high=190)
    image[..., 2] = 99  # a flat channel stays as it is
    np.testing.assert_array_equal(
        autocontrast(image), np.asarray(ImageOps.autocontrast(_pil(image)))
    )
    channel = np.array([[[10], [20], [30]]], np.uint8).repeat(3, axis=2)
    np.testing.assert_array_equal(autocontrast(channel)[0, :, 0], [0, 127, 255])


def test_equalize_follows_pils_algorithm():
    """PIL's equalize, written out: step = (pixels - count of the top value) // 255, and value
    v maps to (step // 2 + pixels below v) // step."""
    image = _random_image((32, 32), low=30, high=120)
    expected = np.empty_like(image)
    for c in range(3):
        counts = np.bincount(image[..., c].ravel(), minlength=256)
        present = counts[counts > 0]
        step = (present.sum() - present[-1]) // 255
        below = np.concatenate([[0], np.cumsum(counts)[:-1]])
        lut = np.minimum((step // 2 + below) // step, 255)
        expected[..., c] = lut[image[..., c]]
    np.testing.assert_array_equal(equalize(image), expected)


def test_sharpness_blends_with_pils_smoothing_kernel():
    """Inner pixels: smooth = (8 neighbours + 5 x centre) / 13, rounded; the border keeps its
    values; out = smooth + factor * (image - smooth), within PIL's last rounding."""
    image = _random_image((7, 8))
    for factor in (0.0, 0.5, 1.9):
        values = image.astype(np.float64)
        smooth = values.copy()
        window = sum(
            values[1 + dy : values.shape[0] - 1 + dy, 1 + dx : values.shape[1] - 1 + dx]
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        )
        smooth[1:-1, 1:-1] = np.rint((window + 4 * values[1:-1, 1:-1]) / 13)  # PIL's uint8
        expected = np.clip(smooth + factor * (values - smooth), 0, 255)
        np.testing.assert_allclose(sharpness(image, factor), expected, atol=1)
    np.testing.assert_array_equal(sharpness(image, 1.0), image)


def test_rotate_turns_about_the_centre_as_pil():
    square = _random_image((5, 5))
    np.testing.assert_array_equal(rotate(square, 90), np.rot90(square))
    np.testing.assert_array_equal(rotate(square, 0), square)
    image = _random_image((20, 24))
    by_pil = np.asarray(_pil(image).rotate(20, resample=Image.Resampling.NEAREST))
    assert np.mean(np.any(rotate(image, 20) != by_pil, axis=-1)) < 0.02


def test_translate_moves_the_image_and_fills_black():
    image = _random_image((4, 6), low=1)
    moved = translate(image, 2, "x")
    np.testing.assert_array_equal(moved[:, 2:], image[:, :-2])
    assert not moved[:, :2].any()
    up = translate(image, -1, "y")
    np.testing.assert_array_equal(up[:-1], image[1:])
    assert not up[-1].any()


def test_shear_moves_each_row_by_its_distance_from_the_centre():
    image = _random_image((5, 7), low=1)
    sheared = shear(image, 1.0, "x")
    for y in range(5):
        for x in range(7):
            source = x + (y - 2)  # centre row 2 stays; row y reads y - 2 pixels further right
            want = image[y, source] if 0 <= source < 7 else 0
            np.testing.assert_array_equal(sheared[y, x], want)
    np.testing.assert_array_equal(
        shear(image.transpose(1, 0, 2), 1.0, "y"), sheared.transpose(1, 0, 2)
    )


def test_colour_adjustments_by_hand():
    image = np.array([[[100, 40, 0], [200, 10, 80]]], np.uint8)
    np.testing.assert_array_equal(adjust_brightness(image, 0.5), [[[50, 20, 0], [100, 5, 40]]])
    np.testing.assert_array_equal(adjust_brightness(image, 2.0), [[[200, 80, 0], [255, 20, 160]]])
    grey = image.astype(np.float64) @ [0.299, 0.587, 0.114]  # 53.38, 74.79
    flat = adjust_contrast(image, 0.0)
    np.testing.assert_array_equal(flat, np.full_like(image, round(grey.mean())))
    np.testing.assert_array_equal(adjust_contrast(image, 1.0), image)
    np.testing.assert_array_equal(
        adjust_saturation(image, 0.0), np.rint(grey)[..., None].repeat(3, 2).astype(np.uint8)
    )
    np.testing.assert_array_equal(adjust_saturation(image, 1.0), image)


def test_hue_turns_red_to_green_and_blue_and_keeps_greys():
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    np.testing.assert_array_equal(adjust_hue(red, 1 / 3)[0, 0], [0, 255, 0])
    np.testing.assert_array_equal(adjust_hue(red, -1 / 3)[0, 0], [0, 0, 255])
    grey = np.full((2, 3, 3), 117, np.uint8)
    np.testing.assert_array_equal(adjust_hue(grey, 0.21), grey)
    image = _random_image(low=60, high=190)  # no clipping: each pixel keeps its mean
    turned = adjust_hue(image, 0.1)
    np.testing.assert_allclose(turned.mean(-1), image.mean(-1), atol=0.5)
    assert np.abs(turned.astype(int) - image).max() > 10


def test_grayscale_is_pils_luma_in_three_channels():
    image = _random_image()
    grey = to_grayscale(image)
    luma = image.astype(np.float64) @ [0.299, 0.587, 0.114]
    np.testing.assert_allclose(grey[..., 0], luma, atol=1)
    assert np.all(grey == grey[..., :1])


def test_resized_crop_boxes_respect_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = resized_crop_box(rng, (60, 80), (0.2, 0.6), (0.5, 2.0))
        assert top >= 0 and top + h <= 60 and left >= 0 and left + w <= 80
        assert 0.2 - 0.05 <= h * w / 4800 <= 0.6 + 0.05
        assert 0.5 * 0.9 <= w / h <= 2.0 * 1.1
    # No window of the whole area at ratio 2 fits a square: the centre at the nearest ratio.
    assert resized_crop_box(rng, (10, 10), (1.0, 1.0), (2.0, 2.0)) == (2, 0, 5, 10)


@pytest.mark.parametrize("name", RANDAUGMENT_OPS)
def test_each_randaugment_op_is_identity_at_magnitude_zero_or_changes_the_image(name):
    image = _random_image((16, 16), low=20, high=200)
    for negative in (False, True):
        out = apply_op(image, name, 20, negative)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert not np.array_equal(out, image), name
    if name not in ("autocontrast", "equalize"):  # these have no magnitude
        np.testing.assert_array_equal(apply_op(image, name, 0), image)


# -- determinism ------------------------------------------------------------------------------


def _strong() -> Augmentation:
    return Augmentation.from_config(PRESETS["strong"])


def test_the_same_seeds_give_the_same_pixels_and_other_seeds_others():
    image = gradient((40, 44))
    strong = _strong()

    def view(step, slot):
        rngs = np.random.default_rng([3, step, 1]), np.random.default_rng([3, step, 4, slot])
        return strong.apply(image, (32, 32), *rngs)

    first = view(5, 0)
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(view(5, 0), first)
    assert not np.array_equal(view(6, 0), first)
    assert not np.array_equal(view(5, 1), first)


def _train_data(tmp_path, **options):
    for number in range(12):  # noise: every crop, flip and op shows in the pixels
        path = tmp_path / "abc"[number % 3] / f"{number}.png"
        write_image(path, _random_image((10, 12), seed=number))
    images = scan_class_folders(tmp_path)
    settings = dict(P=2, K=2, seed=7, image_size=(8, 8), resize=(10, 12), workers=2)
    return TrainData(images, **{**settings, **options})


def test_batches_with_strong_augmentation_depend_on_the_step_only(tmp_path):
    first = _train_data(tmp_path, augment=_strong())
    later = [first.batch(step)[0] for step in range(4)]
    fresh = _train_data(tmp_path, augment=_strong())
    for step in (3, 1):  # in another order, from another instance: the same pixels
        np.testing.assert_array_equal(fresh.batch(step)[0], later[step])
    assert not np.array_equal(later[0], later[1])


def test_default_settings_draw_crops_and_flips_exactly_as_before(tmp_path):
    """A config without the new keys augments as random_crop_flip on default_rng([seed,
    step, 1]) always did: the same pixels, bit for bit."""
    resolved = config.resolve(tiny_config())["data"]["augment"]
    assert {k: resolved[k] for k in DEFAULTS} == DEFAULTS and resolved["preset"] is None
    new = _train_data(tmp_path, augment=Augmentation.from_config(resolved))
    old = _train_data(tmp_path, flip=True, crop=True)
    paths = new.images.absolute_paths()
    for step in range(5):
        _, _, indices = new.batch_items(step)
        rng = np.random.default_rng([7, step, 1])
        decoded = [load_image(paths[i], (10, 12)) for i in indices]
        expected = [random_crop_flip(image, (8, 8), rng, True, True) for image in decoded]
        np.testing.assert_array_equal(new.batch(step)[0], np.stack(expected))
        np.testing.assert_array_equal(old.batch(step)[0], np.stack(expected))


# -- config -----------------------------------------------------------------------------------


def _augment_of(augment: dict) -> dict:
    return config.resolve(tiny_config(data__augment=augment))["data"]["augment"]


def test_presets_expand_to_their_documented_settings():
    light = _augment_of({"preset": "light"})
    assert light == {
        "preset": "light",
        **DEFAULTS,
        "resized_crop": True,
        "scale": [0.5, 1.0],
        "brightness": 0.1,
        "contrast": 0.1,
        "saturation": 0.1,
    }
    strong = _augment_of({"preset": "strong"})
    assert strong == {
        "preset": "strong",
        **DEFAULTS,
        "resized_crop": True,
        "brightness": 0.4,
        "contrast": 0.4,
        "saturation": 0.4,
        "hue": 0.1,
        "grayscale": 0.2,
        "randaugment_ops": 2,
        "randaugment_magnitude": 9,
    }
    assert _augment_of({"preset": "none"}) == {
        "preset": "none",
        **DEFAULTS,
        "flip": False,
        "crop": False,
    }
    # Keys beside the preset override it; a resolved config resolves to itself.
    mine = _augment_of({"preset": "strong", "grayscale": 0.0, "randaugment_magnitude": 5})
    assert mine == {**strong, "grayscale": 0.0, "randaugment_magnitude": 5}
    raw = tiny_config(data__augment={"preset": "light", "hue": 0.05})
    once = config.resolve(raw)
    assert config.resolve(once) == once


def test_preset_none_gives_centre_crops(tmp_path):
    data = _train_data(tmp_path, augment=Augmentation.from_config(PRESETS["none"]))
    images, _, indices = data.batch_items(2)
    paths = data.images.absolute_paths()
    for image, index in zip(images, indices):
        np.testing.assert_array_equal(image, load_image(paths[index], (10, 12))[1:9, 2:10])


@pytest.mark.parametrize(
    "augment, message",
    [
        ({"preset": "stronk"}, "data.augment.preset: 'stronk' is not one of none, light, strong"),
        ({"jitter": 0.2}, "data.augment.jitter: unknown key"),
        ({"scale": [0.6, 0.3]}, "data.augment.scale: [0.6, 0.3] is not [min, max]"),
        ({"ratio": [0, 1]}, "data.augment.ratio: [0, 1] is not [min, max]"),
        ({"hue": 0.6}, "data.augment.hue: 0.6 is above the maximum 0.5"),
        ({"grayscale": -0.1}, "data.augment.grayscale: -0.1 is below the minimum 0"),
        ({"randaugment_magnitude": 31}, "data.augment.randaugment_magnitude: 31 is above"),
        ({"preset": "light", "brightness": "x"}, "data.augment.brightness: 'x' is not a number"),
    ],
)
def test_a_bad_key_or_value_is_one_line_naming_the_key(augment, message):
    with pytest.raises(UserError) as error:
        config.resolve(tiny_config(data__augment=augment))
    text = str(error.value)
    assert text.startswith(message) and "\n" not in text


# -- resume -----------------------------------------------------------------------------------


def test_a_strongly_augmented_run_resumes_exactly(data_dir):
    raw = tiny_config(
        data__augment={"preset": "strong"},
        train__steps=6,
        train__checkpoint_every=3,
        train__validate_every=0,
    )
    train(config.resolve({**raw, "name": "strong"}))
    longer = {**raw, "train": {**raw["train"], "steps": 12}}
    resumed = train(config.resolve({**longer, "name": "strong"}))
    straight = train(config.resolve({**longer, "name": "straight"}))
    a, b = checkpoint.latest(resumed.run.checkpoints), checkpoint.latest(straight.run.checkpoints)
    assert a.step == b.step == 12
    for x, y in zip(a.groups["model"], b.groups["model"]):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4)
