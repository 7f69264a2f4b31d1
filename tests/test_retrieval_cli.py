"""embed.py, evaluation.py, test.py and cbir.py end to end on the tiny demo set."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import config
from retrieval.gallery import partial_path, read_gallery
from retrieval.metrics import clustering_nmi
from tests.conftest import REPO, tiny_config, write_config
from tests.helpers_images import (
    gradient,
    write_image,
    write_png_header,
    write_text,
    write_truncated_jpeg,
)
from tfcbir.cli import run
from training.trainer import train


def cli(name: str):
    """A CLI script's main(), loaded by path (test.py would clash with Python's own package)."""
    spec = importlib.util.spec_from_file_location(f"cli_{name}", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def call(name: str, *argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        run(cli(name), [str(a) for a in argv])
    out, err = capsys.readouterr()
    return done.value.code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_demo):
    """A data_dir with the tiny demo set and a briefly trained run; yields its config path."""
    root = tmp_path_factory.mktemp("cli") / "data"
    shutil.copytree(tiny_demo, root / "datasets" / "shapes")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFCBIR_DATA_DIR", str(root))
        raw = tiny_config(train__steps=20, train__validate_every=10)
        path = write_config(root, "cli", raw)
        train(config.load(path))
        yield path


def test_embed_evaluate_test_and_cbir(trained, capsys):
    code, out, err = call("embed", "-c", trained, capsys=capsys)
    assert code == 0, err
    files = [p.strip() for p in out.splitlines()]
    assert [p.split("/")[-1] for p in files] == ["train.h5", "test.h5"]
    train_set = read_gallery(files[0])
    assert train_set.embeddings.shape == (72, 16) and train_set.normalized
    np.testing.assert_allclose(np.linalg.norm(train_set.embeddings, axis=1), 1.0, atol=1e-5)
    best = json.loads((trained.parent / "trainings" / "cli" / "best.json").read_text())
    assert len(train_set.classes) == 6 and train_set.model_step == best["step"]
    assert all(not p.startswith("/") for p in train_set.paths)

    code, out, err = call(
        "evaluation", "-c", trained, "-t", "0", "-r", "5", "--json", capsys=capsys
    )
    assert code == 0, err
    result = json.loads(out)
    for key in (
        "mAP@5",
        "mAP",
        "precision@1",
        "recall@1",
        "recall@2",
        "recall@4",
        "recall@8",
        "MAP@R",
        "R-precision",
        "NMI",
        "queries",
        "r",
    ):
        assert key in result
    assert result["queries"] == 24 and result["r"] == 5
    assert result["protocol"] == "train_gallery" and result["on_training_images"] is False
    assert result["model_selected_on"] == "holdout"  # the run chose its model off the test set
    assert 0 <= result["mAP@5"] <= 1 and result["mAP"] == result["mAP@5"]  # the alias
    assert "mAP@10" not in result
    # NMI clusters every test embedding (k = its 6 classes, seeded), whatever the sample.
    test_set = read_gallery(Path(files[1]))
    assert result["NMI"] == clustering_nmi(test_set.embeddings, test_set.labels, seed=0)
    code, out, err = call(
        "evaluation", "-c", trained, "-t", "5", "-r", "5", "--json", capsys=capsys
    )
    sampled = json.loads(out)
    assert sampled["queries"] == 5 and sampled["NMI"] == result["NMI"]
    code, out, err = call("evaluation", "-c", trained, "-t", "5", "-r", "5", capsys=capsys)
    assert "  mAP@5  " in out and "warning" not in out and "NMI" in out
    code, out, err = call(
        "evaluation", "-c", trained, "-t", "5", "-r", "5", "--no-nmi", "--json", capsys=capsys
    )
    assert "NMI" not in json.loads(out) and json.loads(out)["mAP@5"] == sampled["mAP@5"]
    assert result["recall@1"] <= result["recall@2"] <= result["recall@4"] <= result["recall@8"]
    saved = json.loads(Path(result["saved"]).read_text())
    assert saved["mAP"] == result["mAP"]

    code, out, err = call("test", "-c", trained, "-r", "4", "--seed", "3", capsys=capsys)
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 4
    picture = out.strip().splitlines()[-1].split("picture: ")[1]
    assert Image.open(picture).size[0] > 4 * 32

    query = trained.parent / "datasets" / "shapes" / train_set.paths[0]
    code, out, err = call("cbir", "-c", trained, "-r", "3", "--json", query, capsys=capsys)
    assert code == 0, err
    answer = json.loads(out)["results"][0]
    assert answer["class"] == train_set.classes[train_set.labels[0]]
    assert [a["rank"] for a in answer["answers"]] == [1, 2, 3]
    assert answer["answers"][0]["path"] == train_set.paths[0]  # itself, in the gallery
    assert answer["answers"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_cbir_bad_query_files_do_not_stop_the_others(trained, tmp_path, capsys):
    call("embed", "-c", trained, capsys=capsys)
    good = write_image(tmp_path / "good.png", gradient((40, 50)))
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([gradient((30, 30)), np.full((30, 30), 128, np.uint8)])).save(rgba)
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(gradient((30, 30))).convert("CMYK").save(cmyk)
    grey16 = tmp_path / "grey16.png"
    Image.fromarray((np.arange(900).reshape(30, 30) * 60).astype(np.uint16)).save(grey16)
    palette = tmp_path / "palette.gif"
    Image.fromarray(gradient((30, 30))).convert("P").save(palette)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = write_text(tmp_path / "notes.jpg")
    truncated = write_truncated_jpeg(tmp_path / "cut.jpg")
    missing = tmp_path / "missing.png"
    huge = write_png_header(tmp_path / "huge.png", 60000, 60000)  # a decompression bomb
    queries = [good, rgba, cmyk, grey16, palette, empty, text, truncated, missing, huge]
    code, out, err = call("cbir", "-c", trained, "-r", "2", "--json", *queries, capsys=capsys)
    assert code == 1  # answered, but some files could not be read
    document = json.loads(out)
    answered = [r["query"] for r in document["results"]]
    assert answered == [str(p) for p in (good, rgba, cmyk, grey16, palette)]
    assert all(r["class"] is None for r in document["results"])
    assert sorted(document["unreadable"]) == sorted(
        str(p) for p in (empty, text, truncated, missing, huge)
    )
    for bad in ("empty.jpg", "notes.jpg", "cut.jpg", "missing.png", "huge.png"):
        assert bad in err
    assert "Traceback" not in err

    code, out, err = call("cbir", "-c", trained, "-r", "2", empty, missing, capsys=capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: none of the 2 query")


def test_cbir_saves_pictures_and_reads_folders_and_lists(trained, tmp_path, capsys):
    call("embed", "-c", trained, capsys=capsys)
    folder = tmp_path / "queries"
    write_image(folder / "a.png", gradient((30, 30)))
    write_image(folder / "sub" / "b.png", gradient((20, 40)))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / 'a.png'}\n\n")
    code, out, err = call(
        "cbir",
        "-c",
        trained,
        "-r",
        "3",
        folder,
        "--list",
        listing,
        "--save",
        tmp_path / "grid.png",
        capsys=capsys,
    )
    assert code == 0, err
    assert out.count("query ") == 3
    assert sorted(p.name for p in tmp_path.glob("grid_*.png")) == ["grid_a.png", "grid_b.png"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-r", "500", "{query}"], "-r 500 is larger than the gallery"),
        (["-r", "0", "{query}"], "-r 0: give a number of answers >= 1"),
        (["-r", "2"], "no query given"),
        (["-r", "2", "--list", "{missing}"], "--list"),
    ],
)
def test_cbir_bad_arguments_are_one_line(trained, tmp_path, capsys, argv, message):
    call("embed", "-c", trained, capsys=capsys)
    query = write_image(tmp_path / "q.png", gradient((30, 30)))
    argv = [a.format(query=query, missing=tmp_path / "nope.txt") for a in argv]
    code, out, err = call("cbir", "-c", trained, *argv, capsys=capsys)
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and message in err


def test_missing_and_stale_galleries_are_refused(trained, tmp_path, capsys):
    embeddings = trained.parent / "trainings" / "cli" / "embeddings"
    shutil.rmtree(embeddings, ignore_errors=True)
    code, out, err = call("evaluation", "-c", trained, capsys=capsys)
    assert code == 2 and "embed.py -c" in err and "no gallery" in err

    call("embed", "-c", trained, capsys=capsys)
    with h5py.File(embeddings / "train.h5", "r+") as f:
        f.attrs["model_id"] = "0123456789abcdef"  # as if another model made it
    code, out, err = call("evaluation", "-c", trained, capsys=capsys)
    assert code == 2 and "another model checkpoint" in err and "embed.py" in err
    code, out, err = call("embed", "-c", trained, "--split", "train", capsys=capsys)
    assert code == 0  # a stale gallery is embedded again
    read_gallery(embeddings / "train.h5")


def test_interrupted_embed_resumes(trained, capsys, monkeypatch):
    from retrieval import embedder as module

    embeddings = trained.parent / "trainings" / "cli" / "embeddings"
    shutil.rmtree(embeddings, ignore_errors=True)
    calls = {"n": 0}
    original = module.Embedder.embed_files

    def dies_after_one_batch(self, paths, **kwargs):
        for batch in original(self, paths, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(module.Embedder, "embed_files", dies_after_one_batch)
    code, out, err = call(
        "embed", "-c", trained, "--split", "train", "--batch-size", "16", capsys=capsys
    )
    assert code == 130
    assert not (embeddings / "train.h5").exists()
    with h5py.File(partial_path(embeddings / "train.h5"), "r") as f:
        assert f["done"][...].sum() == 16

    monkeypatch.setattr(module.Embedder, "embed_files", original)
    seen = []
    monkeypatch.setattr(
        module.Embedder,
        "embed_files",
        lambda self, paths, **kw: (seen.append(len(paths)), original(self, paths, **kw))[1],
    )
    code, out, err = call("embed", "-c", trained, "--split", "train", capsys=capsys)
    assert code == 0, err
    assert seen == [72 - 16]  # only the unfinished images
    gallery = read_gallery(embeddings / "train.h5")
    assert len(gallery) == 72 and not partial_path(embeddings / "train.h5").exists()


def test_a_run_without_a_model_is_refused(trained, tmp_path, capsys):
    untrained = write_config(trained.parent, "untrained", tiny_config())
    code, out, err = call("embed", "-c", untrained, capsys=capsys)
    assert code == 2
    assert "has no trained model yet" in err and "train.py" in err
    assert err.strip().splitlines() == [err.strip()]


@pytest.fixture
def private(trained, tmp_path, monkeypatch):
    """A private copy of the trained data_dir (its data set may be changed): its config path."""
    root = tmp_path / "data"
    shutil.copytree(trained.parent, root)
    shutil.rmtree(root / "trainings" / "cli" / "embeddings", ignore_errors=True)
    monkeypatch.setenv("TFCBIR_DATA_DIR", str(root))
    return root / trained.name


def refused(name: str, *argv, capsys) -> str:
    """The one-line error of a CLI call that must fail with exit code 2."""
    code, out, err = call(name, *argv, capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def evaluated(cfg: Path, *argv, capsys) -> dict:
    code, out, err = call(
        "evaluation", "-c", cfg, "-t", "0", "-r", "3", "--json", *argv, capsys=capsys
    )
    assert code == 0, err
    return json.loads(out)


def test_a_gallery_of_an_older_image_list_is_refused_then_re_embedded(private, capsys):
    cfg = private
    call("embed", "-c", cfg, capsys=capsys)
    before = evaluated(cfg, capsys=capsys)
    assert before["queries"] + before["gallery_size"] == 96
    # An image is added to a class folder: the split's lists change, the galleries are stale.
    train_set = read_gallery(cfg.parent / "trainings" / "cli" / "embeddings" / "train.h5")
    source = cfg.parent / "datasets" / "shapes" / train_set.paths[0]
    shutil.copy(source, source.with_name("added.png"))
    line = refused("evaluation", "-c", cfg, capsys=capsys)
    assert "was embedded from another list of" in line
    assert f"re-embed it: python embed.py -c {cfg} --split" in line
    assert "test.h5" in line or "train.h5" in line
    line = refused("test", "-c", cfg, capsys=capsys)
    assert "another list of" in line and "python embed.py" in line

    code, out, err = call("embed", "-c", cfg, capsys=capsys)  # stale galleries: embedded again
    assert code == 0, err
    assert "out of date" in err and "another list of" in err
    after = evaluated(cfg, capsys=capsys)
    assert after["queries"] + after["gallery_size"] == 97


def test_an_edited_query_list_is_refused(private, capsys):
    cfg = private
    root = cfg.parent / "datasets" / "shapes"
    images = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    rows = [f"{Path(p).parent.name},{p}" for p in images]
    (root / "query.csv").write_text("\n".join(rows[::4]) + "\n")
    (root / "gallery.csv").write_text("\n".join(r for i, r in enumerate(rows) if i % 4) + "\n")
    raw = json.loads(cfg.read_text())
    raw["eval"] = {
        "protocol": "query_gallery",
        "query_list": "query.csv",
        "gallery_list": "gallery.csv",
    }
    cfg.write_text(json.dumps(raw))
    call("embed", "-c", cfg, capsys=capsys)
    assert evaluated(cfg, capsys=capsys)["queries"] == 24
    (root / "query.csv").write_text("\n".join(rows[::4][:-1]) + "\n")  # one query less
    line = refused("evaluation", "-c", cfg, capsys=capsys)
    assert "query.h5 was embedded from another list of query images (24 then" in line
    assert line.endswith(f"python embed.py -c {cfg} --split query")
    code, out, err = call("embed", "-c", cfg, "--split", "query", capsys=capsys)
    assert code == 0, err
    assert evaluated(cfg, capsys=capsys)["queries"] == 23


def test_galleries_without_the_model_are_refused_and_checkpoints_work(private, capsys):
    cfg = private
    run_folder = cfg.parent / "trainings" / "cli"
    call("embed", "-c", cfg, capsys=capsys)
    (run_folder / "best.weights.h5").rename(run_folder / "kept.weights.h5")
    line = refused("evaluation", "-c", cfg, capsys=capsys)
    assert "has no trained model" in line and "train it first" in line
    assert "--checkpoint" in line
    # The galleries were embedded with those weights: given explicitly, they are accepted.
    kept = run_folder / "kept.weights.h5"
    assert evaluated(cfg, "--checkpoint", kept, capsys=capsys)["queries"] == 24
    # Embedded with a training checkpoint, a gallery is that checkpoint's and no other's.
    checkpoint = sorted((run_folder / "checkpoints").glob("ckpt-*.h5"))[0]
    code, out, err = call("embed", "-c", cfg, "--checkpoint", checkpoint, capsys=capsys)
    assert code == 0, err
    result = evaluated(cfg, "--checkpoint", checkpoint, capsys=capsys)
    assert result["model_step"] == int(checkpoint.stem.split("-")[1])
    line = refused("evaluation", "-c", cfg, "--checkpoint", kept, capsys=capsys)
    assert "another model checkpoint" in line and f"--checkpoint {kept}" in line
    code, out, err = call("test", "-c", cfg, "-r", "2", "--checkpoint", checkpoint, capsys=capsys)
    assert code == 0, err


def test_numbers_on_training_images_say_so(private, capsys):
    cfg = private
    raw = json.loads(cfg.read_text())
    raw["name"] = "cli"  # the same run, the same model: only the split differs
    raw["data"]["split"] = {"by": "none"}
    cfg.write_text(json.dumps(raw))
    code, out, err = call("embed", "-c", cfg, capsys=capsys)
    assert code == 0, err
    assert out.strip().endswith("train.h5")
    result = evaluated(cfg, capsys=capsys)
    assert result["on_training_images"] is True and result["protocol"] == "leave_one_out"
    assert result["queries"] == result["gallery_size"] == 96
    code, out, err = call("evaluation", "-c", cfg, "-t", "10", capsys=capsys)
    assert code == 0, err
    assert "warning: the data set has no test split" in out and "optimistic" in out


def test_a_model_chosen_on_the_test_split_is_reported(private, capsys):
    cfg = private
    call("embed", "-c", cfg, capsys=capsys)
    saved = cfg.parent / "trainings" / "cli" / "config.json"
    record = json.loads(saved.read_text())
    record["train"]["validation"]["source"] = "test"  # as train.py records a source: test run
    saved.write_text(json.dumps(record))
    code, out, err = call("evaluation", "-c", cfg, "-t", "10", capsys=capsys)
    assert code == 0, err
    assert "chose its model on the test split" in out and "optimistic" in out
    assert evaluated(cfg, capsys=capsys)["model_selected_on"] == "test"


SCRIPTS = ["train", "embed", "evaluation", "test", "cbir", "serve", "analysis"]
TF_SETTINGS = ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")


def test_importing_a_script_changes_nothing_and_run_quiets_tensorflow():
    """Importing tfcbir.cli or a script sets no environment variable and imports no TensorFlow;
    run() sets TensorFlow's variables (oneDNN on) before a script's main can import it."""
    script = (
        "import importlib.util, json, os, sys\n"
        "import tfcbir.cli\n"
        f"for name in {SCRIPTS!r}:\n"
        "    spec = importlib.util.spec_from_file_location('cli_' + name, name + '.py')\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "env = lambda: {k: os.environ.get(k) for k in " + repr(TF_SETTINGS) + "}\n"
        "before = env(), 'tensorflow' in sys.modules or 'keras' in sys.modules\n"
        "seen = []\n"
        "def main(argv):\n"
        "    seen.append((env(), 'tensorflow' in sys.modules))\n"
        "try:\n"
        "    tfcbir.cli.run(main, [])\n"
        "except SystemExit:\n"
        "    print(json.dumps([before, seen[0]]))\n"
    )
    clean = {k: v for k, v in os.environ.items() if k not in TF_SETTINGS}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=clean, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    before, during = json.loads(done.stdout)
    assert before == [dict.fromkeys(TF_SETTINGS), False]
    settings = {"KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    assert during == [{**settings, "TF_ENABLE_ONEDNN_OPTS": "1"}, False]


def test_cbir_where_filters_the_answers(trained, tmp_path, capsys):
    call("embed", "-c", trained, capsys=capsys)
    query = write_image(tmp_path / "q.png", gradient((30, 30)))
    code, out, err = call(
        "cbir",
        "-c",
        trained,
        "-r",
        "4",
        "--json",
        "--where",
        "class == 'circle'",
        query,
        capsys=capsys,
    )
    assert code == 0, err
    found = json.loads(out)["results"][0]["answers"]
    assert len(found) == 4 and {a["class_name"] for a in found} == {"circle"}
    code, out, err = call(
        "cbir", "-c", trained, "-r", "4", "--where", "colour == 'red'", query, capsys=capsys
    )
    assert code == 2 and err.strip().splitlines() == [err.strip()]
    assert "--where: no column 'colour'" in err


def test_verification_and_same_item(trained, tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    call("embed", "-c", trained, capsys=capsys)
    saved = trained.parent / "trainings" / "cli" / "evaluation" / "verification.json"
    saved.unlink(missing_ok=True)
    query = write_image(tmp_path / "q.png", gradient((30, 30)))
    code, out, err = call("cbir", "-c", trained, "-r", "3", "--same-item", query, capsys=capsys)
    assert code == 2 and "evaluation.py -c <config> --verification" in err
    assert err.strip().splitlines() == [err.strip()]

    code, out, err = call("evaluation", "-c", trained, "--verification", "--json", capsys=capsys)
    assert code == 0, err
    result = json.loads(out)
    assert json.loads(saved.read_text())["threshold"] == result["threshold"]
    # The AUC of every train_gallery pair (test queries x train gallery), as scikit-learn has it.
    queries = read_gallery(saved.parent.parent / "embeddings" / "test.h5")
    gallery = read_gallery(saved.parent.parent / "embeddings" / "train.h5")
    scores = queries.embeddings @ gallery.embeddings.T
    same = queries.labels[:, None] == gallery.labels[None, :]
    assert result["roc_auc"] == pytest.approx(roc_auc_score(same.ravel(), scores.ravel()), abs=1e-6)
    assert result["same_class_pairs"] == same.sum() and not result["sampled"]

    code, out, err = call(
        "cbir", "-c", trained, "-r", "5", "--same-item", "--json", query, capsys=capsys
    )
    assert code == 0, err
    document = json.loads(out)
    threshold = document["same_item_threshold"]
    assert threshold == result["threshold"]
    for answer in document["results"][0]["answers"]:
        assert answer["same_item"] == (answer["score"] >= threshold)


def test_rerank_in_evaluation_and_cbir(trained, tmp_path, capsys):
    from retrieval.rerank import RerankSpec, evaluate_reranked

    call("embed", "-c", trained, capsys=capsys)
    code, out, err = call(
        "evaluation", "-c", trained, "-t", "0", "-r", "5", "--no-nmi", "--json",
        "--rerank", "k_reciprocal:k1=6,k2=3,candidates=20", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["rerank"] == {
        "method": "k_reciprocal", "k1": 6, "k2": 3, "lambda": 0.3, "candidates": 20
    }  # fmt: skip
    assert result["saved"].endswith("-k_reciprocal.json")
    embeddings = trained.parent / "trainings" / "cli" / "embeddings"
    queries, gallery = read_gallery(embeddings / "test.h5"), read_gallery(embeddings / "train.h5")
    expected = evaluate_reranked(
        RerankSpec.parse_flag("k_reciprocal:k1=6,k2=3,candidates=20"),
        queries.embeddings, queries.labels, gallery.embeddings, gallery.labels,
        normalized=True, r=5,
    ).as_dict()  # fmt: skip
    assert result["mAP@5"] == pytest.approx(expected["mAP"], abs=1e-9)
    assert result["recall@1"] == pytest.approx(expected["recall@1"], abs=1e-9)

    query = write_image(tmp_path / "q.png", gradient((30, 30)))
    code, out, err = call(
        "cbir", "-c", trained, "-r", "3", "--json", "--rerank", "alpha_qe", query, capsys=capsys
    )
    assert code == 0, err
    assert len(json.loads(out)["results"][0]["answers"]) == 3
    code, out, err = call("cbir", "-c", trained, "-r", "3", "--rerank", "qe", query, capsys=capsys)
    assert code == 2 and err.strip().splitlines() == [err.strip()]
    assert "--rerank.method: 'qe' is not one of" in err
