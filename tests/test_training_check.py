"""train.py --check: the config and the data checked without training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, tiny_config, write_config
from tests.helpers_archives import make_cub, make_inshop
from tests.helpers_images import write_text, write_truncated_jpeg
from tests.test_retrieval_cli import call


@pytest.fixture
def cub(tmp_path, monkeypatch):
    """A data_dir with a tiny CUB-200-2011 (3 training classes of 4 images, 2 test classes of
    3) and a config validating on a holdout; yields the config's path."""
    monkeypatch.setenv("TFCBIR_DATA_DIR", str(tmp_path))
    make_cub(tmp_path / "datasets" / "cub", {1: 4, 2: 4, 3: 4, 101: 3, 102: 3})
    raw = tiny_config(
        data__root="datasets/cub",
        data__split={"by": "auto"},
        train__batch={"P": 2, "K": 2},
        train__validation={"source": "holdout", "holdout": 0.3},
    )
    return write_config(tmp_path, "cub", raw)


def test_check_reports_layout_splits_protocol_and_config(cub, capsys):
    code, out, err = call("train", "-c", cub, "--check", "--json", capsys=capsys)
    assert code == 0, err
    result = json.loads(out)
    assert {"layout", "splits", "protocol", "unreadable", "config"} <= set(result)
    assert result["layout"] == "cub200" and result["split"] == "protocol"
    assert result["data_root"] == str(cub.parent / "datasets" / "cub")
    # whole classes held out of the 3 training classes: round(0.3 * 3) = 1
    assert result["splits"] == {
        "train": {"classes": 2, "images": 8},
        "validation": {"classes": 1, "images": 4},
        "test": {"classes": 2, "images": 6},
        "query": None,
        "gallery": None,
    }
    assert result["validation"] == {"source": "holdout"}
    assert result["protocol"] == {
        "name": "leave_one_out",
        "queries": "test",
        "gallery": "test",
        "query_images": 6,
        "gallery_images": 6,
        "on_training_images": False,
    }
    assert result["images_checked"] == 18 and result["unreadable"] == []
    assert result["config"]["name"] == "cub" and result["config"]["data"]["format"] == "auto"
    assert result["config"]["train"]["steps"] == 30  # the resolved config, defaults filled in
    assert any("full CUB-200-2011 archive has 100 classes" in note for note in result["notes"])
    assert "checking images: 18/18" in err
    assert not (cub.parent / "trainings").exists()  # nothing trained, no run folder

    code, out, _ = call("train", "-c", cub, "--check", capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    assert '  data.format = "auto"' in lines and "  train.batch.P = 2" in lines
    assert (
        f"data {cub.parent / 'datasets' / 'cub'}: layout cub200 (CUB-200-2011), split by protocol"
        in lines
    )
    assert "  train             2 classes         8 images" in lines
    assert "  validation        1 classes         4 images (held out of training)" in lines
    assert "evaluation: leave_one_out, the test set against itself (6 images)" in lines
    assert "images: 18 checked, all readable" in lines


def test_check_names_unreadable_and_missing_files_and_exits_1(cub, capsys):
    folder = cub.parent / "datasets" / "cub" / "CUB_200_2011" / "images"
    truncated = write_truncated_jpeg(folder / "002.Bird_2" / "Bird_2_0001_6.jpg")
    text = write_text(folder / "101.Bird_101" / "Bird_101_0000_13.jpg")
    gone = folder / "102.Bird_102" / "Bird_102_0002_18.jpg"
    gone.unlink()
    code, out, err = call("train", "-c", cub, "--check", "--json", capsys=capsys)
    assert code == 1, err
    result = json.loads(out)
    problems = {item["path"]: item["problem"] for item in result["unreadable"]}
    assert list(problems) == [str(gone), str(truncated), str(text)]
    assert problems[str(gone)] == "listed, but the file does not exist"
    assert problems[str(truncated)].startswith("truncated or corrupt image data")
    assert result["images_checked"] == 17  # the missing one is not in the lists
    code, out, _ = call("train", "-c", cub, "--check", capsys=capsys)
    assert code == 1
    assert "images: 17 checked, 3 unreadable (training and embedding skip them):" in out
    assert f"  {text}: " in out


def test_check_of_inshop_counts_queries_and_gallery(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TFCBIR_DATA_DIR", str(tmp_path))
    items = {"id_01": (3, 0, 0), "id_02": (3, 0, 0), "id_03": (0, 2, 3), "id_04": (0, 1, 1)}
    make_inshop(tmp_path / "inshop", items)
    path = write_config(
        tmp_path,
        "shop",
        tiny_config(data__root="inshop", data__split={"by": "auto"}, train__batch={"P": 2, "K": 2}),
    )
    code, out, err = call("train", "-c", path, "--check", "--json", capsys=capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["layout"] == "inshop"
    assert result["splits"]["query"] == {"classes": 2, "images": 3}
    assert result["splits"]["gallery"] == {"classes": 2, "images": 4}
    assert result["splits"]["test"] == {"classes": 2, "images": 7}
    assert result["protocol"]["name"] == "query_gallery"
    assert (result["protocol"]["queries"], result["protocol"]["gallery"]) == ("query", "gallery")
    assert result["images_checked"] == 13


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {"root": "datasets/cub", "format": "sop"}}, "data.format: 'sop' but"),
        ({"train": {"batch": {"P": 2, "K": 2}, "steps": 0}}, "train.steps"),
        ({"data": {"root": "datasets/cub", "split": {"by": "images"}}}, "already split"),
    ],
)
def test_check_of_a_bad_config_is_one_line_and_exit_2(cub, capsys, change, message):
    raw = json.loads(cub.read_text())
    raw.update({k: {**raw[k], **v} for k, v in change.items()})
    path = write_config(cub.parent, "bad", raw)
    code, out, err = call("train", "-c", path, "--check", "--json", capsys=capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_json_without_check_is_refused(cub, capsys):
    code, out, err = call("train", "-c", cub, "--json", capsys=capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "--json formats the --check report" in err
    assert not (cub.parent / "trainings").exists()  # refused before any training started


def test_check_imports_no_tensorflow(cub):
    """--check builds no model: TensorFlow and Keras are never imported (it starts fast)."""
    script = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('train_cli', 'train.py')\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"code = module.main(['-c', {str(cub)!r}, '--check', '--json'])\n"
        "print(code, 'tensorflow' in sys.modules, 'keras' in sys.modules, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "0 False False"
    assert json.loads(done.stdout)["layout"] == "cub200"
