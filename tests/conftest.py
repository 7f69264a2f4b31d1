"""Shared fixtures: a tiny demo data set made once per session, and a private data_dir per test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tfcbir.cli import quiet_tensorflow  # the CLIs' TensorFlow settings

quiet_tensorflow()

REPO = Path(__file__).resolve().parent.parent

# Small enough to train in seconds on 2 cores, big enough for the loss to fall.
TINY = {"classes": 6, "per_class": 16, "size": 32, "seed": 0}


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    from datasets.demo import generate

    return generate(tmp_path_factory.mktemp("demo") / "shapes", **TINY)


@pytest.fixture
def data_dir(tmp_path, monkeypatch, tiny_demo) -> Path:
    """A fresh data_dir holding a copy of the tiny demo set under datasets/shapes."""
    root = tmp_path / "data"
    shutil.copytree(tiny_demo, root / "datasets" / "shapes")
    monkeypatch.setenv("TFCBIR_DATA_DIR", str(root))
    return root


def tiny_config(**overrides) -> dict:
    """A config that trains small_cnn on the tiny demo set in a few seconds."""
    raw = {
        "seed": 0,
        "data": {
            "root": "datasets/shapes",
            "split": {"by": "images", "test_fraction": 0.25},
            "image_size": [32, 32],
            "resize": [36, 36],
        },
        "model": {
            "backbone": "small_cnn",
            "weights": "none",
            "head": "direct_normalize",
            "embedding_dim": 16,
        },
        "loss": {"name": "semi_hard_triplet", "margin": 0.2},
        "train": {
            "batch": {"P": 4, "K": 4},
            "steps": 30,
            "optimizer": {"name": "adam", "lr": 0.003},
            "checkpoint_every": 10,
            "validate_every": 15,
            "log_every": 1,
        },
    }
    for key, value in overrides.items():
        section, _, rest = key.partition("__")
        target = raw
        parts = [section] + (rest.split("__") if rest else [])
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return raw


def write_config(folder: Path, name: str, raw: dict) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="session")
def searchable_run(tmp_path_factory, tiny_demo):
    """A data_dir with the tiny demo set, a briefly trained run and its embedded galleries:
    ``(config path, data_dir)``. Tests that run a CLI on it set TFCBIR_DATA_DIR to data_dir."""
    import config
    from embed import main as embed
    from training.trainer import train

    root = tmp_path_factory.mktemp("searchable") / "data"
    shutil.copytree(tiny_demo, root / "datasets" / "shapes")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFCBIR_DATA_DIR", str(root))
        path = write_config(root, "search", tiny_config(train__steps=20, train__validate_every=10))
        train(config.load(path))
        assert embed(["-c", str(path)]) == 0
    return path, root
