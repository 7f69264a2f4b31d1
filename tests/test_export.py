"""export.py: a SavedModel (encoded images -> embeddings) and TFLite image tower that reproduce
embed.py's vectors without tfcbir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_config, write_config

# The package roots of tfcbir (pyproject.toml's import-linter root_packages): none may be loaded
# in the process that uses the exported model.
TFCBIR_PACKAGES = (
    "report", "serving", "training", "retrieval", "runs", "config", "datasets", "nets", "losses",
    "tfcbir",
)  # fmt: skip

# Loads the SavedModel, embeds the image files listed in argv[2] (one path a line), writes the
# vectors to argv[3] and the signature's specs to argv[4]; fails if any tfcbir module is loaded.
LOADER = """
import json, sys
import numpy as np
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
paths = open(sys.argv[2]).read().split("\\n")
serve = model.signatures["serving_default"]
images = tf.constant([open(p, "rb").read() for p in paths])
np.save(sys.argv[3], serve(images=images)["embeddings"].numpy())
specs = {
    "inputs": {k: [v.dtype.name, v.shape.as_list()] for k, v in serve.structured_input_signature[1].items()},
    "outputs": {k: [v.dtype.name, v.shape.as_list()] for k, v in serve.structured_outputs.items()},
    "signatures": sorted(model.signatures),
}
json.dump(specs, open(sys.argv[4], "w"))
roots = %r
loaded = sorted(m for m in sys.modules if m.split(".")[0] in roots)
assert not loaded, loaded
"""


def _export(path: Path, root: Path, *args: str) -> Path:
    from export import main

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFCBIR_DATA_DIR", str(root))
        assert main(["-c", str(path), *args]) == 0


@pytest.fixture(scope="module")
def exported(searchable_run, tmp_path_factory):
    """The run exported as a SavedModel: ``(export folder, config path, data_dir)``."""
    path, root = searchable_run
    out = tmp_path_factory.mktemp("export") / "model"
    _export(path, root, "-o", str(out))
    return out, path, root


def _gallery(path: Path, root: Path):
    import config
    from retrieval.gallery import read_gallery
    from runs.folder import RunFolder

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFCBIR_DATA_DIR", str(root))
        cfg = config.load(path)
        run = RunFolder.of(cfg)
        gallery = read_gallery(sorted(run.embeddings.glob("test.h5"))[0])
    return gallery, cfg


def test_saved_model_reproduces_embed_py_without_tfcbir(exported, tmp_path):
    out, path, root = exported
    gallery, _ = _gallery(path, root)
    files = [str(Path(gallery.data_root) / p) for p in gallery.paths]
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join(files))
    script = tmp_path / "load.py"
    script.write_text(LOADER % (TFCBIR_PACKAGES,))
    vectors, specs = tmp_path / "vectors.npy", tmp_path / "specs.json"
    done = subprocess.run(
        [sys.executable, str(script), str(out / "saved_model"), str(listing), str(vectors),
         str(specs)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    exported_rows = np.load(vectors)
    difference = float(np.max(np.abs(exported_rows - gallery.embeddings)))
    cosine = float(np.min(np.sum(exported_rows * gallery.embeddings, axis=1)))
    print(
        f"SavedModel vs embed.py on {len(files)} images: max abs difference {difference:.2e}, "
        f"lowest cosine {cosine:.6f}"
    )
    # TF's resize cannot match PIL's bit for bit (a pixel may be one level off): small, not 0.
    assert difference < 0.05
    assert cosine > 0.999
    assert np.allclose(np.linalg.norm(exported_rows, axis=1), 1.0, atol=1e-5)
    signature = json.loads(specs.read_text())
    assert signature["inputs"] == {"images": ["string", [None]]}
    assert signature["outputs"] == {"embeddings": ["float32", [None, gallery.embeddings.shape[1]]]}
    assert signature["signatures"] == ["embed_images", "serving_default"]


def test_export_json(exported):
    out, _, _ = exported
    info = json.loads((out / "export.json").read_text())
    assert info["image_size"] == [32, 32] and info["resize"] == [36, 36]
    assert info["dim"] == 16 and info["normalized"] is True
    assert info["signatures"] == ["serving_default", "embed_images"]
    assert len(info["model_id"]) > 0
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temp folder left


def test_tflite_float_matches_and_quantised_cosine(searchable_run, tmp_path, capsys):
    from datasets.images import load_and_fit
    from retrieval.export import TFLITE_FLOAT, run_tflite

    path, root = searchable_run
    out = tmp_path / "lite"
    _export(path, root, "--format", "tflite", "-o", str(out))
    cosine = _printed_cosine(capsys.readouterr().err)
    assert cosine > 0.95
    gallery, cfg = _gallery(path, root)
    pixels = np.asarray(
        [load_and_fit(Path(gallery.data_root) / p, (32, 32), (36, 36)) for p in gallery.paths[:8]],
        np.float32,
    )
    rows = run_tflite(out / TFLITE_FLOAT, pixels)
    difference = float(np.max(np.abs(rows - gallery.embeddings[:8])))
    print(f"max abs difference, TFLite float32 vs embed.py: {difference:.2e}; quantised cosine "
          f"{cosine:.6f}")  # fmt: skip
    assert difference < 1e-4


def _printed_cosine(err: str) -> float:
    import re

    found = re.search(r"mean embedding cosine ([0-9.]+)", err)
    assert found, err
    return float(found.group(1))


def test_default_folder_is_the_runs_export(searchable_run, tmp_path):
    import shutil

    import config
    from runs.folder import RunFolder

    path, root = searchable_run
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    copied_config = copy / Path(path).relative_to(root)
    _export(copied_config, copy)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFCBIR_DATA_DIR", str(copy))
        run = RunFolder.of(config.load(copied_config))
    assert (run.export / "saved_model" / "saved_model.pb").is_file()
    assert (run.export / "export.json").is_file()
    _export(copied_config, copy)  # an earlier export is replaced
    assert (run.export / "saved_model" / "saved_model.pb").is_file()
    assert sorted(p.name for p in run.path.iterdir() if p.name.startswith(".")) == []


def test_untrained_run_gets_embed_py_message(data_dir, capsys):
    path = write_config(data_dir, "untrained", tiny_config())
    messages = []
    for script in ("embed.py", "export.py"):
        done = subprocess.run(
            [sys.executable, script, "-c", str(path)],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "TFCBIR_DATA_DIR": str(data_dir)},
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        messages.append(done.stderr.strip().splitlines()[-1])
    assert messages[0] == messages[1]
    assert "no trained model" in messages[1]


def test_bad_output_is_one_line(searchable_run, tmp_path):
    from export import main
    from tfcbir import UserError

    path, root = searchable_run
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFCBIR_DATA_DIR", str(root))
        with pytest.raises(UserError, match="a file is in the way") as error:
            main(["-c", str(path), "-o", str(blocker)])
        assert "\n" not in str(error.value)
        other = tmp_path / "photos"
        other.mkdir()
        (other / "keep.jpg").write_bytes(b"x")
        with pytest.raises(UserError, match="not an export") as error:
            main(["-c", str(path), "-o", str(other)])
        assert (other / "keep.jpg").is_file()
        with pytest.raises(UserError, match="does not exist") as error:
            main(["-c", str(path), "-o", str(tmp_path / "missing" / "model")])
        assert "\n" not in str(error.value)


def test_word_ids_equal_the_tokenizer():
    from datasets.tokenizer import WordTokenizer
    from retrieval.export import word_ids

    tokenizer = WordTokenizer.build(
        ["a red circle", "the blue square, small", "Big_green triangle!"],
        vocab_size=12,
        max_length=6,
    )
    texts = ["A red circle", "", "blue, small square; unknown words here", "big_green-2 x", "ÉTÉ"]
    encode, _ = word_ids(tokenizer)
    np.testing.assert_array_equal(
        encode(np.array(texts, dtype=object)).numpy(), tokenizer.encode(texts)
    )


def test_dual_encoder_text_signature_equals_the_text_encoder(data_dir, tmp_path):
    import tensorflow as tf

    import config
    from retrieval.embedder import load_text_encoder
    from tests.test_training_dual import dual_config
    from training.trainer import train

    path = write_config(data_dir, "dual", dual_config(train__steps=2, train__validate_every=2))
    cfg = config.load(path)
    train(cfg)
    out = tmp_path / "dual"
    _export(path, data_dir, "-o", str(out))
    info = json.loads((out / "export.json").read_text())
    assert info["signatures"] == ["serving_default", "embed_images", "embed_texts"]
    assert info["text_input"] == "strings"
    texts = ["a red circle", "Blue SQUARE, small!", "words it never saw"]
    model = tf.saved_model.load(str(out / "saved_model"))
    rows = model.signatures["embed_texts"](texts=tf.constant(texts))["embeddings"].numpy()
    expected = load_text_encoder(cfg).embed(texts)
    difference = float(np.max(np.abs(rows - expected)))
    print(f"max abs difference, embed_texts vs the text encoder: {difference:.2e}")
    assert difference < 1e-5
