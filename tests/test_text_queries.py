"""Text queries end to end on a tiny trained dual encoder: embed.py records the towers, cbir.py
--text (table, JSON, pictures, mixed with images), test.py --text, evaluation.py --text-queries;
one-line errors for a model without a text tower and for galleries of another model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

import config
from retrieval.gallery import read_gallery
from retrieval.text_queries import chance_recall, slug
from retrieval.visualize import text_tile
from tests.conftest import REPO, tiny_config, write_config
from tests.test_training_dual import dual_config
from training.trainer import train


def cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def dual_run(tmp_path_factory, tiny_demo):
    """A dual encoder trained 12 steps on the tiny demo set, embedded; its config file."""
    root = tmp_path_factory.mktemp("text") / "data"
    shutil.copytree(tiny_demo, root / "datasets" / "shapes")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFCBIR_DATA_DIR", str(root))
        raw = dual_config(train__steps=12, train__validate_every=6, train__checkpoint_every=6)
        path = write_config(root, "dual", raw)
        train(config.load(path))
        done = cli("embed.py", "-c", path)
        assert done.returncode == 0, done.stderr
        yield path


def test_galleries_record_the_towers(dual_run):
    gallery = read_gallery(dual_run.parent / "trainings" / "dual" / "embeddings" / "train.h5")
    assert gallery.extra == {"image_tower": "small_cnn", "text_tower": "scratch"}
    assert gallery.normalized


def test_cbir_answers_text_queries(dual_run, tmp_path):
    done = cli(
        "cbir.py",
        "-c",
        dual_run,
        "-r",
        "3",
        "--text",
        "a small red triangle",
        "--text",
        "a blue hat",
        "--save",
        tmp_path / "q.png",
    )
    assert done.returncode == 0, done.stderr
    assert "query text 'a small red triangle'" in done.stdout
    assert done.stdout.count("\n   1 ") == 2 and done.stdout.count("\n   3 ") == 2
    assert "'hat' is not in the text tower's vocabulary" in done.stderr
    pictures = sorted(p.name for p in tmp_path.iterdir())
    assert pictures == ["q_text1-a-small-red-triangle.png", "q_text2-a-blue-hat.png"]

    image = dual_run.parent / "datasets" / "shapes" / "circle" / "000.png"
    done = cli("cbir.py", "-c", dual_run, "-r", "2", "--json", "--text", "a red circle", image)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert set(answer) == {"gallery", "r", "results", "unreadable"} and answer["r"] == 2
    picture, text = answer["results"]
    assert set(picture) == {"query", "class", "answers"} and picture["class"] == "circle"
    assert set(text) == {"query", "class", "answers", "query_text", "unknown_words"}
    assert text["query"] == text["query_text"] == "a red circle" and text["class"] is None
    assert text["unknown_words"] == []
    assert [a["rank"] for a in text["answers"]] == [1, 2]
    scores = [a["score"] for a in text["answers"]]
    assert scores[0] >= scores[1] and all(-1 <= s <= 1 for s in scores)
    assert all(a["match"] is None for a in text["answers"])


def test_test_and_evaluation_text_queries(dual_run):
    done = cli("test.py", "-c", dual_run, "-r", "3", "--text", "--seed", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("text of ") and "picture: " in done.stdout
    assert "match" in done.stdout and (" yes " in done.stdout or " no " in done.stdout)

    done = cli("evaluation.py", "-c", dual_run, "--text-queries", "-r", "5", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["set"] == "test" and result["gallery_size"] == 24
    prompts = result["prompts"]
    assert prompts["queries"] == 6 and prompts["templates"] == ["a photo of a {class}."]
    assert set(prompts["unknown_words"]) == {"photo", "of", "."}
    # 6 classes of 4 test images each: a random ranking puts one in the top 1 with p = 4/24.
    assert prompts["chance"]["recall@1"] == pytest.approx(4 / 24)
    assert all(0 <= prompts[k] <= 1 for k in ("mAP@5", "recall@1", "recall@5", "recall@10"))
    captions = result["captions"]
    assert (captions["images"], captions["captions"]) == (24, 48)
    assert captions["text_to_image"]["chance"]["recall@1"] == pytest.approx(1 / 24)
    assert captions["image_to_text"]["chance"]["recall@1"] == pytest.approx(2 / 48)
    assert (dual_run.parent / "trainings" / "dual" / "evaluation" / "text-test-r5.json").is_file()


def test_a_model_without_a_text_tower_refuses_text_queries(data_dir, tmp_path):
    path = write_config(tmp_path, "images_only", tiny_config(train__steps=2))
    train(config.load(path))
    assert cli("embed.py", "-c", path).returncode == 0
    for command in (
        ["cbir.py", "-c", path, "--text", "a red circle"],
        ["test.py", "-c", path, "--text"],
        ["evaluation.py", "-c", path, "--text-queries"],
    ):
        done = cli(*command)
        assert done.returncode == 2, command
        assert done.stderr.startswith("error: run images_only searches by image only")
        assert done.stderr.count("\n") == 1


def test_galleries_of_other_towers_or_weights_are_refused(dual_run, tmp_path):
    gallery = dual_run.parent / "trainings" / "dual" / "embeddings" / "train.h5"
    backup = tmp_path / "train.h5"
    shutil.copy(gallery, backup)
    try:
        # The recorded tower names are information only (a moved preset folder keeps its
        # galleries); the model hash, which covers both towers, is what refuses another model.
        with h5py.File(gallery, "r+") as f:
            f.attrs["extra"] = json.dumps({"image_tower": "small_cnn", "text_tower": "hub:x"})
        done = cli("cbir.py", "-c", dual_run, "--text", "a red circle")
        assert done.returncode == 0, done.stderr
        with h5py.File(gallery, "r+") as f:  # as if another text tower had embedded it
            f.attrs["config_hash"] = "0" * 16
        done = cli("cbir.py", "-c", dual_run, "--text", "a red circle")
        assert done.returncode == 2 and done.stderr.count("\n") == 1
        assert "was embedded with another config" in done.stderr
        assert "python embed.py -c" in done.stderr
        shutil.copy(backup, gallery)
        text_weights = dual_run.parent / "trainings" / "dual" / "best.text.weights.h5"
        saved = text_weights.read_bytes()
        text_weights.write_bytes(saved + b"\0")  # other text weights: another model
        done = cli("cbir.py", "-c", dual_run, "--text", "a red circle")
        assert done.returncode == 2 and "was embedded with another model checkpoint" in done.stderr
        text_weights.write_bytes(saved)
        done = cli("cbir.py", "-c", dual_run, "--text", "  ")
        assert done.returncode == 2 and done.stderr.startswith("error: --text: an empty query")
    finally:
        shutil.copy(backup, gallery)


def test_image_queries_leave_the_text_tower_unloaded(dual_run, monkeypatch, capsys):
    import importlib.util

    from retrieval import embedder
    from retrieval.searcher import Searcher
    from tfcbir import UserError
    from tfcbir.cli import run

    cfg = config.load(dual_run)
    image_only = Searcher.open(cfg, text=False)
    assert not image_only.has_text
    with pytest.raises(UserError) as refused:  # the model has one: the message does not deny it
        image_only.search_text(["a red circle"], 3)
    assert "opened without the text tower of run dual" in str(refused.value)
    assert "has no text tower" not in str(refused.value)

    def no_text_tower_wanted(*_args, **_kwargs):
        raise AssertionError("test.py's image query built the text tower")

    monkeypatch.setattr(embedder, "load_text_encoder", no_text_tower_wanted)
    spec = importlib.util.spec_from_file_location("cli_test", REPO / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as done:
        run(module.main, ["-c", str(dual_run), "-r", "3"])
    out, err = capsys.readouterr()
    assert done.value.code == 0, err
    assert "picture: " in out


def test_chance_slug_and_text_tile():
    assert chance_recall(4, np.array([1]), 1) == pytest.approx(0.25)
    assert chance_recall(4, np.array([1]), 2) == pytest.approx(0.5)
    assert chance_recall(4, np.array([2]), 2) == pytest.approx(1 - 1 / 6)
    assert chance_recall(4, np.array([1, 2]), 1) == pytest.approx((0.25 + 0.5) / 2)
    assert chance_recall(3, np.array([1]), 10) == pytest.approx(1.0)
    assert slug("A red bag!  (big)") == "a-red-bag-big" and slug("!!!") == "text"
    tile = text_tile("a small red triangle", side=128)
    assert tile.shape == (128, 128, 3) and tile.dtype == np.uint8
    assert (tile < 100).any() and tile[0, 0].tolist() == [235, 235, 235]  # dark words, light mount


def test_text_queries_with_a_training_checkpoint(dual_run):
    """A checkpoint holds both towers: galleries embedded with it answer text queries with it,
    and are refused to the run's best weights."""
    run = dual_run.parent / "trainings" / "dual"
    ckpt = sorted((run / "checkpoints").glob("ckpt-*.h5"))[0]
    try:
        done = cli("embed.py", "-c", dual_run, "--checkpoint", ckpt, "--split", "train")
        assert done.returncode == 0, done.stderr
        done = cli("cbir.py", "-c", dual_run, "--checkpoint", ckpt, "--json", "--text", "a ring")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["results"][0]["query_text"] == "a ring"
        done = cli("cbir.py", "-c", dual_run, "--text", "a ring")
        assert done.returncode == 2 and "was embedded with another model checkpoint" in done.stderr
    finally:
        assert cli("embed.py", "-c", dual_run, "--split", "train").returncode == 0
