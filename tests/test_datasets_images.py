"""datasets.images: decoding any file into upright RGB uint8, refusing bad files, crops."""

import numpy as np
import pytest
from PIL import Image

from datasets.images import (
    IMAGE_EXTENSIONS,
    ImageError,
    center_crop,
    fit_image,
    is_image_name,
    load_and_fit,
    load_image,
    random_crop_flip,
)
from tests.helpers_images import (
    gradient,
    solid,
    write_image,
    write_png_header,
    write_text,
    write_truncated_jpeg,
)
from tfcbir import UserError


def test_extensions_are_case_insensitive():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"} == IMAGE_EXTENSIONS
    assert is_image_name("a/B.JPG") and is_image_name("x.Tiff") and is_image_name("y.webp")
    assert not is_image_name("notes.txt") and not is_image_name("jpg")


def test_rgb_png_exact_and_resized(tmp_path):
    pixels = gradient((12, 20))
    path = write_image(tmp_path / "a.png", pixels)
    loaded = load_image(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (12, 20, 3)
    np.testing.assert_array_equal(loaded, pixels)
    small = load_image(path, (6, 10))
    assert small.shape == (6, 10, 3)
    # Bilinear with antialias keeps the left-to-right ramp of red.
    assert np.all(np.diff(small[3, :, 0].astype(int)) > 0)


def test_grey_becomes_three_equal_channels(tmp_path):
    grey = np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)
    loaded = load_image(write_image(tmp_path / "g.png", Image.fromarray(grey, "L")))
    assert loaded.shape == (4, 6, 3)
    for channel in range(3):
        np.testing.assert_array_equal(loaded[..., channel], grey)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)  # mode I;16
    assert image.mode.startswith("I;16")
    path = write_image(tmp_path / "deep.png", image)
    assert Image.open(path).mode.startswith("I")  # PIL reads it back as 16 bit
    loaded = load_image(path)
    np.testing.assert_array_equal(loaded[0, :, 0], [0, 1, 128, 255])
    assert np.all(loaded[..., 0] == loaded[..., 2])


