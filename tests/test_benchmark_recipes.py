"""benchmarks/recipe.py and benchmarks/finetune.py: their settings, and a quick smoke run of each."""

from __future__ import annotations

import json

import pytest

from benchmarks import finetune, recipe


def test_combined_tricks_set_each_tricks_keys():
    baseline = recipe.read_json(recipe.BASELINE)
    raw = recipe.setting_config("batch+pooling+miner", baseline, {})
    assert raw["train"]["batch"] == {"P": 16, "K": 4}
    assert raw["model"]["pooling"] == "gem"
    assert raw["loss"] == {**baseline["loss"], "miner": "distance_weighted"}
    assert recipe.setting_config("baseline", baseline, {}) == baseline
    assert recipe.with_selection(baseline, "map@r")["train"]["validation"]["metric"] == "map@r"
    assert recipe.known_setting("batch+pooling") and not recipe.known_setting("batch+gem")


def test_every_trick_resolves_on_the_baseline():
    import config

    baseline = recipe.read_json(recipe.BASELINE)
    for name in recipe.TRICKS:
        config.resolve(recipe.setting_config(name, baseline, {}))


def test_the_table_shows_the_holdout_score(tmp_path):
    runs = [
        {"seed": s, "holdout": h, "holdout_metric": "map@r", "seconds": 1.0}
        | {"MAP@R": 0.5, "recall@1": 0.7, "mAP@10": 0.6}
        for s, h in ((0, 0.4), (1, 0.6))
    ]
    old = [{k: v for k, v in run.items() if not k.startswith("holdout")} for run in runs]
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"batch+pooling [map@r]": runs, "baseline": old}))
    lines = recipe.table(recipe.merged([str(path)]))
    assert lines[2].startswith(
        "| baseline | 2 | - | 0.500 ± 0.000 |"
    )  # measured before: no holdout
    assert lines[3].startswith("| batch+pooling [map@r] | 2 | MAP@R 0.500 ± 0.141 | 0.500")


