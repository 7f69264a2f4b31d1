"""Zero-shot text and image search with a pretrained CLIP preset, no training: a tiny CLIP saved
locally (random weights, never downloaded) answers exactly as keras-hub's own CLIPBackbone
embeds; training the same config afterwards makes the zero-shot galleries stale."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import config
from datasets.pipeline import iter_eval_batches
from retrieval.gallery import read_gallery
from retrieval.search import unit_rows
from tests.conftest import REPO, write_config

keras_hub = pytest.importorskip("keras_hub")


def cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def zero_shot(tmp_path_factory, tiny_demo):
    """A data_dir with the tiny demo set and a zero-shot config over a tiny CLIP preset."""
    from tests.helpers_text_presets import tiny_clip_preset

    root = tmp_path_factory.mktemp("zero_shot") / "data"
    shutil.copytree(tiny_demo, root / "datasets" / "shapes")
    preset = tiny_clip_preset(root / "presets" / "tiny_clip")
    raw = {
        "data": {
            "root": "datasets/shapes",
            "split": {"by": "images", "test_fraction": 0.25},
            "image_size": [32, 32],
            "resize": None,
            "captions": {"templates": ["a {class}"]},
        },
        "model": {
            "backbone": f"hub:{preset}",
            "weights": "pretrained",
            "head": "identity_normalize",
            "text": {"tower": f"hub:{preset}"},
        },
        "loss": {"name": "clip"},
        "train": {"batch": {"P": 4, "K": 2}, "steps": 2, "validate_every": 0},
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFCBIR_DATA_DIR", str(root))
        yield write_config(root, "zero_shot", raw), preset


def preset_embeddings(preset, paths, texts):
    """keras-hub's own CLIP image and text embeddings, normalised: the reference."""
    backbone = keras_hub.models.CLIPBackbone.from_preset(str(preset))
    converter = keras_hub.layers.ImageConverter.from_preset(str(preset))
    pixels = np.concatenate(
        [b for _, b in iter_eval_batches(paths, image_size=(32, 32), resize=None, batch_size=64)]
    ).astype("float32")
    scaled = pixels * np.asarray(converter.scale, "float32") + np.asarray(
        converter.offset, "float32"
    )
    images = unit_rows(np.asarray(backbone.get_vision_embeddings(scaled)))
    tokenizer = keras_hub.models.CLIPPreprocessor.from_preset(str(preset), image_converter=None)
    ids = tokenizer({"prompts": texts, "images": None}, sequence_length=12)["token_ids"]
    return images, unit_rows(np.asarray(backbone.get_text_embeddings(ids)))


def test_a_pretrained_preset_searches_without_training(zero_shot):
    path, preset = zero_shot
    resolved = config.load(path)
    run = config.run_dir(resolved)
    done = cli("embed.py", "-c", path)
    assert done.returncode == 0, done.stderr
    assert "has no trained model: using hub:" in done.stderr and "(zero-shot)" in done.stderr
    assert not (run / "best.weights.h5").exists()
    gallery = read_gallery(run / "embeddings" / "train.h5")
    assert gallery.model_id.startswith("pretrained-") and gallery.model_step == 0
    assert gallery.extra == {"image_tower": f"hub:{preset}", "text_tower": f"hub:{preset}"}

    texts = ["a red circle", "a blue square"]
    images, text_reference = preset_embeddings(
        preset, [str(config.data_root(resolved) / p) for p in gallery.paths], texts
    )
    np.testing.assert_allclose(gallery.embeddings, images, rtol=1e-4, atol=1e-5)

    done = cli(
        "cbir.py", "-c", path, "-r", "5", "--json", *[a for t in texts for a in ("--text", t)]
    )
    assert done.returncode == 0, done.stderr
    for result, reference in zip(json.loads(done.stdout)["results"], text_reference):
        expected = gallery.embeddings @ reference
        order = np.argsort(-expected, kind="stable")[:5]
        assert [a["path"] for a in result["answers"]] == [gallery.paths[i] for i in order]
        np.testing.assert_allclose(
            [a["score"] for a in result["answers"]], expected[order], rtol=1e-4, atol=1e-5
        )

    for command in (["--text-queries", "-r", "5"], ["-t", "0", "-r", "5"]):
        done = cli("evaluation.py", "-c", path, "--json", *command)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["model_step"] == 0


def test_a_moved_preset_folder_keeps_its_galleries(zero_shot, tmp_path):
    path, preset = zero_shot
    raw = json.loads(path.read_text())
    before = shutil.copytree(preset, tmp_path / "before")
    raw["model"]["backbone"] = raw["model"]["text"]["tower"] = f"hub:{before}"
    moved_run = write_config(path.parent, "moved_preset", raw)
    done = cli("embed.py", "-c", moved_run, "--split", "test")
    assert done.returncode == 0, done.stderr
    gallery = config.run_dir(config.load(moved_run)) / "embeddings" / "test.h5"
    made = gallery.stat().st_mtime_ns
    # The same preset in another folder: the same model, so the same galleries.
    after = before.rename(tmp_path / "after")
    raw["model"]["backbone"] = raw["model"]["text"]["tower"] = f"hub:{after}"
    moved_run.write_text(json.dumps(raw))
    done = cli(
        "cbir.py",
        "-c",
        moved_run,
        "--gallery",
        "test",
        "--text",
        "a red circle",
        "-r",
        "3",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["results"][0]["answers"]) == 3
    done = cli("embed.py", "-c", moved_run, "--split", "test")
    assert done.returncode == 0, done.stderr
    assert "out of date" not in done.stderr and gallery.stat().st_mtime_ns == made


def test_training_makes_the_zero_shot_galleries_stale(zero_shot):
    path, _ = zero_shot
    assert cli("embed.py", "-c", path).returncode == 0
    done = cli("train.py", "-c", path)
    assert done.returncode == 0, done.stderr
    done = cli("cbir.py", "-c", path, "--text", "a red circle")
    assert done.returncode == 2 and "was embedded with another model checkpoint" in done.stderr
    assert cli("embed.py", "-c", path).returncode == 0
    done = cli("cbir.py", "-c", path, "--text", "a red circle")
    assert done.returncode == 0, done.stderr


def test_only_a_complete_pretrained_model_is_searched_untrained(zero_shot, tmp_path):
    import nets

    path, preset = zero_shot
    model = config.load(path)["model"]
    assert nets.pretrained_model(model)
    assert not nets.pretrained_model({**model, "head": "direct_normalize"})  # a new head
    assert not nets.pretrained_model({**model, "weights": "none"})
    other = {**model, "text": {**model["text"], "tower": "scratch"}}
    assert not nets.pretrained_model(other)
    copy = shutil.copytree(preset, tmp_path / "copy")  # the same preset in another folder
    assert nets.pretrained_model({**model, "text": {**model["text"], "tower": f"hub:{copy}"}})
    raw = json.loads(path.read_text())
    raw["model"]["head"] = "projection_normalize"
    raw["model"]["embedding_dim"] = 8
    untrained = write_config(tmp_path, "needs_training", raw)
    done = cli("cbir.py", "-c", untrained, "--text", "a red circle")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "has no trained model yet" in done.stderr and "zero-shot" in done.stderr
