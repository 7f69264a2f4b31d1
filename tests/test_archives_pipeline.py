"""The benchmark archives through the whole pipeline: training on each layout, then embedding and
evaluating with its protocol (leave-one-out for CUB-200-2011, query against gallery for In-shop)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import config
from tests.conftest import tiny_config, write_config
from tests.helpers_archives import make_cars, make_cub, make_inshop, make_sop
from tests.test_retrieval_cli import call
from training.trainer import train

TRAIN = {1: 4, 2: 4, 3: 4}


def _archive(layout: str, base):
    """A tiny archive of ``layout`` under base; its data.root (relative to data_dir)."""
    if layout == "cub200":
        make_cub(base / "cub", {**TRAIN, 101: 3, 102: 3})
        return "cub"  # the folder holding CUB_200_2011/
    if layout == "cars196":
        make_cars(base / "cars", {**TRAIN, 99: 3, 196: 3})
        return "cars"
    if layout == "sop":
        make_sop(base / "sop", train=TRAIN, test={11319: 3, 11320: 3})
        return "sop/Stanford_Online_Products"
    make_inshop(
        base / "inshop",
        {
            "id_00000001": (4, 0, 0),
            "id_00000002": (4, 0, 0),
            "id_00000003": (4, 0, 0),
            "id_00000004": (0, 2, 2),
            "id_00000005": (0, 1, 3),
        },
    )
    return "inshop"


def _raw(root: str, name: str, **overrides) -> dict:
    raw = tiny_config(
        data__root=root,
        data__split={"by": "auto"},
        train__batch={"P": 2, "K": 2},
        train__steps=2,
        train__checkpoint_every=2,
        train__validate_every=2,
        **overrides,
    )
    return {**raw, "name": name}


@pytest.fixture
def archives_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TFCBIR_DATA_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("layout", ["cub200", "cars196", "sop", "inshop"])
def test_training_runs_on_each_archive(archives_dir, layout):
    root = _archive(layout, archives_dir)
    result = train(config.resolve(_raw(root, f"run_{layout}")))
    assert result.step == 2 and np.isfinite(result.loss) and not result.interrupted
    assert result.run.best_weights.exists()
    saved = json.loads(result.run.config_file.read_text())
    assert saved["data"]["format"] == "auto"


def test_inshop_embeds_and_evaluates_query_against_gallery(archives_dir, capsys):
    root = _archive("inshop", archives_dir)
    path = write_config(archives_dir, "inshop_e2e", _raw(root, "inshop_e2e"))
    train(config.load(path))
    code, out, err = call("embed", "-c", path, capsys=capsys)
    assert code == 0, err
    assert [line.rsplit("/", 1)[-1] for line in out.splitlines()] == ["gallery.h5", "query.h5"]
    code, out, err = call("evaluation", "-c", path, "-t", "0", "-r", "2", "--json", capsys=capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["protocol"] == "query_gallery"
    assert result["queries"] == 3 and result["gallery_size"] == 5
    assert 0.0 <= result["recall@1"] <= 1.0


def test_cub_embeds_and_evaluates_leave_one_out_on_the_test_classes(archives_dir, capsys):
    root = _archive("cub200", archives_dir)
    path = write_config(archives_dir, "cub_e2e", _raw(root, "cub_e2e"))
    train(config.load(path))
    code, out, err = call("embed", "-c", path, capsys=capsys)
    assert code == 0, err
    assert [line.rsplit("/", 1)[-1] for line in out.splitlines()] == ["test.h5"]
    code, out, err = call("evaluation", "-c", path, "-t", "0", "-r", "2", "--json", capsys=capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["protocol"] == "leave_one_out"
    assert result["queries"] == 6 and result["gallery_size"] == 6
