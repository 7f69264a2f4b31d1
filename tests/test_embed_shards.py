"""embed.py --shard i/n and --merge (retrieval.shards) on the tiny demo set."""

from __future__ import annotations

import importlib.util
import shutil

import h5py
import numpy as np
import pytest

import config
from retrieval import sets
from retrieval.gallery import read_gallery
from retrieval.shards import parse_shard, shard_path, shard_range
from tests.conftest import tiny_config, write_config
from tests.helpers_images import write_text
from tests.test_retrieval_cli import call
from tfcbir import UserError
from training.trainer import train


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory, tiny_demo):
    """A data_dir with the tiny demo set and a briefly trained run (made once)."""
    root = tmp_path_factory.mktemp("shards") / "data"
    shutil.copytree(tiny_demo, root / "datasets" / "shapes")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFCBIR_DATA_DIR", str(root))
        raw = tiny_config(train__steps=10, train__validate_every=5)
        train(config.load(write_config(root, "shards", raw)))
    return root


@pytest.fixture
def run(trained_root, tmp_path, monkeypatch):
    """A private copy of the trained data_dir: (config path, embeddings folder)."""
    root = tmp_path / "data"
    shutil.copytree(trained_root, root)
    monkeypatch.setenv("TFCBIR_DATA_DIR", str(root))
    return root / "shards.json", root / "trainings" / "shards" / "embeddings"


def embed(cfg, *argv, capsys) -> str:
    code, out, err = call("embed", "-c", cfg, *argv, capsys=capsys)
    assert code == 0, err
    return out


