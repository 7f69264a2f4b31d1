"""datasets.lists: scanning data roots and the five ways of splitting them."""

import numpy as np
import pytest

from datasets.lists import (
    ImageList,
    load_splits,
    read_csv_list,
    scan_class_folders,
    validation_split,
)
from tests.helpers_images import captured_warnings, make_class_tree, solid, write_image
from tfcbir import UserError

IMAGES = {"by": "images", "test_fraction": 0.2}
CLASSES = {"by": "classes", "train_classes": 0.5}


def _pairs(images: ImageList) -> set[tuple[str, str]]:
    return {(images.classes[label], path) for label, path in zip(images.labels, images.paths)}


def test_scan_sorts_and_ignores_hidden_and_non_images(tmp_path):
    root = make_class_tree(tmp_path, {"b": 2, "a": 3})
    (root / "a" / "notes.txt").write_text("x")
    write_image(root / "a" / ".hidden.png", solid((4, 4), (0, 0, 0)))
    write_image(root / ".cache" / "x.png", solid((4, 4), (0, 0, 0)))
    write_image(root / "a" / "UPPER.JPG", solid((4, 4), (0, 0, 0)))
    (root / "empty").mkdir()
    with captured_warnings() as warnings:
        images = scan_class_folders(root)
    assert images.root == root and images.classes == ["a", "b"]
    assert images.paths == [
        "a/000.png",
        "a/001.png",
        "a/002.png",
        "a/UPPER.JPG",
        "b/000.png",
        "b/001.png",
    ]
    assert images.labels.dtype == np.int32 and images.labels.tolist() == [0, 0, 0, 0, 1, 1]
    assert any("empty" in w for w in warnings)  # a class folder without images is named
    assert images.class_counts().tolist() == [4, 2]
    assert images.absolute_paths()[0] == str(root / "a" / "000.png")
    part = images.subset([5, 0])
    assert part.paths == ["b/001.png", "a/000.png"] and part.labels.tolist() == [1, 0]
    assert part.classes == ["a", "b"] and part.class_counts().tolist() == [1, 1]
    assert images.subset(images.labels == 1).paths == ["b/000.png", "b/001.png"]


def test_images_split_is_stratified_and_seeded(tmp_path):
    counts = {"ten": 10, "five": 5, "three": 3, "one": 1, "two": 2}
    root = make_class_tree(tmp_path, counts)
    splits = load_splits(root, {"by": "images", "test_fraction": 0.3}, seed=1)
    assert splits.kind == "images"
    train, test = splits.train, splits.test
    assert train.classes == test.classes == sorted(counts)
    # round-half-up(0.3 n), but at least one training image: 10->3, 5->2 (1.5), 3->1, 2->1, 1->0
    expected_test = {"ten": 3, "five": 2, "three": 1, "two": 1, "one": 0}
    test_counts = dict(zip(test.classes, test.class_counts().tolist()))
    train_counts = dict(zip(train.classes, train.class_counts().tolist()))
    assert test_counts == expected_test
    assert all(train_counts[c] == counts[c] - expected_test[c] for c in counts)
    assert not _pairs(train) & _pairs(test)
    assert _pairs(train) | _pairs(test) == _pairs(scan_class_folders(root))
    assert train.paths == sorted(train.paths)  # list order is kept within each side

    again = load_splits(root, {"by": "images", "test_fraction": 0.3}, seed=1)
    assert again.test.paths == test.paths
    others = [
        load_splits(root, {"by": "images", "test_fraction": 0.3}, seed=s).test.paths
        for s in range(2, 8)
    ]
    assert any(other != test.paths for other in others)


def test_images_split_without_any_test_image_is_an_error(tmp_path):
    root = make_class_tree(tmp_path, {"a": 1, "b": 2})
    with pytest.raises(UserError, match="data.split.test_fraction"):
        load_splits(root, {"by": "images", "test_fraction": 0.1}, seed=0)


