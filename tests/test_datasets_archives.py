"""datasets.archives: the four benchmark archives, detected and split by their protocol."""

from __future__ import annotations

import numpy as np
import pytest

from datasets import archives
from datasets.image_list import existing_files
from datasets.lists import LAYOUTS, load_splits
from retrieval import sets
from tests.conftest import tiny_config
from tests.helpers_archives import make_cars, make_cub, make_inshop, make_sop
from tests.helpers_images import captured_warnings, make_class_tree
from tfcbir import UserError

AUTO = {"by": "auto"}


def _names(images) -> set[str]:
    return {images.classes[label] for label in np.unique(images.labels)}


def _config(root, **overrides) -> dict:
    import config

    return config.resolve(
        tiny_config(data__root=str(root), data__split={"by": "auto"}, **overrides)
    )


def test_layout_names_match_the_schema():
    from config.schema import DATA_FORMATS

    assert ["auto", *LAYOUTS] == DATA_FORMATS
    assert LAYOUTS[3:] == archives.FORMATS


@pytest.mark.parametrize("at_parent", [False, True])
def test_cub_classes_1_to_100_train_and_the_rest_test(tmp_path, at_parent):
    folder = make_cub(tmp_path, {1: 3, 2: 3, 3: 2, 100: 2, 101: 3, 102: 2, 200: 1})
    root = tmp_path if at_parent else folder
    splits = load_splits(root, AUTO, seed=0)
    assert (splits.layout, splits.kind) == ("cub200", "protocol")
    train, test = splits.train, splits.test
    assert train.root == test.root == folder
    assert train.classes == test.classes  # one label space, in class-id order
    assert train.classes == [
        "001.Bird_1",
        "002.Bird_2",
        "003.Bird_3",
        "100.Bird_100",
        "101.Bird_101",
        "102.Bird_102",
        "200.Bird_200",
    ]
    assert _names(train) == {"001.Bird_1", "002.Bird_2", "003.Bird_3", "100.Bird_100"}
    assert _names(test) == {"101.Bird_101", "102.Bird_102", "200.Bird_200"}
    assert (len(train), len(test)) == (10, 6)
    assert train.class_counts().tolist() == [3, 3, 2, 2, 0, 0, 0]
    assert splits.class_disjoint and splits.query is None and splits.missing == []
    # train_test_split.txt (alternating flags) is the classification split: ignored
    assert train.paths[0] == "images/001.Bird_1/Bird_1_0000_1.jpg"
    assert all(p.startswith("images/") for p in train.paths + test.paths)
    assert all((folder / p).is_file() for p in train.paths + test.paths)


def test_cars_classes_1_to_98_train_ignoring_the_test_flag(tmp_path):
    root = make_cars(tmp_path / "cars196", {1: 3, 2: 2, 98: 2, 99: 3, 150: 2, 196: 2})
    splits = load_splits(root, AUTO, seed=0)
    assert (splits.layout, splits.kind) == ("cars196", "protocol")
    train, test = splits.train, splits.test
    assert _names(train) == {"Maker Model 1 2012", "Maker Model 2 2012", "Maker Model 98 2012"}
    assert _names(test) == {
        "Maker Model 99 2012",
        "Maker Model 150 2012",
        "Maker Model 196 2012",
    }
    assert (len(train), len(test)) == (7, 7)
    assert train.paths[:2] == ["car_ims/000001.jpg", "car_ims/000002.jpg"]
    assert test.paths[0] == "car_ims/000008.jpg"
    assert splits.class_disjoint


@pytest.mark.parametrize("at_parent", [False, True])
def test_sop_splits_by_its_two_files(tmp_path, at_parent):
    folder = make_sop(tmp_path, train={1: 3, 2: 2, 11318: 4}, test={11319: 2, 22634: 3})
    splits = load_splits(tmp_path if at_parent else folder, AUTO, seed=0)
    assert (splits.layout, splits.kind) == ("sop", "protocol")
    train, test = splits.train, splits.test
    assert train.classes == ["1", "2", "11318", "11319", "22634"]  # numeric order
    assert _names(train) == {"1", "2", "11318"} and _names(test) == {"11319", "22634"}
    assert train.class_counts().tolist() == [3, 2, 4, 0, 0]
    assert test.class_counts().tolist() == [0, 0, 0, 2, 3]
    assert train.paths[0] == "chair_final/1_0.JPG" and test.paths[-1] == "bicycle_final/22634_2.JPG"
    assert splits.class_disjoint