def refused(cfg, *argv, capsys) -> str:
    """The one-line error of an embed.py call that must fail with exit code 2."""
    code, out, err = call("embed", "-c", cfg, *argv, capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_shard_ranges_partition_any_set():
    for total in (0, 1, 7, 24, 1001):
        for count in (1, 2, 3, 5, 8):
            ranges = [shard_range(total, i, count) for i in range(count)]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, disjoint
            sizes = [stop - start for start, stop in ranges]
            assert max(sizes) - min(sizes) <= 1
    assert parse_shard("2/5") == (2, 5) and parse_shard(" 0 / 1 ") == (0, 1)


@pytest.mark.parametrize("text", ["3/3", "1", "a/b", "-1/2", "1/0", "0/-1", "1/2/3", ""])
def test_bad_shard_syntax_is_one_line(text, tmp_path, capsys):
    with pytest.raises(UserError) as error:
        parse_shard(text)
    assert "--shard" in str(error.value) and "\n" not in str(error.value)
    # Refused before the config is even read (no model is loaded for nothing).
    line = refused(tmp_path / "missing.json", f"--shard={text}", capsys=capsys)
    assert f"--shard {text}:" in line and "i/n" in line


def test_merged_shards_equal_a_whole_embed(run, tmp_path, capsys):
    cfg, embeddings = run
    # One unreadable image (in shard 1's range of the test set): left out, and accounted for.
    images = sets.images(config.load(cfg), "test")
    broken = images.root / images.paths[6]
    write_text(broken)
    whole = tmp_path / "whole.h5"
    embed(cfg, "--split", "test", "-o", whole, "--batch-size", "8", capsys=capsys)

    count = 5
    for index in range(count):
        out = embed(cfg, "--split", "test", "--shard", f"{index}/{count}", capsys=capsys)
        assert out.strip() == str(shard_path(embeddings / "test.h5", index, count))
    shards = [read_gallery(shard_path(embeddings / "test.h5", i, count)) for i in range(count)]
    records = [s.extra["shard"] for s in shards]
    assert [(r["start"], r["stop"]) for r in records] == [
        (0, 4),
        (4, 9),
        (9, 14),
        (14, 19),
        (19, 24),
    ]
    assert [r["total"] for r in records] == [24] * count
    assert [len(s) for s in shards] == [4, 4, 5, 5, 5] and list(shards[1].dropped) == [2]
    assert [p for s in shards for p in s.paths] == [p for p in images.paths if p != images.paths[6]]

    code, out, err = call("embed", "-c", cfg, "--split", "test", "--merge", capsys=capsys)
    assert code == 0, err
    assert out.strip() == str(embeddings / "test.h5")
    assert "the shards are kept" in err and "1 unreadable left out" in err
    merged, reference = read_gallery(embeddings / "test.h5"), read_gallery(whole)
    np.testing.assert_allclose(merged.embeddings, reference.embeddings, atol=1e-6, rtol=0)
    assert merged.paths == reference.paths and len(merged) == 23
    np.testing.assert_array_equal(merged.labels, reference.labels)
    assert merged.classes == reference.classes
    assert list(merged.dropped) == list(reference.dropped) == [6]
    assert (merged.model_id, merged.model_step, merged.config_hash) == (
        reference.model_id,
        reference.model_step,
        reference.config_hash,
    )
    assert all(shard.path.exists() for shard in shards)  # never deleted


def test_an_interrupted_shard_resumes(run, capsys, monkeypatch):
    from retrieval import embedder as module

    cfg, embeddings = run
    original = module.Embedder.embed_files
    seen = []

    def dies_after_one_batch(self, paths, **kwargs):
        seen.append(len(paths))
        for number, batch in enumerate(original(self, paths, **kwargs)):
            if number == 1:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(module.Embedder, "embed_files", dies_after_one_batch)
    argv = ["-c", cfg, "--split", "train", "--shard", "1/2", "--batch-size", "8"]
    code, out, err = call("embed", *argv, capsys=capsys)
    assert code == 130 and not (embeddings / "train.shard-1-of-2.h5").exists()
    embed(cfg, "--split", "train", "--shard", "0/2", capsys=capsys)  # one batch: finishes
    line = refused(cfg, "--split", "train", "--merge", capsys=capsys)
    assert "shard 1/2 of the train set is missing" in line and "this resumes it" in line

    def counts(self, paths, **kwargs):
        seen.append(len(paths))
        return original(self, paths, **kwargs)

    monkeypatch.setattr(module.Embedder, "embed_files", counts)
    for index in (0, 1):
        embed(cfg, "--split", "train", "--shard", f"{index}/2", capsys=capsys)
    assert seen == [36, 36, 36 - 8]  # shard 0 kept as it is, shard 1 resumed where it stopped
    embed(cfg, "--split", "train", "--merge", capsys=capsys)
    assert len(read_gallery(embeddings / "train.h5")) == 72


def test_default_sets_shard_merge_and_a_finished_shard_is_kept(run, capsys):
    cfg, embeddings = run
    embed(cfg, "--shard", "0/2", capsys=capsys)
    first = read_gallery(embeddings / "train.shard-0-of-2.h5").gallery_id
    embed(cfg, "--shard", "0/2", capsys=capsys)  # up to date: kept, not embedded again
    assert read_gallery(embeddings / "train.shard-0-of-2.h5").gallery_id == first
    embed(cfg, "--shard", "1/2", capsys=capsys)
    faiss = importlib.util.find_spec("faiss") is not None  # optional: then index as embed.py does
    out = embed(cfg, "--merge", *(["--index", "Flat"] if faiss else []), capsys=capsys)
    assert [line.split("/")[-1] for line in out.split()] == ["train.h5", "test.h5"]
    assert (embeddings / "train.faiss").exists() == (embeddings / "test.faiss").exists() == faiss
    assert len(read_gallery(embeddings / "train.h5")) == 72
    assert len(read_gallery(embeddings / "test.h5")) == 24
    code, out, err = call("evaluation", "-c", cfg, "-t", "0", "-r", "2", "--json", capsys=capsys)
    assert code == 0, err


def _shards(cfg, count, indices, capsys):
    for index in indices:
        embed(cfg, "--split", "test", "--shard", f"{index}/{count}", capsys=capsys)


def test_missing_and_overlapping_shards_are_refused(run, capsys):
    cfg, embeddings = run
    line = refused(cfg, "--split", "test", "--merge", capsys=capsys)
    assert "no shards of the test set" in line and "--shard i/n" in line

    _shards(cfg, 3, [0, 2], capsys)
    line = refused(cfg, "--split", "test", "--merge", capsys=capsys)
    assert "shard 1/3 of the test set is missing" in line and "--shard 1/3" in line
    assert not (embeddings / "test.h5").exists()

    _shards(cfg, 3, [1], capsys)
    _shards(cfg, 2, [0], capsys)  # part 0 of 2 overlaps parts 0 and 1 of 3
    line = refused(cfg, "--split", "test", "--merge", capsys=capsys)
    assert "test.shard-0-of-2.h5 is one of 2 parts" in line and "overlap" in line
    assert not (embeddings / "test.h5").exists()

    (embeddings / "test.shard-0-of-2.h5").unlink()
    embed(cfg, "--split", "test", "--merge", capsys=capsys)
    assert len(read_gallery(embeddings / "test.h5")) == 24

    line = refused(cfg, "--split", "test", "--merge", "--shard", "0/3", capsys=capsys)
    assert "give one of them" in line


@pytest.mark.parametrize(
    ("attribute", "value", "message"),
    [
        ("model_id", "0123456789abcdef", "another model checkpoint"),
        ("config_hash", "0123456789abcdef", "another config"),
        ("model_step", 12345, "another model than the other shards"),
    ],
)
def test_a_shard_of_another_model_is_refused(run, capsys, attribute, value, message):
    cfg, embeddings = run
    _shards(cfg, 3, range(3), capsys)
    embed(cfg, "--split", "test", "--merge", capsys=capsys)
    before = read_gallery(embeddings / "test.h5").gallery_id
    with h5py.File(embeddings / "test.shard-1-of-3.h5", "r+") as f:
        f.attrs[attribute] = value
    line = refused(cfg, "--split", "test", "--merge", capsys=capsys)
    assert "shard 1/3" in line and message in line and "--shard 1/3" in line
    assert read_gallery(embeddings / "test.h5").gallery_id == before  # left as it was


def test_a_shard_of_other_items_is_refused(run, capsys):
    cfg, embeddings = run
    _shards(cfg, 2, range(2), capsys)
    with h5py.File(embeddings / "test.shard-1-of-2.h5", "r+") as f:
        f["paths"][...] = f["paths"][...][::-1]
    line = refused(cfg, "--split", "test", "--merge", capsys=capsys)
    assert "shard 1/2" in line and "not images 12 to 23" in line and "--shard 1/2" in line

    _shards(cfg, 2, [1], capsys)  # the damaged shard is embedded again
    embed(cfg, "--split", "test", "--merge", capsys=capsys)
    # The data set changes (an image is added): the shards no longer match the set.
    test = read_gallery(embeddings / "test.h5")
    source = cfg.parent / "datasets" / "shapes" / test.paths[0]
    shutil.copy(source, source.with_name("extra.png"))
    line = refused(cfg, "--split", "test", "--merge", capsys=capsys)
    assert "another list of test images" in line and "--shard 0/2" in line