def test_classes_split_is_class_disjoint_and_seeded(tmp_path):
    names = [f"c{i:02d}" for i in range(10)]
    root = make_class_tree(tmp_path, dict.fromkeys(names, 2))
    splits = load_splits(root, {"by": "classes", "train_classes": 0.6}, seed=3)
    assert splits.kind == "classes"
    train_classes = {splits.train.classes[i] for i in np.unique(splits.train.labels)}
    test_classes = {splits.test.classes[i] for i in np.unique(splits.test.labels)}
    assert len(train_classes) == 6 and len(test_classes) == 4
    assert not train_classes & test_classes and train_classes | test_classes == set(names)
    assert splits.train.classes == splits.test.classes == names  # one label space
    assert len(splits.train) == 12 and len(splits.test) == 8
    same = load_splits(root, {"by": "classes", "train_classes": 0.6}, seed=3)
    assert same.train.paths == splits.train.paths
    draws = {tuple(load_splits(root, CLASSES, seed=s).test.paths) for s in range(6)}
    assert len(draws) > 1
    ordered = load_splits(root, {"by": "classes", "train_classes": 0.6, "order": "sorted"}, 3)
    assert {ordered.train.classes[i] for i in np.unique(ordered.train.labels)} == set(names[:6])


@pytest.mark.parametrize("share, words", [(0.9, "no test class"), (0.1, "no training class")])
def test_classes_split_needs_classes_on_both_sides(tmp_path, share, words):
    root = make_class_tree(tmp_path, {"a": 2, "b": 2, "c": 2})
    with pytest.raises(UserError, match=f"data.split.train_classes.*{words}"):
        load_splits(root, {"by": "classes", "train_classes": share}, seed=0)


def test_presplit_folders_share_labels_and_are_auto_detected(tmp_path):
    make_class_tree(tmp_path / "train", {"cat": 2, "dog": 3})
    make_class_tree(tmp_path / "test", {"dog": 1, "eel": 2})
    for by in ("auto", "folders"):
        splits = load_splits(tmp_path, {"by": by}, seed=0)
        assert splits.kind == "folders"
        assert splits.train.classes == splits.test.classes == ["cat", "dog", "eel"]
        assert splits.train.paths[0] == "train/cat/000.png"
        assert splits.train.labels.tolist() == [0, 0, 1, 1, 1]
        assert splits.test.labels.tolist() == [1, 2, 2]
        assert splits.test.paths == ["test/dog/000.png", "test/eel/000.png", "test/eel/001.png"]
    everything = load_splits(tmp_path, {"by": "none"}, seed=0)
    assert everything.kind == "none" and everything.test is None and len(everything.train) == 8


def _write_csv_root(root):
    make_class_tree(root / "img", {"cat": 3, "dog": 3})
    (root / "x_train.csv").write_text(
        "label,path\ncat,img/cat/000.png\ncat,img/cat/001.png\ndog,img/dog/000.png\n"
        "dog,img/dog/missing.png\n\n"
    )
    (root / "x_test.csv").write_text("dog,./img/dog/001.png\nbird,img/cat/002.png\n")
    return root


def test_csv_lists_with_names_header_and_a_missing_file(tmp_path):
    root = _write_csv_root(tmp_path)
    with captured_warnings() as warnings:
        splits = load_splits(root, {"by": "auto"}, seed=0)
    assert splits.kind == "csv"
    assert splits.train.classes == ["bird", "cat", "dog"]  # all names, sorted
    assert splits.train.paths == ["img/cat/000.png", "img/cat/001.png", "img/dog/000.png"]
    assert splits.train.labels.tolist() == [1, 1, 2]
    assert splits.test.paths == ["img/dog/001.png", "img/cat/002.png"]
    assert splits.test.labels.tolist() == [2, 0]
    assert len(warnings) == 1 and "img/dog/missing.png" in warnings[0]
    assert "1 of 4" in warnings[0]


def test_csv_lists_with_integer_labels(tmp_path):
    make_class_tree(tmp_path / "i", {"a": 2, "b": 2})
    (tmp_path / "x_train.csv").write_text("10,i/a/000.png\n2,i/a/001.png\n10,i/b/000.png\n")
    (tmp_path / "x_test.csv").write_text("7,i/b/001.png\n")
    splits = load_splits(tmp_path, {"by": "csv"}, seed=0)
    assert splits.train.classes == ["2", "7", "10"]  # numeric order, not "10" < "2"
    assert splits.train.labels.tolist() == [2, 0, 2]
    assert splits.test.labels.tolist() == [1]


