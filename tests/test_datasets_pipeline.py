"""datasets.pipeline: cached and streamed P x K batches, unreadable files, evaluation batches."""

import numpy as np
import pytest

from datasets.images import center_crop, load_and_fit, load_image
from datasets.lists import scan_class_folders
from datasets.pipeline import TrainData, iter_eval_batches
from tests.helpers_images import (
    captured_warnings,
    gradient,
    make_class_tree,
    write_image,
    write_text,
    write_truncated_jpeg,
)
from tfcbir import UserError

COUNTS = {"a": 4, "b": 3, "c": 5, "d": 2, "e": 3}
SIZES = dict(image_size=(8, 8), resize=(10, 12))


def _data(images, **overrides):
    options = dict(P=3, K=2, seed=7, flip=True, crop=True, workers=2, **SIZES)
    options.update(overrides)
    return TrainData(images, **options)


def _check_batch(images, data, batch_images, labels):
    """Full batch, K consecutive labels, P distinct classes, pixels matching the labels."""
    P, K = data.P, data.K
    assert batch_images.shape == (P * K, 8, 8, 3) and batch_images.dtype == np.uint8
    assert labels.shape == (P * K,) and labels.dtype == np.int32
    groups = labels.reshape(P, K)
    assert np.all(groups == groups[:, :1]) and len(set(groups[:, 0])) == P
    # Solid colour-coded images: red says the class whatever the crop and flip.
    assert np.all(batch_images[:, :, :, 0] == (labels[:, None, None] * 20) % 256)
    assert np.all(batch_images[..., 2] == 77)


def test_cached_batches_are_full_consistent_and_reproducible(tmp_path):
    images = scan_class_folders(make_class_tree(tmp_path, COUNTS))
    data = _data(images)
    assert data.cached and data.skipped == [] and data.batch_size == 6
    for step in range(6):
        _check_batch(images, data, *data.batch(step))
    again = _data(images)
    for step in (0, 3, 11):
        for first, second in zip(data.batch(step), again.batch(step)):
            np.testing.assert_array_equal(first, second)


def test_streaming_gives_the_cached_batches(tmp_path):
    write_image(tmp_path / "x" / "0.png", gradient((30, 40)))
    write_image(tmp_path / "x" / "1.png", gradient((20, 20))[::-1])
    write_image(tmp_path / "y" / "0.png", gradient((25, 30))[:, ::-1])
    images = scan_class_folders(tmp_path)
    cached = _data(images, P=2, K=2)
    streamed = _data(images, P=2, K=2, cache_max_bytes=0)
    assert cached.cached and not streamed.cached
    for step in range(5):
        for first, second in zip(cached.batch(step), streamed.batch(step)):
            np.testing.assert_array_equal(first, second)
    streamed.close()


def test_crops_come_from_the_resized_image(tmp_path):
    path = write_image(tmp_path / "only" / "0.png", gradient((30, 40)))
    write_image(tmp_path / "other" / "0.png", gradient((30, 40)))
    images = scan_class_folders(tmp_path)
    resized = load_image(path, (10, 12))
    plain = _data(images, P=2, K=1, flip=False, crop=False)
    centre = center_crop(resized, (8, 8))
    batch, labels = plain.batch(0)
    np.testing.assert_array_equal(batch[list(labels).index(1)], centre)  # "only" is label 1
    windows = {resized[t : t + 8, x : x + 8].tobytes() for t in range(3) for x in range(5)}
    windows |= {
        resized[t : t + 8, x : x + 8][:, ::-1].tobytes() for t in range(3) for x in range(5)
    }
    augmented = _data(images, P=2, K=1)
    crops = {augmented.batch(s)[0][i].tobytes() for s in range(40) for i in range(2)}
    assert crops <= windows and len(crops) > 8  # random windows, some flipped
    straight = _data(images, P=2, K=1, resize=None, flip=False)  # no resize: no crop
    batch, labels = straight.batch(0)
    np.testing.assert_array_equal(batch[list(labels).index(1)], load_image(path, (8, 8)))


def test_unreadable_files_are_skipped_with_named_warnings(tmp_path):
    root = make_class_tree(tmp_path, COUNTS)
    bad = [
        write_truncated_jpeg(root / "a" / "truncated.jpg").name,
        write_text(root / "b" / "text.jpg").name,
        "empty.png",
    ]
    (root / "c" / "empty.png").write_bytes(b"")
    images = scan_class_folders(root)
    with captured_warnings() as warnings:
        data = _data(images)
    assert sorted(data.skipped) == ["a/truncated.jpg", "b/text.jpg", "c/empty.png"]
    for name in bad:
        assert any(name in w for w in warnings)
    assert any("3 of 20 training images could not be read" in w for w in warnings)
    assert data.num_images == 17
    skipped = {images.paths.index(p) for p in data.skipped}
    for step in range(10):
        indices = data._readable[data.sampler.batch(step)]
        assert not skipped & set(indices.tolist())
        _check_batch(images, data, *data.batch(step))


