"""Incremental gallery updates (retrieval.embedder.update_gallery, retrieval.gallery.plan_update,
retrieval.faiss_index.update_index) against a full embedding of the same images."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from datasets.image_list import ImageList
from retrieval.embedder import Embedder, embed_images, update_gallery
from retrieval.gallery import read_gallery, write_gallery
from retrieval.metrics import evaluate_leave_one_out
from retrieval.search import ExactIndex
from tests.conftest import tiny_config, write_config
from tfcbir import UserError


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An untrained small_cnn of the tiny config (its values are what matters, not quality)."""
    import config
    import nets

    cfg = config.load(write_config(tmp_path_factory.mktemp("config"), "update", tiny_config()))
    return cfg, nets.build_embedding_model(cfg["model"], tuple(cfg["data"]["image_size"]))


def make_embedder(model, model_id: str = "m0") -> Embedder:
    cfg, keras_model = model
    return Embedder.of_config(cfg, keras_model, model_id=model_id, model_step=0, weights=None)


class Counting:
    """An embedder wrapper that counts the files it is asked to embed."""

    def __init__(self, embedder: Embedder):
        self.embedder, self.files = embedder, []

    def __getattr__(self, name):
        return getattr(self.embedder, name)

    def embed_files(self, paths, **kwargs):
        self.files += list(paths)
        return self.embedder.embed_files(paths, **kwargs)


