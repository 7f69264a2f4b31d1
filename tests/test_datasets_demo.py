"""datasets.demo: a seeded, idempotent shapes data set and its command line."""

import json

import numpy as np
import pytest

from datasets import demo
from datasets.images import load_image
from datasets.lists import load_splits, scan_class_folders
from tfcbir import UserError

SMALL = dict(classes=4, per_class=5, size=32, seed=3)


def _contents(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_layout_and_determinism(tmp_path):
    first = demo.generate(tmp_path / "one", **SMALL)
    second = demo.generate(tmp_path / "two", **SMALL)
    assert first == tmp_path / "one"
    files = _contents(first)
    assert files == _contents(second)  # byte for byte
    names = list(demo.SHAPES)[:4]
    assert sorted(files) == sorted(
        [demo.MANIFEST, demo.CAPTIONS] + [f"{n}/{i:03d}.png" for n in names for i in range(5)]
    )
    manifest = json.loads(files[demo.MANIFEST])
    assert {k: manifest[k] for k in SMALL} == SMALL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no temporary folders

    images = scan_class_folders(first)  # a valid data root
    assert images.classes == sorted(names) and images.class_counts().tolist() == [5] * 4
    pixels = [load_image(p) for p in images.absolute_paths()]
    assert all(p.shape == (32, 32, 3) for p in pixels)
    assert len({p.tobytes() for p in pixels}) == 20  # every image differs
    splits = load_splits(first, {"by": "images", "test_fraction": 0.2}, seed=0)
    assert (len(splits.train), len(splits.test)) == (16, 4)

    other_seed = demo.generate(tmp_path / "three", **{**SMALL, "seed": 4})
    assert _contents(other_seed)["circle/000.png"] != files["circle/000.png"]


def test_generation_is_idempotent_and_replaces_other_demo_sets(tmp_path):
    out = demo.generate(tmp_path / "set", **SMALL)
    stamp = (out / "circle" / "000.png").stat().st_mtime_ns
    demo.generate(out, **SMALL)
    assert (out / "circle" / "000.png").stat().st_mtime_ns == stamp  # nothing rewritten
    bigger = demo.generate(out, **{**SMALL, "per_class": 7})
    assert scan_class_folders(bigger).class_counts().tolist() == [7] * 4
    (out / "square" / "003.png").unlink()  # an incomplete set is made again
    demo.generate(out, **{**SMALL, "per_class": 7})
    assert (out / "square" / "003.png").is_file()


def test_shapes_are_drawn_on_varied_backgrounds():
    rng = np.random.default_rng(0)
    images = [demo.render(shape, 48, rng) for shape in demo.SHAPES for _ in range(3)]
    assert all(image.shape == (48, 48, 3) and image.dtype == np.uint8 for image in images)
    corners = np.array([image[0, 0].astype(int) for image in images])
    assert corners.std(axis=0).min() > 30  # random background colours


def test_refuses_foreign_folders_and_bad_arguments(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(UserError, match="not empty and holds no demo set"):
        demo.generate(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"
    with pytest.raises(UserError, match="--classes: 99"):
        demo.generate(tmp_path / "x", classes=99)


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    code = demo.main(["--out", str(out), "--classes", "3", "--per-class", "2", "--size", "24"])
    assert code == 0 and str(out) in capsys.readouterr().out
    assert scan_class_folders(out).class_counts().tolist() == [2, 2, 2]
    assert demo.main(["--out", str(out), "--classes", "1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --classes: 1") and error.count("\n") == 1


def test_captions_describe_what_is_drawn(tmp_path):
    from datasets.captions import image_captions, load_caption_table

    root = demo.generate(tmp_path / "set", **SMALL)
    images = scan_class_folders(root)
    captions = image_captions(images, load_caption_table(root, demo.CAPTIONS), None)
    assert len(captions) == 2 * len(images) and captions.from_file.all()
    assert captions.image.tolist() == [i for i in range(len(images)) for _ in range(2)]
    # Caption of image 0 of the first class, recomputed from the generator's own draws.
    label = list(demo.SHAPES).index(images.paths[0].split("/")[0])
    _, shown = demo.draw(images.classes[0], 32, np.random.default_rng([3, label, 0]))
    assert captions.texts[:2] == demo.captions(shown)
    long, short = captions.texts[0], captions.texts[1]
    assert short == f"a {demo.colour_name(shown['colour'])} {images.classes[0]}"
    assert long.startswith(f"a {demo.size_word(shown['radius'])} ") and images.classes[0] in long


@pytest.mark.parametrize(
    "rgb, name",
    [
        ((230, 20, 20), "red"),
        ((20, 30, 220), "blue"),
        ((30, 200, 40), "green"),
        ((240, 230, 30), "yellow"),
        ((245, 245, 245), "white"),
        ((10, 10, 10), "black"),
        ((128, 128, 128), "grey"),
        ((140, 70, 10), "brown"),
        ((250, 140, 10), "orange"),
        ((150, 30, 220), "purple"),
    ],
)
def test_colour_names(rgb, name):
    assert demo.colour_name(rgb) == name


def test_size_and_position_words():
    assert [demo.size_word(r) for r in (0.22, 0.29, 0.36)] == ["small", "medium", "large"]
    assert demo.position_words((0.3, 0.3)) == "at the top left"
    assert demo.position_words((0.5, 0.7)) == "at the bottom"
    assert demo.position_words((0.7, 0.5)) == "on the right"
    assert demo.position_words((0.5, 0.5)) == "in the centre"