def test_a_class_without_readable_images_is_not_sampled(tmp_path):
    root = make_class_tree(tmp_path, {"a": 3, "b": 3, "c": 3})
    write_text(root / "dead" / "0.jpg")
    write_truncated_jpeg(root / "dead" / "1.jpg")
    images = scan_class_folders(root)
    with captured_warnings() as warnings:
        data = _data(images, P=3, K=2)
    assert any("not sampled: dead" in w for w in warnings)
    dead = images.classes.index("dead")
    assert all(dead not in data.batch(s)[1] for s in range(8))
    with pytest.raises(UserError, match="train.batch.P: 4 is more than the 3 classes"):
        _data(images, P=4, K=2)


def test_streaming_replaces_files_that_fail_later(tmp_path):
    root = make_class_tree(tmp_path, {"a": 3, "b": 2, "c": 2})
    write_truncated_jpeg(root / "b" / "zz.jpg")  # b: 2 good images and this one
    write_text(root / "gone" / "0.jpg")  # a class without a single readable image
    images = scan_class_folders(root)
    data = _data(images, P=3, K=3, cache_max_bytes=0, flip=False)
    with captured_warnings() as warnings:
        batches = [data.batch(step) for step in range(6)]
    assert set(data.skipped) == {"b/zz.jpg", "gone/0.jpg"}
    assert any("b/zz.jpg" in w for w in warnings) and any("class gone" in w for w in warnings)
    for batch_images, labels in batches:
        _check_batch(images, data, batch_images, labels)
        assert images.classes.index("gone") not in labels
        b_rows = batch_images[labels == images.classes.index("b")]
        assert all(row[0, 0, 1] in (0, 1) for row in b_rows)  # only b's good images (green 0, 1)
    again = _data(images, P=3, K=3, cache_max_bytes=0, flip=False)
    for step in (5, 2):  # same batches in a new run, in any order, with the failures known
        for first, second in zip(batches[step], again.batch(step)):
            np.testing.assert_array_equal(first, second)


def test_no_readable_training_image_is_a_user_error(tmp_path):
    write_text(tmp_path / "a" / "0.jpg")
    write_text(tmp_path / "b" / "0.jpg")
    with pytest.raises(UserError, match="none of the 2 training images"):
        _data(scan_class_folders(tmp_path), P=1, K=1)
    images = scan_class_folders(make_class_tree(tmp_path / "ok", {"a": 1}))
    with pytest.raises(UserError, match="data.resize.*smaller than data.image_size"):
        _data(images, P=1, K=1, resize=(6, 20))


def test_dataset_yields_the_batches_in_order_with_static_shapes(tmp_path):
    tf = pytest.importorskip("tensorflow")
    images = scan_class_folders(make_class_tree(tmp_path, COUNTS))
    data = _data(images)
    dataset = data.dataset(2, 6)
    assert dataset.element_spec[0].shape == (6, 8, 8, 3)
    assert dataset.element_spec[0].dtype == tf.uint8
    assert dataset.element_spec[1].shape == (6,) and dataset.element_spec[1].dtype == tf.int32
    produced = list(dataset.as_numpy_iterator())
    assert len(produced) == 4
    for step, (batch_images, labels) in zip(range(2, 6), produced):
        expected_images, expected_labels = data.batch(step)
        np.testing.assert_array_equal(batch_images, expected_images)
        np.testing.assert_array_equal(labels, expected_labels)


def test_eval_batches_keep_order_and_skip_unreadable_files(tmp_path):
    paths = [str(write_image(tmp_path / f"{i}.png", gradient((20 + i, 30)))) for i in range(7)]
    paths[3] = str(write_text(tmp_path / "3.jpg"))
    paths.append(str(tmp_path / "missing.png"))
    errors = []
    with captured_warnings() as warnings:
        batches = list(
            iter_eval_batches(
                paths,
                image_size=(8, 8),
                resize=(10, 12),
                batch_size=3,
                workers=2,
                on_error=lambda i, m: errors.append((i, m)),
            )
        )
    assert [b[0].tolist() for b in batches] == [[0, 1, 2], [4, 5, 6]]
    assert all(b[0].dtype == np.int64 and b[1].shape == (3, 8, 8, 3) for b in batches)
    for indices, pixels in batches:
        for index, image in zip(indices, pixels):
            np.testing.assert_array_equal(image, load_and_fit(paths[index], (8, 8), (10, 12)))
    assert [i for i, _ in errors] == [3, 7] and "3.jpg" in errors[0][1]
    assert any("3.jpg" in w for w in warnings) and any("missing.png" in w for w in warnings)

    straight = list(iter_eval_batches(paths[:2], image_size=(8, 8), resize=None, batch_size=5))
    assert len(straight) == 1 and straight[0][0].tolist() == [0, 1]
    np.testing.assert_array_equal(straight[0][1][1], load_image(paths[1], (8, 8)))


def test_eval_batches_stop_early_without_decoding_everything(tmp_path):
    path = str(write_image(tmp_path / "a.png", gradient((16, 16))))
    stream = iter_eval_batches(
        [path] * 500, image_size=(8, 8), resize=None, batch_size=2, workers=2
    )
    indices, _ = next(stream)
    assert indices.tolist() == [0, 1]
    stream.close()  # cancels what is queued and returns promptly