def image_list(root: Path) -> ImageList:
    """The data set as it is on disk now: root/<class>/<file>.png, sorted."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).glob("*.png")):
            paths.append(f"{name}/{file.name}")
            labels.append(label)
    return ImageList(root, paths, np.array(labels), classes)


@pytest.fixture
def data(tmp_path, tiny_demo) -> Path:
    root = tmp_path / "shapes"
    shutil.copytree(tiny_demo, root, ignore=shutil.ignore_patterns("*.csv", "*.json"))
    return root


def full(embedder, root: Path, tmp_path: Path, name: str = "scratch.h5"):
    """A from-scratch gallery of the data set as it is now."""
    return read_gallery(embed_images(embedder, image_list(root), tmp_path / name, split="test"))


def update(embedder, root: Path, out: Path, **kwargs):
    return update_gallery(embedder, image_list(root), out, split="test", **kwargs)


def assert_same_gallery(updated, scratch):
    np.testing.assert_allclose(updated.embeddings, scratch.embeddings, rtol=0, atol=1e-6)
    assert updated.paths == scratch.paths and updated.classes == scratch.classes
    np.testing.assert_array_equal(updated.labels, scratch.labels)
    assert updated.identity == scratch.identity
    assert updated.extra == scratch.extra and updated.normalized == scratch.normalized
    np.testing.assert_array_equal(updated.dropped, scratch.dropped)
    np.testing.assert_array_equal(updated.files.sizes, scratch.files.sizes)
    np.testing.assert_array_equal(updated.files.mtimes, scratch.files.mtimes)


def draw(path: Path, colour: int, size: int = 32) -> None:
    Image.new("RGB", (size, size), (colour, 255 - colour, colour // 2)).save(path)


def test_add_and_remove_equal_a_full_embedding(model, data, tmp_path):
    embedder = Counting(make_embedder(model))
    out = tmp_path / "test.h5"
    before = read_gallery(embed_images(embedder, image_list(data), out, split="test"))
    (data / "circle" / "000.png").unlink()  # removed
    draw(data / "square" / "new.png", 40)  # added
    shutil.move(data / "triangle" / "001.png", data / "star" / "moved.png")  # another class
    embedder.files.clear()
    report = update(embedder, data, out)
    assert (report.added, report.removed, report.changed) == (2, 2, 0)
    assert report.unchanged == len(before) - 2 and report.written
    assert sorted(Path(p).name for p in embedder.files) == ["moved.png", "new.png"]
    updated, scratch = read_gallery(out), full(make_embedder(model), data, tmp_path)
    assert_same_gallery(updated, scratch)
    assert updated.gallery_id != before.gallery_id
    # Searches and evaluations equal those of the full embedding.
    queries = scratch.embeddings[::7]
    for a, b in zip(
        ExactIndex(updated.embeddings, True).search(queries, 10),
        ExactIndex(scratch.embeddings, True).search(queries, 10),
    ):
        np.testing.assert_allclose(a, b, atol=1e-6)
    metrics = [
        evaluate_leave_one_out(g.embeddings, g.labels, normalized=g.normalized).as_dict()
        for g in (updated, scratch)
    ]
    assert metrics[0] == pytest.approx(metrics[1], abs=1e-6)
    assert "2 added, 0 changed, 2 removed" in report.summary()


def test_a_changed_file_is_embedded_again(model, data, tmp_path):
    embedder = Counting(make_embedder(model))
    out = tmp_path / "test.h5"
    embed_images(embedder, image_list(data), out, split="test")
    changed = data / "circle" / "003.png"
    draw(changed, 200)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    embedder.files.clear()
    report = update(embedder, data, out)
    assert (report.added, report.changed, report.removed) == (0, 1, 0)
    assert [Path(p).name for p in embedder.files] == ["003.png"]
    assert_same_gallery(read_gallery(out), full(make_embedder(model), data, tmp_path))


def test_verify_catches_a_change_that_keeps_size_and_time(model, data, tmp_path):
    embedder = Counting(make_embedder(model))
    out = tmp_path / "test.h5"
    embed_images(embedder, image_list(data), out, split="test")
    # First --verify: the gallery records no hashes yet, so every item is embedded again once.
    report = update(embedder, data, out, verify=True)
    assert report.unknown == report.changed == len(image_list(data))
    assert read_gallery(out).files.sha256 is not None
    target = data / "star" / "002.png"
    stat, size = target.stat(), target.stat().st_size
    draw(target, 90)  # a plain image: a smaller PNG, padded back to the old size
    data_bytes = target.read_bytes()
    assert len(data_bytes) < size
    target.write_bytes(data_bytes + b"\0" * (size - len(data_bytes)))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert target.stat().st_size == size and target.stat().st_mtime_ns == stat.st_mtime_ns
    embedder.files.clear()
    assert update(embedder, data, out).written is False  # size and time alone miss it
    assert embedder.files == []
    report = update(embedder, data, out, verify=True)
    assert (report.changed, report.unknown) == (1, 0)
    assert [Path(p).name for p in embedder.files] == ["002.png"]
    assert_same_gallery(read_gallery(out), full(make_embedder(model), data, tmp_path))


def test_an_unchanged_update_embeds_nothing_and_keeps_the_file(model, data, tmp_path):
    embedder = Counting(make_embedder(model))
    out = tmp_path / "test.h5"
    before = read_gallery(embed_images(embedder, image_list(data), out, split="test"))
    embedder.files.clear()
    report = update(embedder, data, out)
    assert embedder.files == [] and not report.written
    assert report.unchanged == len(before) and report.summary().startswith("0 added, 0 changed")
    assert read_gallery(out).gallery_id == before.gallery_id


def test_a_gallery_without_file_stats_loads_and_is_embedded_again(model, data, tmp_path):
    embedder = Counting(make_embedder(model))
    scratch = full(embedder, data, tmp_path)
    out = tmp_path / "old.h5"  # as an older tfcbir wrote it: no file stats
    write_gallery(
        out,
        scratch.embeddings,
        scratch.labels,
        scratch.paths,
        scratch.classes,
        normalized=scratch.normalized,
        identity=scratch.identity,
        split="test",
        extra=scratch.extra,
    )
    old = read_gallery(out, expect=scratch.identity)
    assert old.files is None
    ExactIndex(old.embeddings, True).search(old.embeddings[:2], 3)
    embedder.files.clear()
    report = update(embedder, data, out)
    assert report.unknown == report.changed == len(scratch) and report.unchanged == 0
    assert_same_gallery(read_gallery(out), scratch)


def test_a_model_change_is_refused_in_one_line(model, data, tmp_path):
    out = tmp_path / "test.h5"
    embed_images(make_embedder(model), image_list(data), out, split="test")
    with pytest.raises(UserError) as error:
        update(make_embedder(model, "m1"), data, out, config_path="run.yaml")
    message = str(error.value)
    assert "\n" not in message and "another model checkpoint (model_id m0, expected m1)" in message
    assert message.endswith("re-embed it: python embed.py -c run.yaml --split test")
    with pytest.raises(UserError, match="no gallery there"):
        update(make_embedder(model), data, tmp_path / "missing.h5")


def test_a_crash_mid_update_leaves_the_old_gallery(model, data, tmp_path, monkeypatch):
    embedder = make_embedder(model)
    out = tmp_path / "test.h5"
    before = read_gallery(embed_images(embedder, image_list(data), out, split="test"))
    draw(data / "square" / "new.png", 40)
    create = h5py.Group.create_dataset

    def crash(self, name, *args, **kwargs):
        if name == "file_sizes":  # after the embeddings, before the file is complete
            raise RuntimeError("simulated crash")
        return create(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        update(embedder, data, out)
    monkeypatch.undo()
    after = read_gallery(out)
    assert after.gallery_id == before.gallery_id and len(after) == len(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes", "test.h5"]  # no leftovers
    assert update(embedder, data, out).added == 1


@pytest.mark.parametrize(
    ("factory", "in_place"),
    [("IVF4,Flat", True), ("IDMap2,Flat", True), ("HNSW8", False), ("Flat", False)],
)
def test_the_faiss_index_follows(model, data, tmp_path, factory, in_place):
    pytest.importorskip("faiss")
    from retrieval.faiss_index import FaissIndex, build_index, index_path, update_index

    embedder = make_embedder(model)
    out = tmp_path / "test.h5"
    build_index(read_gallery(embed_images(embedder, image_list(data), out, split="test")), factory)
    (data / "circle" / "000.png").unlink()
    (data / "cross" / "005.png").unlink()
    draw(data / "square" / "new.png", 40)
    draw(data / "star" / "new.png", 120)
    report = update(embedder, data, out)
    updated = read_gallery(out)
    path, line = update_index(updated, report, factory)
    assert path == index_path(out) and "\n" not in line
    assert ("updated in place" in line) == in_place and ("rebuilt" in line) != in_place
    exhaustive = "nprobe=4" if factory.startswith("IVF") else ""
    index = FaissIndex.load(path, updated, factory=factory, search_parameters=exhaustive)
    scratch = full(embedder, data, tmp_path)
    queries = scratch.embeddings[::5]
    found = index.search(queries, 8)
    expected = ExactIndex(scratch.embeddings, True).search(queries, 8)
    np.testing.assert_array_equal(found[1], expected[1])
    np.testing.assert_allclose(found[0], expected[0], atol=1e-5)
    assert "up to date" in update_index(updated, report, factory)[1]


def test_a_merged_gallery_keeps_the_file_stats_of_its_shards(model, data, tmp_path):
    from retrieval.shards import check_shards, embed_shard

    embedder = Counting(make_embedder(model))
    images, out = image_list(data), tmp_path / "test.h5"
    for index in range(3):
        embed_shard(embedder, images, out, (index, 3), split="test")
    checked = check_shards(
        out, images, split="test", expect=embedder.gallery_identity(images), command="embed"
    )
    merged = read_gallery(checked.merge())
    scratch = full(embedder, data, tmp_path)
    np.testing.assert_array_equal(merged.files.sizes, scratch.files.sizes)
    np.testing.assert_array_equal(merged.files.mtimes, scratch.files.mtimes)
    embedder.files.clear()
    assert update(embedder, data, out).changed == 0 and embedder.files == []


def test_a_relabelled_list_keeps_the_embeddings(model, data, tmp_path):
    embedder = Counting(make_embedder(model))
    out = tmp_path / "test.h5"
    images = image_list(data)
    embed_images(embedder, images, out, split="test")
    labels = images.labels.copy()
    labels[:3] = 1  # three circles listed as squares (a CSV list corrected), same files
    relabelled = ImageList(images.root, images.paths, labels, images.classes)
    embedder.files.clear()
    report = update_gallery(embedder, relabelled, out, split="test")
    assert embedder.files == [] and report.relabelled == 3 and report.written
    scratch = read_gallery(embed_images(embedder, relabelled, tmp_path / "s.h5", split="test"))
    assert_same_gallery(read_gallery(out), scratch)


def test_unreadable_images_are_left_out_as_a_full_embedding_does(model, data, tmp_path):
    embedder = Counting(make_embedder(model))
    out = tmp_path / "test.h5"
    (data / "cross" / "002.png").write_text("not an image")
    assert list(read_gallery(embed_images(embedder, image_list(data), out, split="test")).dropped)
    draw(data / "circle" / "new.png", 10)  # shifts the unreadable image's position
    embedder.files.clear()
    report = update(embedder, data, out)
    assert report.unreadable == 1 and report.added == 2  # the unreadable one is tried again
    assert sorted(Path(p).name for p in embedder.files) == ["002.png", "new.png"]
    assert_same_gallery(read_gallery(out), full(make_embedder(model), data, tmp_path))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_demo):
    """A data_dir with the tiny demo set and a briefly trained, embedded run (made once)."""
    import config
    from embed import main as embed
    from training.trainer import train

    root = tmp_path_factory.mktemp("update") / "data"
    shutil.copytree(tiny_demo, root / "datasets" / "shapes")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFCBIR_DATA_DIR", str(root))
        path = write_config(root, "update", tiny_config(train__steps=10, train__validate_every=5))
        train(config.load(path))
        assert embed(["-c", str(path)]) == 0
    return root


def test_an_updated_run_evaluates_as_a_full_embedding(trained_run, tmp_path, monkeypatch):
    import config
    from embed import main as embed
    from retrieval import sets
    from retrieval.embedder import load_embedder
    from retrieval.evaluate import evaluate_run
    from runs.folder import RunFolder

    root = tmp_path / "data"
    shutil.copytree(trained_run, root)
    monkeypatch.setenv("TFCBIR_DATA_DIR", str(root))
    cfg = config.load(root / "update.json")
    shapes = root / "datasets" / "shapes"
    (shapes / "star" / "004.png").unlink()
    draw(shapes / "circle" / "100.png", 30)
    embedder, made = load_embedder(cfg), sets.splits(cfg)
    protocol = sets.protocol(cfg, made)
    galleries = [RunFolder.of(cfg).gallery(name) for name in (protocol.gallery, protocol.queries)]
    for out in dict.fromkeys(galleries):
        update_gallery(embedder, sets.images(cfg, out.stem, made), out, split=out.stem)
    updated = evaluate_run(cfg, queries=0, r=5)
    ids = [read_gallery(out).gallery_id for out in galleries]
    assert embed(["-c", str(root / "update.json")]) == 0
    assert [read_gallery(out).gallery_id for out in galleries] == ids  # kept: up to date
    for out in dict.fromkeys(galleries):
        out.unlink()
    assert embed(["-c", str(root / "update.json")]) == 0  # from scratch
    scratch = evaluate_run(cfg, queries=0, r=5)
    metrics = [key for key in scratch if isinstance(scratch[key], float)]
    assert metrics and {k: updated[k] for k in metrics} == pytest.approx(
        {k: scratch[k] for k in metrics}, abs=1e-6
    )
    assert updated["gallery_size"] == scratch["gallery_size"]


def test_embed_update_on_the_command_line(trained_run, tmp_path, monkeypatch, capsys):
    """embed.py --update: one line per set saying what changed, the same evaluation as a full
    embedding; --verify without --update and --update with shards are refused in one line."""
    import config
    from embed import main as embed
    from retrieval.evaluate import evaluate_run
    from tfcbir.cli import run

    root = tmp_path / "data"
    shutil.copytree(trained_run, root)
    monkeypatch.setenv("TFCBIR_DATA_DIR", str(root))
    path = str(root / "update.json")
    shapes = root / "datasets" / "shapes"
    (shapes / "star" / "004.png").unlink()
    draw(shapes / "circle" / "100.png", 30)
    capsys.readouterr()
    assert embed(["-c", path, "--update"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("updated ")]
    assert len(lines) == 2 and all("unchanged" in line for line in lines)
    updated = evaluate_run(config.load(path), queries=0, r=5)
    for out in (root / "trainings" / "update" / "embeddings").glob("*.h5"):
        out.unlink()
    assert embed(["-c", path]) == 0
    scratch = evaluate_run(config.load(path), queries=0, r=5)
    assert updated["mAP@5"] == pytest.approx(scratch["mAP@5"], abs=1e-6)
    assert updated["gallery_size"] == scratch["gallery_size"]
    capsys.readouterr()
    for argv, message in [
        (["--verify"], "--verify checks the files' contents during an update; give --update too"),
        (["--update", "--shard", "0/2"], "--update brings whole galleries up to date"),
    ]:
        with pytest.raises(SystemExit) as done:
            run(embed, ["-c", path, *argv])
        assert done.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