def test_32_bit_integer_and_float_images(tmp_path):
    ints = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), "I")
    np.testing.assert_array_equal(
        load_image(write_image(tmp_path / "i.tif", ints))[0, :, 0], [0, 255]
    )
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    np.testing.assert_array_equal(
        load_image(write_image(tmp_path / "f.tif", floats))[0, :, 1], [0, 128, 255]
    )


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan, full magenta+yellow: red
    path = write_image(tmp_path / "cmyk.jpg", cmyk, quality=95)
    assert Image.open(path).mode == "CMYK"
    loaded = load_image(path)
    assert loaded.shape == (16, 16, 3)
    np.testing.assert_allclose(loaded.reshape(-1, 3).mean(0), [255, 0, 0], atol=8)


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    palette = Image.new("P", (4, 2), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # 0 black (transparent), 1 red
    palette.putpixel((2, 0), 1)
    palette.putpixel((3, 1), 1)
    path = write_image(tmp_path / "p.png", palette, transparency=0)
    loaded = load_image(path)
    np.testing.assert_array_equal(loaded[0, 0], [255, 255, 255])  # transparent -> white
    np.testing.assert_array_equal(loaded[0, 2], [255, 0, 0])
    np.testing.assert_array_equal(loaded[1, 3], [255, 0, 0])


def test_rgba_and_la_are_composited_on_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    loaded = load_image(write_image(tmp_path / "a.png", Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(loaded[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(loaded[0, 1], [0, 0, 255])
    np.testing.assert_allclose(loaded[0, 2], [127, 127, 127], atol=1)
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), "LA")
    np.testing.assert_array_equal(
        load_image(write_image(tmp_path / "la.png", la))[0], [[255, 255, 255], [0, 0, 0]]
    )


def _two_halves(height: int, width: int) -> np.ndarray:
    """Left half red, right half blue."""
    pixels = solid((height, width), (255, 0, 0))
    pixels[:, width // 2 :] = (0, 0, 255)
    return pixels


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 90 degrees clockwise to view
    path = write_image(tmp_path / "rotated.jpg", _two_halves(20, 40), exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.shape == (40, 20, 3)  # upright: taller than wide
    np.testing.assert_allclose(loaded[5, 10], [255, 0, 0], atol=12)  # the left half is now on top
    np.testing.assert_allclose(loaded[35, 10], [0, 0, 255], atol=12)
    resized = load_image(path, (16, 8))
    assert resized.shape == (16, 8, 3)
    assert resized[2, 4, 0] > 200 and resized[13, 4, 2] > 200


def test_large_jpeg_reduced_decode_matches_full_decode(tmp_path):
    path = write_image(tmp_path / "big.jpg", gradient((600, 800)), quality=95)
    fast = load_image(path, (60, 80))  # decoded at 1/8 scale first
    full = np.asarray(Image.fromarray(load_image(path)).resize((80, 60), Image.BILINEAR))
    assert fast.shape == (60, 80, 3)
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 3


def test_exif_rotated_large_jpeg_with_draft_keeps_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to view
    path = write_image(tmp_path / "r.jpg", _two_halves(400, 800), exif=exif, quality=90)
    loaded = load_image(path, (100, 50))
    assert loaded.shape == (100, 50, 3)
    # Counter-clockwise: the left (red) half ends at the bottom.
    assert loaded[90, 25, 0] > 200 and loaded[10, 25, 2] > 200


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: p, "does not exist"),
        (lambda p: (p.write_bytes(b""), p)[1], "empty"),
        (lambda p: write_text(p), "not an image"),
        (lambda p: write_truncated_jpeg(p), "truncated"),
    ],
    ids=["missing", "empty", "text", "truncated"],
)
def test_unreadable_files_raise_one_line_image_error(tmp_path, make, words):
    path = make(tmp_path / "bad.jpg")
    with pytest.raises(ImageError) as caught:
        load_image(path)
    message = str(caught.value)
    assert isinstance(caught.value, UserError)
    assert message.startswith(str(tmp_path / "bad.jpg")) and words in message
    assert "\n" not in message
    assert caught.value.path == str(tmp_path / "bad.jpg")


def test_too_large_images_are_refused_before_decoding(tmp_path):
    path = write_image(tmp_path / "a.png", solid((20, 30), (1, 2, 3)))
    with pytest.raises(ImageError, match="30x20 pixels is more than the 500 pixels"):
        load_image(path, max_pixels=500)
    assert load_image(path, max_pixels=600).shape == (20, 30, 3)
    # A header claiming 60000 x 60000 pixels: PIL's own refusal becomes an ImageError too.
    bomb = write_png_header(tmp_path / "bomb.png", 60000, 60000)
    with pytest.raises(ImageError, match="decoded safely"):
        load_image(bomb)


def test_centre_and_random_crops_with_flips():
    image = gradient((10, 12))
    np.testing.assert_array_equal(center_crop(image, (6, 8)), image[2:8, 2:10])
    with pytest.raises(ValueError):
        center_crop(image, (11, 4))

    crops = [
        random_crop_flip(image, (6, 8), np.random.default_rng(s), flip=False, crop=True)
        for s in range(30)
    ]
    windows = {(int(c[0, 0, 1]), int(c[0, 0, 0])) for c in crops}  # (top, left) as colour
    assert len(windows) > 5  # the windows move
    for crop in crops:  # every crop is a window of the image
        top = int(np.flatnonzero(image[:, 0, 1] == crop[0, 0, 1])[0])
        left = int(np.flatnonzero(image[0, :, 0] == crop[0, 0, 0])[0])
        np.testing.assert_array_equal(crop, image[top : top + 6, left : left + 8])

    flips = [
        random_crop_flip(image, (10, 12), np.random.default_rng(s), flip=True, crop=False)
        for s in range(40)
    ]
    flipped = [np.array_equal(f, image[:, ::-1]) for f in flips]
    assert all(f or np.array_equal(image, g) for f, g in zip(flipped, flips))
    assert 5 < sum(flipped) < 35
    same = random_crop_flip(image, (6, 8), np.random.default_rng(7), flip=True, crop=True)
    again = random_crop_flip(image, (6, 8), np.random.default_rng(7), flip=True, crop=True)
    np.testing.assert_array_equal(same, again)


def test_load_and_fit_resizes_then_centre_crops(tmp_path):
    path = write_image(tmp_path / "a.png", gradient((40, 40)))
    fitted = load_and_fit(path, (16, 16), (20, 24))
    np.testing.assert_array_equal(fitted, center_crop(load_image(path, (20, 24)), (16, 16)))
    np.testing.assert_array_equal(load_and_fit(path, (16, 16), None), load_image(path, (16, 16)))


def test_encoded_bytes_decode_as_their_file_does(tmp_path):
    png = write_image(tmp_path / "a.png", gradient((40, 30)))
    jpeg = write_image(tmp_path / "b.jpg", gradient((900, 700)), quality=90)
    for path in (png, jpeg):
        data = path.read_bytes()
        np.testing.assert_array_equal(load_image(data), load_image(path))
        np.testing.assert_array_equal(load_image(data, (20, 16)), load_image(path, (20, 16)))
        np.testing.assert_array_equal(
            load_and_fit(data, (16, 16), (20, 24), name="upload"),
            load_and_fit(path, (16, 16), (20, 24)),
        )
    with pytest.raises(ImageError) as empty:
        load_image(b"", name="upload.png")
    assert str(empty.value) == "upload.png: no image data (0 bytes)"
    with pytest.raises(ImageError, match=r"^<image data>: not an image file"):
        load_image(b"plain words")
    bomb = write_png_header(tmp_path / "bomb.png", 60000, 60000).read_bytes()
    # PIL's own limit refuses at opening; the message still gives the size, with separators.
    expected = r"^bomb.png: the image \(3,600,000,000 pixels\) is more than the 1,000 pixels"
    with pytest.raises(ImageError, match=expected):
        load_image(bomb, max_pixels=1000, name="bomb.png")  # PIL's own limit, at opening
    large = write_png_header(tmp_path / "large.png", 2000, 1000).read_bytes()
    with pytest.raises(ImageError, match="^large.png: 2000x1000 pixels is more than the 1,000"):
        load_image(large, max_pixels=1000, name="large.png")  # ours, from the header


def test_fit_image_is_load_and_fit_of_decoded_pixels(tmp_path):
    path = write_image(tmp_path / "a.png", gradient((50, 70)))
    pixels = load_image(path)
    np.testing.assert_array_equal(
        fit_image(pixels, (16, 16), (20, 24)), load_and_fit(path, (16, 16), (20, 24))
    )
    np.testing.assert_array_equal(
        fit_image(pixels, (16, 16), None), load_and_fit(path, (16, 16), None)
    )
    same_size = gradient((16, 16))
    np.testing.assert_array_equal(fit_image(same_size, (16, 16), None), same_size)
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) uint8 image"):
        fit_image(np.zeros((8, 8), np.uint8), (4, 4), None)