INSHOP = {
    "id_00000001": (3, 0, 0),
    "id_00000002": (2, 0, 0),
    "id_00000007": (4, 0, 0),
    "id_00000003": (0, 2, 3),
    "id_00000004": (0, 1, 2),
}


def test_inshop_gives_train_query_and_gallery(tmp_path):
    root = make_inshop(tmp_path / "inshop", INSHOP)
    splits = load_splits(root, AUTO, seed=0)
    assert (splits.layout, splits.kind) == ("inshop", "protocol")
    assert splits.train.classes == sorted(INSHOP)
    assert _names(splits.train) == {"id_00000001", "id_00000002", "id_00000007"}
    assert _names(splits.query) == _names(splits.gallery) == {"id_00000003", "id_00000004"}
    assert (len(splits.train), len(splits.query), len(splits.gallery)) == (9, 3, 5)
    assert splits.query.paths == [
        "img/WOMEN/Dresses/id_00000003/00_1_front.jpg",
        "img/WOMEN/Dresses/id_00000003/01_1_front.jpg",
        "img/WOMEN/Dresses/id_00000004/00_1_front.jpg",
    ]
    assert splits.test.paths == splits.query.paths + splits.gallery.paths
    assert splits.query.classes == splits.gallery.classes == splits.train.classes
    assert splits.class_disjoint

    config = _config(root)
    protocol = sets.protocol(config, splits)
    assert (protocol.name, protocol.queries, protocol.gallery) == (
        "query_gallery",
        "query",
        "gallery",
    )
    assert sets.images(config, "query").paths == splits.query.paths  # no eval lists needed
    assert sets.images(config, "gallery", splits).paths == splits.gallery.paths


def test_inshop_release_folders_eval_and_img(tmp_path):
    """The release's own folders: Eval/list_eval_partition.txt and Img/img/."""
    made = make_inshop(tmp_path / "made", INSHOP)
    root = tmp_path / "In-shop Clothes Retrieval Benchmark"
    (root / "Eval").mkdir(parents=True)
    (root / "Img").mkdir()
    (made / "list_eval_partition.txt").rename(root / "Eval" / "list_eval_partition.txt")
    (made / "img").rename(root / "Img" / "img")
    splits = load_splits(root, AUTO, seed=0)
    assert splits.layout == "inshop" and (len(splits.query), len(splits.gallery)) == (3, 5)
    assert splits.train.paths[0] == "Img/img/WOMEN/Dresses/id_00000001/00_1_front.jpg"
    assert all((root / p).is_file() for p in splits.test.paths)


def test_protocols_of_the_class_disjoint_archives_are_leave_one_out(tmp_path):
    root = make_cub(tmp_path, {1: 2, 2: 2, 101: 2, 102: 2})
    config = _config(root)
    protocol = sets.protocol(config)
    assert (protocol.name, protocol.queries, protocol.gallery) == ("leave_one_out", "test", "test")
    with pytest.raises(UserError, match="eval.query_list: not set"):
        sets.images(config, "query")


def test_missing_images_are_left_out_and_named(tmp_path):
    folder = make_sop(tmp_path, train={1: 3, 2: 2}, test={3: 2, 4: 2})
    (folder / "chair_final/1_1.JPG").unlink()
    (folder / "bicycle_final/4_0.JPG").unlink()
    with captured_warnings() as warnings:
        splits = load_splits(folder, AUTO, seed=0)
    assert splits.missing == ["chair_final/1_1.JPG", "bicycle_final/4_0.JPG"]
    assert (len(splits.train), len(splits.test)) == (4, 3)
    assert "chair_final/1_1.JPG" not in splits.train.paths
    assert any("2 of 9 listed images do not exist" in w for w in warnings)


def test_an_archive_without_its_images_is_refused(tmp_path):
    folder = make_cub(tmp_path, {1: 2, 101: 2})
    for path in sorted((folder / "images").rglob("*.jpg")):
        path.unlink()
    with pytest.raises(UserError, match="none of the 4 listed images exist"):
        load_splits(folder, AUTO, seed=0)


