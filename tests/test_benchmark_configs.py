"""trainings/benchmarks/: the literature's settings for the four benchmarks resolve and fit them."""

from __future__ import annotations

import pytest

import config
from datasets import archives
from tests.conftest import REPO

FOLDER = REPO / "trainings" / "benchmarks"
LOSSES = ("multi_similarity", "proxy_anchor", "semi_hard_triplet")
CONFIGS = sorted(FOLDER.glob("*.json"))


def test_every_data_set_has_every_loss():
    assert [p.stem for p in CONFIGS] == sorted(
        f"{data}_{loss}" for data in archives.FORMATS for loss in LOSSES
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_benchmark_config_resolves_with_the_common_setting(path):
    resolved = config.load(path)  # the data root need not exist to resolve
    data_format, loss = path.stem.split("_", 1)
    assert resolved["name"] == path.stem
    assert resolved["data"]["format"] == data_format and resolved["loss"]["name"] == loss
    assert resolved["data"]["split"]["by"] == "protocol"
    assert resolved["data"]["image_size"] == [224, 224]
    model = {key: resolved["model"][key] for key in ("backbone", "weights", "head")}
    assert model == {"backbone": "resnet_v1_50", "weights": "imagenet", "head": "direct_normalize"}
    assert resolved["model"]["embedding_dim"] == 512
    assert resolved["eval"]["protocol"] == "auto"
    validation = resolved["train"]["validation"]
    assert validation["source"] == "holdout"  # model selection never on the test queries
    # P whole classes must remain after the holdout takes whole training classes away.
    train_classes = archives.FULL_SIZES[data_format]["train"][0]
    held_out = max(1, round(validation["holdout"] * train_classes))
    assert resolved["train"]["batch"]["P"] <= train_classes - held_out
    schedule = resolved["train"]["lr_schedule"]
    assert schedule["decay_start"] + schedule["warmup_steps"] < resolved["train"]["steps"]


def test_docs_list_every_benchmark_config():
    page = (REPO / "docs" / "data.md").read_text(encoding="utf-8")
    for path in CONFIGS:
        assert f"`{path.stem}`" in page, path.stem