def test_csv_reader_keeps_commas_in_paths_and_detects_headers(tmp_path):
    (tmp_path / "l.csv").write_text('class,file\n3,"a,b.jpg"\n4,c/d,e.png\n')
    assert read_csv_list(tmp_path / "l.csv") == [("3", "a,b.jpg"), ("4", "c/d,e.png")]
    (tmp_path / "m.csv").write_text("3,a.jpg\n")
    assert read_csv_list(tmp_path / "m.csv") == [("3", "a.jpg")]  # a data line, not a header
    (tmp_path / "bad.csv").write_text("only-one-field\n")
    with pytest.raises(UserError, match="bad.csv:1"):
        read_csv_list(tmp_path / "bad.csv")


def test_csv_lists_not_in_utf8_are_one_line_errors(tmp_path):
    make_class_tree(tmp_path / "img", {"café": 1})
    (tmp_path / "x_train.csv").write_bytes(b"caf\xe9,img/caf\xe9/000.png\n")  # Latin-1
    for read in (
        lambda: read_csv_list(tmp_path / "x_train.csv"),
        lambda: load_splits(tmp_path, {"by": "auto"}, seed=0),
    ):
        with pytest.raises(UserError) as caught:
            read()
        assert str(caught.value) == (
            f"{tmp_path / 'x_train.csv'}:1: not UTF-8 text (byte 0xe9); save it as UTF-8"
        )
    # Lines are counted after a byte-order mark, past the first read chunk of a large file.
    body = "".join(f"c,img/c/{i:05d}.png\n" for i in range(2000)).encode()
    (tmp_path / "x_train.csv").write_bytes(b"\xef\xbb\xbf" + body + b"d,img/\xe9.png\n")
    with pytest.raises(UserError, match=r"x_train.csv:2001: not UTF-8 text \(byte 0xe9\)"):
        read_csv_list(tmp_path / "x_train.csv")
    # The same list in UTF-8 (with Excel's byte-order mark) reads.
    (tmp_path / "x_train.csv").write_bytes("\ufeffcafé,img/café/000.png\n".encode())
    assert read_csv_list(tmp_path / "x_train.csv") == [("café", "img/café/000.png")]
    (tmp_path / "x_train.csv").write_text('a,"img/' + "x" * 200_000 + "\n")
    with pytest.raises(UserError, match=r"x_train.csv:\d+: not readable as CSV"):
        load_splits(tmp_path, {"by": "auto"}, seed=0)


def test_csv_with_all_files_missing_is_an_error(tmp_path):
    (tmp_path / "x_train.csv").write_text("a,nope/1.png\nb,nope/2.png\n")
    with pytest.raises(UserError, match="x_train.csv: none of its 2 images exist"):
        load_splits(tmp_path, {"by": "auto"}, seed=0)


def test_csv_without_test_list_has_no_test(tmp_path):
    make_class_tree(tmp_path / "i", {"a": 1})
    (tmp_path / "x_train.csv").write_text("a,i/a/000.png\n")
    splits = load_splits(tmp_path, {}, seed=0)
    assert splits.kind == "csv" and splits.test is None and splits.train.paths == ["i/a/000.png"]


def test_auto_falls_back_to_images_and_none_keeps_everything(tmp_path):
    root = make_class_tree(tmp_path, {"a": 5, "b": 5})
    assert load_splits(root, {}, seed=0).kind == "images"
    splits = load_splits(root, IMAGES, seed=0)
    assert (len(splits.train), len(splits.test)) == (8, 2)
    everything = load_splits(root, {"by": "none"}, seed=0)
    assert everything.test is None and len(everything.train) == 10


def test_root_errors_are_one_line_and_name_the_key(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=rf"^data.root: {missing} does not exist; "):
        load_splits(missing, {}, seed=0)
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "a.png", solid((4, 4), (0, 0, 0)))
    with pytest.raises(UserError, match="has no class folders"):
        load_splits(tmp_path / "flat", {}, seed=0)
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    (tmp_path / "hollow" / "a" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="hold no images"):
        load_splits(tmp_path / "hollow", {}, seed=0)