def test_an_archive_without_a_test_class_is_refused(tmp_path):
    folder = make_cub(tmp_path, {1: 2, 2: 2})
    with pytest.raises(UserError, match=r"no test image of the CUB-200-2011 protocol"):
        load_splits(folder, AUTO, seed=0)
    assert len(load_splits(folder, {"by": "none"}, seed=0).train) == 4


def test_split_by_none_trains_on_everything(tmp_path):
    root = make_inshop(tmp_path / "inshop", INSHOP)
    splits = load_splits(root, {"by": "none"}, seed=0)
    assert splits.kind == "none" and splits.test is None and splits.query is None
    assert len(splits.train) == 17


def test_format_forced_and_mismatches_are_one_line_errors(tmp_path):
    sop = make_sop(tmp_path / "a", train={1: 2}, test={2: 2})
    with pytest.raises(UserError, match="data.format: 'cub200' but .* has no images.txt"):
        load_splits(sop, AUTO, seed=0, format="cub200")
    with pytest.raises(UserError, match=r"'images' but .* already split \(the sop archive"):
        load_splits(sop, {"by": "images"}, seed=0)
    assert load_splits(sop, {"by": "protocol"}, seed=0, format="sop").kind == "protocol"
    classes = make_class_tree(tmp_path / "b", {"x": 3, "y": 3})
    with pytest.raises(UserError, match="data.split.by: 'protocol' but .* not a benchmark"):
        load_splits(classes, {"by": "protocol"}, seed=0)
    with pytest.raises(UserError, match="data.format: 'csv' but .*x_train.csv does not exist"):
        load_splits(classes, AUTO, seed=0, format="csv")
    with pytest.raises(UserError, match="data.format: 'nope' is not one of auto, class_folders"):
        load_splits(classes, AUTO, seed=0, format="nope")
    # class_folders forced: an archive's folder is read as plain class folders
    forced = load_splits(sop, {"by": "none"}, seed=0, format="class_folders")
    assert forced.layout == "class_folders"
    assert forced.train.classes == ["bicycle_final", "chair_final"]


def test_damaged_lists_name_the_file_and_line(tmp_path):
    folder = make_sop(tmp_path, train={1: 2}, test={2: 2})
    (folder / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n3 2 1\n")
    with pytest.raises(UserError, match=r"Ebay_test.txt:2: '3 2 1' is not 'image_id class_id"):
        load_splits(folder, AUTO, seed=0)
    cars = tmp_path / "cars"
    cars.mkdir()
    (cars / "cars_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(UserError, match="cars_annos.mat: not a readable MATLAB file"):
        load_splits(cars, AUTO, seed=0)


@pytest.mark.parametrize("name", ["sop", "cub200", "inshop"])
def test_lists_not_in_utf8_name_the_file(tmp_path, name):
    if name == "sop":
        listing = make_sop(tmp_path, train={1: 2}, test={2: 2}) / "Ebay_test.txt"
    elif name == "cub200":
        listing = make_cub(tmp_path, {1: 2, 101: 2}) / "classes.txt"
    else:
        listing = make_inshop(tmp_path / "shop", {"id_1": (2, 0, 0), "id_2": (0, 1, 1)})
        listing = listing / "list_eval_partition.txt"
    lines = listing.read_bytes().count(b"\n")
    listing.write_bytes(listing.read_bytes() + b"# r\xe9sum\xe9\n")  # a Latin-1 byte
    with pytest.raises(UserError) as caught:
        load_splits(listing.parent, AUTO, seed=0)
    assert (
        str(caught.value) == f"{listing}:{lines + 1}: not UTF-8 text (byte 0xe9); save it as UTF-8"
    )


def test_existing_files_lists_each_folder_once(tmp_path):
    make_class_tree(tmp_path, {"a": 2, "b": 1})
    paths = [
        "a/000.png",
        "a/001.png",
        "a/002.png",
        "b/000.png",
        "c/000.png",
        "a",
        str(tmp_path / "b/000.png"),
    ]
    assert existing_files(tmp_path, paths).tolist() == [True, True, False, True, False, False, True]
