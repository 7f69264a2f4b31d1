"""datasets.captions: captions.csv, class-name templates, and which pairs are not negatives."""

from __future__ import annotations

import numpy as np
import pytest

from datasets.captions import (
    CAPTIONS_FILE,
    check_template,
    class_phrase,
    class_prompts,
    image_captions,
    load_caption_table,
    only_captioned,
    pair_groups,
    read_captions_file,
    resolve_group_by,
)
from datasets.lists import scan_class_folders
from tests.helpers_images import captured_warnings, make_class_tree
from tfcbir import UserError


@pytest.fixture
def tree(tmp_path):
    """golden_retriever/000..002.png, red-fox/000..001.png, tabby/000.png."""
    return make_class_tree(tmp_path / "root", {"golden_retriever": 3, "red-fox": 2, "tabby": 1})


def write_captions(root, text: str):
    (root / CAPTIONS_FILE).write_text(text, encoding="utf-8")
    return root / CAPTIONS_FILE


def test_class_phrases_and_templates():
    assert class_phrase("golden_retriever") == "golden retriever"
    assert class_phrase("red-fox") == "red fox"
    assert class_phrase("__odd--name_") == "odd name"
    assert class_prompts(["red-fox"], ["a photo of a {class}.", "{class}"]) == [
        ["a photo of a red fox.", "red fox"]
    ]
    # Only {class} is a field: other braces are kept as written.
    assert class_prompts(["tabby"], ["{x} {class}"]) == [["{x} tabby"]]
    assert check_template("a photo of a {class}.") is None
    assert "{class}" in check_template("a photo")


def test_captions_file_rows_several_per_image(tree):
    path = write_captions(
        tree,
        "path,caption\n"
        "golden_retriever/000.png,a dog on grass\n"
        'golden_retriever\\000.png,"a golden, happy dog"\n'
        "\n"
        "./red-fox/001.png,  a   fox  \n",
    )
    table = read_captions_file(path)
    assert table == {
        "golden_retriever/000.png": ["a dog on grass", "a golden, happy dog"],
        "red-fox/001.png": ["a fox"],
    }


@pytest.mark.parametrize(
    "text, message",
    [
        ("file,text\na.png,x\n", "captions.csv:1: the first line is 'file,text'"),
        ("", "captions.csv:1: the first line is 'nothing'"),
        ("path,caption\n", "no captions below the header"),
        ("path,caption\na.png,b,c\n", "captions.csv:2: 3 fields"),
        ("path,caption\na.png\n", "captions.csv:2: 1 fields"),
        ("path,caption\na.png,x\nb.png,  \n", "captions.csv:3: empty caption"),
    ],
)
def test_bad_captions_files_are_one_line_errors(tree, text, message):
    path = write_captions(tree, text)
    with pytest.raises(UserError, match=message) as caught:
        read_captions_file(path)
    assert "\n" not in str(caught.value)


def test_a_captions_file_not_in_utf8_is_a_one_line_error(tree):
    # "café" saved as Latin-1: byte 0xe9 is not UTF-8.
    (tree / CAPTIONS_FILE).write_bytes(b"path,caption\ntabby/000.png,a cat in a caf\xe9\n")
    for read in (
        lambda: read_captions_file(tree / CAPTIONS_FILE),
        lambda: load_caption_table(tree, CAPTIONS_FILE),
    ):
        with pytest.raises(UserError) as caught:
            read()
        expected = f"{tree / CAPTIONS_FILE}:2: not UTF-8 text (byte 0xe9); save it as UTF-8"
        assert str(caught.value) == expected
    # An unclosed quote swallows the rest of the file into one field, over csv's size limit.
    write_captions(tree, 'path,caption\ntabby/000.png,"a cat\n' + "x" * 200_000 + "\n")
    with pytest.raises(UserError, match=r"captions.csv:\d+: not readable as CSV \(field larger"):
        read_captions_file(tree / CAPTIONS_FILE)


def test_caption_table_lists_each_folder_once(tree, monkeypatch):
    rows = "".join(f"golden_retriever/{i:03d}.png,dog {i}\n" for i in range(5))
    write_captions(tree, "path,caption\n" + rows + "red-fox/000.png,a fox\nnone/000.png,x\n")
    import os
    import pathlib

    listed, stats = [], []
    scandir, is_file = os.scandir, pathlib.Path.is_file
    monkeypatch.setattr(os, "scandir", lambda folder: listed.append(folder) or scandir(folder))
    monkeypatch.setattr(pathlib.Path, "is_file", lambda self: stats.append(self) or is_file(self))
    with captured_warnings() as warnings:
        table = load_caption_table(tree, CAPTIONS_FILE)
    assert list(table) == [f"golden_retriever/{i:03d}.png" for i in range(3)] + ["red-fox/000.png"]
    assert "3 of the 7 images" in warnings[0]  # 003, 004 and none/000 do not exist
    assert sorted(os.path.basename(f) for f in listed) == ["golden_retriever", "none", "red-fox"]
    assert stats == [tree / CAPTIONS_FILE] * 2  # the captions file only, never an image


def test_file_captions_then_templates_for_the_rest(tree):
    write_captions(
        tree,
        "path,caption\ngolden_retriever/001.png,a dog\ngolden_retriever/001.png,a pet\n"
        "missing/009.png,gone\n",
    )
    images = scan_class_folders(tree)
    with captured_warnings() as warnings:
        table = load_caption_table(tree, CAPTIONS_FILE)
    assert list(table) == ["golden_retriever/001.png"]
    assert len(warnings) == 1 and "missing/009.png" in warnings[0]

    only_file = image_captions(images, table, None)
    assert only_file.texts == ["a dog", "a pet"]
    assert only_file.image.tolist() == [1, 1] and only_file.from_file.all()

    both = image_captions(images, table, ["a photo of a {class}."])
    assert both.texts == [
        "a photo of a golden retriever.",
        "a dog",
        "a pet",
        "a photo of a golden retriever.",
        "a photo of a red fox.",
        "a photo of a red fox.",
        "a photo of a tabby.",
    ]
    assert both.image.tolist() == [0, 1, 1, 2, 3, 4, 5]
    assert both.from_file.tolist() == [False, True, True, False, False, False, False]
    assert resolve_group_by("auto", both) == "image"
    assert resolve_group_by("auto", image_captions(images, None, ["{class}"])) == "class"
    assert resolve_group_by("class", both) == "class"

    kept, renumbered = only_captioned(images, only_file)
    assert kept.paths == ["golden_retriever/001.png"] and renumbered.image.tolist() == [0, 0]
    assert load_caption_table(tree, "absent.csv") is None and load_caption_table(tree, None) is None


def test_pair_groups_join_same_image_same_text_and_same_class():
    images = np.array([5, 5, 7, 8, 9, 10])
    texts = np.array([0, 1, 2, 2, 3, 4])
    # 0-1 same image; 2-3 same caption; 4 and 5 alone.
    assert pair_groups(images, texts).tolist() == [0, 0, 1, 1, 2, 3]
    classes = np.array([0, 1, 1, 2, 2, 3])
    # Transitively: 0-1 (image), 1-2 (class), 2-3 (text), 3-4 (class).
    assert pair_groups(images, texts, classes).tolist() == [0, 0, 0, 0, 0, 1]
    assert pair_groups(np.arange(4), np.arange(4)).tolist() == [0, 1, 2, 3]