def test_split_modes_must_match_the_layout(tmp_path):
    plain = make_class_tree(tmp_path / "plain", {"a": 2, "b": 2})
    with pytest.raises(UserError, match="data.split.by: 'folders' but .* no train/ and test/"):
        load_splits(plain, {"by": "folders"}, seed=0)
    with pytest.raises(UserError, match="data.split.by: 'csv' but .*x_train.csv does not exist"):
        load_splits(plain, {"by": "csv"}, seed=0)
    presplit = tmp_path / "presplit"
    make_class_tree(presplit / "train", {"a": 2})
    make_class_tree(presplit / "test", {"a": 2})
    for by in ("images", "classes"):
        with pytest.raises(UserError, match=f"data.split.by: '{by}' but .* is already split"):
            load_splits(presplit, {"by": by}, seed=0)
    half = tmp_path / "half"
    make_class_tree(half / "train", {"a": 2})
    with pytest.raises(UserError, match="has train/ but no test/"):
        load_splits(half, {}, seed=0)
    with pytest.raises(UserError) as caught:
        load_splits(presplit, {"by": "images"}, seed=0)
    assert "\n" not in str(caught.value)


def test_holdout_validation_never_uses_the_test_split(tmp_path):
    root = make_class_tree(tmp_path, {"a": 10, "b": 10, "c": 4})
    splits = load_splits(root, {"by": "images", "test_fraction": 0.2}, seed=0)
    for source in ("auto", "holdout"):
        chosen = validation_split(splits, source, 0.25, seed=3)
        assert chosen.source == "holdout"
        # round-half-up(0.25 n) of each class's training images: 8 -> 2, 3 -> 1 (0.75)
        assert chosen.validation.class_counts().tolist() == [2, 2, 1]
        assert chosen.train.class_counts().tolist() == [6, 6, 2]
        held, trained, test = (_pairs(x) for x in (chosen.validation, chosen.train, splits.test))
        assert not held & test and not held & trained
        assert held | trained == _pairs(splits.train)
    again = validation_split(splits, "holdout", 0.25, seed=3)
    assert again.validation.paths == chosen.validation.paths  # seeded
    test_chosen = validation_split(splits, "test", 0.25, seed=3)
    assert test_chosen.source == "test" and test_chosen.validation is splits.test
    assert test_chosen.train is splits.train
    none = validation_split(splits, "none", 0.25, seed=3)
    assert none.validation is None and none.train is splits.train and none.source == "none"


def test_holdout_of_a_class_disjoint_split_is_whole_training_classes(tmp_path):
    root = make_class_tree(tmp_path, {f"c{i}": 3 for i in range(10)})
    splits = load_splits(root, {"by": "classes", "train_classes": 0.6}, seed=0)
    assert splits.class_disjoint
    chosen = validation_split(splits, "auto", 0.2, seed=0)
    held = set(np.unique(chosen.validation.labels))
    trained = set(np.unique(chosen.train.labels))
    assert len(held) == 1 and len(trained) == 5  # round-half-up(0.2 * 6) = 1 of 6 classes
    assert not held & trained and not held & set(np.unique(splits.test.labels))
    with pytest.raises(UserError, match="train.validation.holdout"):
        validation_split(splits, "holdout", 0.95, seed=0)


def test_validation_from_test_needs_a_test_split_and_singletons_give_none(tmp_path):
    root = make_class_tree(tmp_path, {"a": 1, "b": 1})
    splits = load_splits(root, {"by": "none"}, seed=0)
    with pytest.raises(UserError, match="train.validation.source: 'test'"):
        validation_split(splits, "test", 0.1, seed=0)
    with captured_warnings() as warnings:
        chosen = validation_split(splits, "auto", 0.1, seed=0)  # nothing can be held out
    assert chosen.source == "none" and chosen.validation is None
    assert any("no image can be held out" in w for w in warnings)


def test_compact_renumbers_the_classes_present(tmp_path):
    root = make_class_tree(tmp_path, {"a": 2, "b": 2, "c": 2, "d": 2})
    images = scan_class_folders(root)
    part = images.subset(np.isin(images.labels, [1, 3])).compact()
    assert part.classes == ["b", "d"] and part.labels.tolist() == [0, 0, 1, 1]
    assert part.paths == ["b/000.png", "b/001.png", "d/000.png", "d/001.png"]