def test_recipe_quick_records_the_holdout_score(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TFCBIR_DATA_DIR", str(tmp_path))  # restored after the run set it
    out = tmp_path / "runs.json"
    argv = ["--quick", "--settings", "baseline", "--seeds", "0", "--select", "map@r"]
    recipe.main([*argv, "--data-dir", str(tmp_path / "d"), "--json", str(out)])
    (run,) = json.loads(out.read_text())["baseline [map@r]"]
    assert run["holdout_metric"] == "map@r" and 0 <= run["holdout"] <= 1
    assert run["best_step"] in (15, 30)
    assert "| baseline [map@r] | 1 | MAP@R " in capsys.readouterr().out


def test_finetune_quick_pretrains_and_fine_tunes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TFCBIR_DATA_DIR", str(tmp_path))
    folder = tmp_path / "d"
    results = finetune.main(
        ["--quick", "--settings", "scratch,freeze_batchnorm+warmup", "--seeds", "0"]
        + ["--data-dir", str(folder)]
    )
    assert set(results) == {"scratch", "freeze_batchnorm+warmup"}
    assert (folder / "pretrained_backbone.weights.h5").is_file()
    # The fine-tuning classes are not the pretraining classes.
    pretrained = {p.name for p in (folder / "pretrain_shapes").iterdir()}
    tuned = {p.name for p in (folder / "finetune_shapes").iterdir()}
    assert len(pretrained) == len(tuned) == 8 and not pretrained & tuned
    printed = capsys.readouterr().out
    assert "layer_decay 0.75 on small_cnn: train.optimizer.layer_decay: small_cnn has no" in printed


def test_finetune_quick_fine_tunes_the_pretrained_vit_with_and_without_layer_decay(
    tmp_path, monkeypatch
):
    import math

    import numpy as np

    import config
    import nets
    from training.optim import trainable_groups

    monkeypatch.setenv("TFCBIR_DATA_DIR", str(tmp_path))
    folder = tmp_path / "d"
    results = finetune.main(
        ["--quick", "--settings", ",".join(finetune.VIT_SETTINGS), "--seeds", "0"]
        + ["--data-dir", str(folder)]
    )
    assert set(results) == {"vit_scratch", "vit_pretrained", "vit_layer_decay"}
    for runs in results.values():
        (run,) = runs
        assert all(math.isfinite(run[key]) and 0 <= run[key] <= 1 for key in recipe.METRICS)
    assert not (folder / "pretrained_backbone.weights.h5").exists()  # no CNN setting asked
    weights = folder / "pretrained_vit.weights.h5"
    resolved = {
        name: config.load(str(folder / "configs" / f"{name}_seed0.json"))
        for name in finetune.VIT_SETTINGS
    }
    for name, cfg in resolved.items():
        assert cfg["model"]["backbone"] == f"hub:{folder / 'vit_preset'}"
        assert cfg["model"]["weights"] == ("pretrained" if name == "vit_scratch" else str(weights))
        assert cfg["train"]["optimizer"]["backbone_lr_multiplier"] == 0.3
    for name in ("vit_scratch", "vit_pretrained"):
        assert resolved[name]["train"]["optimizer"]["layer_decay"] is None
    assert resolved["vit_layer_decay"]["train"]["optimizer"]["layer_decay"] == 0.75
    # Fine-tuning starts from the pretrained tower, not the preset's random weights.
    cfg = resolved["vit_layer_decay"]
    model = nets.build_embedding_model(cfg["model"], (32, 32))
    random = nets.build_embedding_model({**cfg["model"], "weights": "pretrained"}, (32, 32))
    saved = nets.build_embedding_model(cfg["model"], (32, 32), pretrained=False)
    saved.get_layer("backbone").load_weights(str(weights))
    tower, random_tower = model.get_layer("backbone"), random.get_layer("backbone")
    for got, want in zip(tower.get_weights(), saved.get_layer("backbone").get_weights()):
        np.testing.assert_array_equal(got, want)
    assert any(
        not np.array_equal(a, b) for a, b in zip(tower.get_weights(), random_tower.get_weights())
    )
    # The decay is in force: the 4 blocks and the stem at 0.3 * 0.75^(5 - id); without it one
    # backbone group at 0.3.
    rates = {
        group.name: group.lr_multiplier for group in trainable_groups(model, None, [], cfg["train"])
    }
    for index, part in enumerate(["embeddings", "block0", "block1", "block2", "block3"]):
        assert rates[f"backbone.{part}"] == pytest.approx(0.3 * 0.75 ** (5 - index))
    assert rates["head"] == 1.0
    plain = trainable_groups(model, None, [], resolved["vit_pretrained"]["train"])
    assert [group.name for group in plain] == ["backbone", "head"]
    assert plain[0].lr_multiplier == 0.3


@pytest.mark.parametrize("name", finetune.CNN_SETTINGS)
def test_finetune_settings_resolve(name, tmp_path):
    import config

    weights = tmp_path / "backbone.weights.h5"
    weights.write_bytes(b"")  # resolving checks the suffix, loading happens at training
    raw = finetune.setting_config(name, str(weights), quick=False)
    resolved = config.resolve(raw)
    assert resolved["model"]["weights"] == ("none" if name == "scratch" else str(weights))
    assert resolved["model"]["freeze_batchnorm"] is ("freeze_batchnorm" in name)
    assert resolved["train"]["freeze_backbone_steps"] == (100 if "warmup" in name else 0)


def test_rerank_trained_quick_reports_each_method_per_data_set(tmp_path, monkeypatch, capsys):
    from benchmarks import rerank

    monkeypatch.setenv("TFCBIR_DATA_DIR", str(tmp_path))
    out = tmp_path / "rerank.json"
    argv = ["--trained", "--quick", "--sets", "demo", "--seeds", "0", "--json", str(out)]
    rerank.main([*argv, "--data-dir", str(tmp_path / "d")])
    (run,) = json.loads(out.read_text())["demo"]
    for method in rerank.METHODS[1:]:
        assert 0 <= run[f"{method}/MAP@R"] <= 1
    printed = capsys.readouterr().out
    assert printed.count("| demo (1 seed) |") == len(rerank.METHODS)
    rerank.main(["--table", str(out)])
    assert "| demo (1 seed) | none | " in capsys.readouterr().out
