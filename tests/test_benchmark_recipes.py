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


@pytest.mark.parametrize("name", finetune.SETTINGS)
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
