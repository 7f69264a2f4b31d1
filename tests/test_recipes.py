"""trainings/recipes/: every recipe resolves, says what it is, and the docs describe each one."""

from __future__ import annotations

import pytest

import config
from tests.conftest import REPO

FOLDER = REPO / "trainings" / "recipes"
RECIPES = sorted(FOLDER.glob("*.json"))


def test_the_three_recipes_are_there():
    assert [p.stem for p in RECIPES] == ["finetune_resnet50", "finetune_vit", "small_from_scratch"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_resolves(path):
    resolved = config.load(path)  # the data root need not exist to resolve
    assert resolved["name"] == path.stem
    assert resolved["train"]["validation"]["source"] == "auto"  # never selected on test
    schedule = resolved["train"]["lr_schedule"]
    assert schedule["warmup_steps"] < resolved["train"]["steps"]


def test_small_from_scratch_needs_no_weights():
    resolved = config.load(FOLDER / "small_from_scratch.json")
    assert resolved["model"]["weights"] == "none"
    assert resolved["data"]["image_size"] == [48, 48]


def test_small_from_scratch_is_selected_on_holdout_map_at_r():
    """It was chosen on the holdout's MAP@R (docs/recipes.md), and selects its model so."""
    resolved = config.load(FOLDER / "small_from_scratch.json")
    assert resolved["train"]["validation"]["metric"] == "map@r"


def test_finetune_resnet50_uses_the_literature_tricks():
    resolved = config.load(FOLDER / "finetune_resnet50.json")
    model = resolved["model"]
    assert (model["backbone"], model["weights"]) == ("resnet_v1_50", "imagenet")
    assert model["freeze_batchnorm"] and model["pooling"] == "avgmax"
    assert resolved["train"]["freeze_backbone_steps"] > 0
    assert resolved["loss"]["name"] == "proxy_anchor"


def test_finetune_vit_uses_a_hub_preset_with_layer_decay_and_ema():
    resolved = config.load(FOLDER / "finetune_vit.json")
    assert resolved["model"]["backbone"].startswith("hub:")
    assert resolved["train"]["optimizer"]["layer_decay"] < 1
    assert resolved["train"]["ema"]["decay"] > 0


def test_docs_describe_every_recipe():
    page = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    for path in RECIPES:
        assert f"trainings/recipes/{path.name}" in page, path.name


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_checks_against_class_folders(path, data_dir):
    """train.py --check's report on a class-folder set: every image readable, a holdout."""
    from training.check import check

    raw = config.load_raw(path)
    raw["data"]["root"] = "datasets/shapes"
    result = check(config.resolve(raw))
    assert result["layout"] == "class_folders"
    assert result["splits"]["validation"]["images"] > 0
    assert result["unreadable"] == []
