"""train.ema (a moving average of the weights) and train.freeze_backbone_steps (a warm-up with
the backbone frozen): against a NumPy recurrence over the recorded weights, the best weights'
choice, exact resume, one-line errors."""

from __future__ import annotations

import csv

import numpy as np
import pytest

import config
import nets
from runs import checkpoint
from tests.conftest import tiny_config
from tfcbir import UserError
from training.ema import ema_decay
from training.trainer import train

TIMM_DEFAULTS = {"decay": 0.9998, "warmup": True, "warmup_gamma": 1.0, "warmup_power": 2 / 3}


def reference_decay(step: int, decay: float, warmup: bool, gamma=1.0, power=2 / 3) -> float:
    """timm ModelEmaV3.get_decay(step) with min_decay 0 and update_after_step 0, by hand."""
    t = max(0, step - 1)
    if t <= 0:
        return 0.0
    return min(decay, 1 - (1 + t / gamma) ** -power) if warmup else decay


def test_decay_follows_timm_model_ema_v3():
    no_warmup = {**TIMM_DEFAULTS, "warmup": False, "decay": 0.99}
    assert ema_decay(1, no_warmup) == 0.0  # the first update copies the weights
    assert ema_decay(2, no_warmup) == ema_decay(500, no_warmup) == 0.99
    assert ema_decay(1, TIMM_DEFAULTS) == 0.0
    assert ema_decay(2, TIMM_DEFAULTS) == pytest.approx(1 - 2 ** (-2 / 3))  # 0.370
    assert ema_decay(1001, TIMM_DEFAULTS) == pytest.approx(1 - 1001 ** (-2 / 3))  # 0.990
    assert ema_decay(10**9, TIMM_DEFAULTS) == 0.9998  # capped at decay
    gamma = {**TIMM_DEFAULTS, "warmup_gamma": 10.0, "warmup_power": 0.75}
    for step in (2, 7, 100, 5000):
        assert ema_decay(step, gamma) == pytest.approx(
            reference_decay(step, 0.9998, True, 10, 0.75)
        )


def ckpt(run, step: int) -> checkpoint.Checkpoint:
    return checkpoint.read(run.checkpoints / f"ckpt-{step:08d}.h5")


@pytest.mark.parametrize("warmup", [False, True])
def test_the_average_is_the_recurrence_over_the_recorded_weights(data_dir, warmup):
    """A checkpoint after every step records the weights' trajectory w_1..w_n (BatchNorm
    statistics included); the average must be a_1 = w_1, a_t = d_t a_(t-1) + (1 - d_t) w_t."""
    steps, decay = 6, 0.6
    raw = tiny_config(
        train__steps=steps,
        train__validate_every=0,
        train__checkpoint_every=1,
        train__keep_checkpoints=steps,
        train__ema={"decay": decay, "warmup": warmup},
    )
    result = train(config.resolve({**raw, "name": f"ema_{warmup}"}))
    trajectory = [ckpt(result.run, t).groups["model"] for t in range(1, steps + 1)]
    assert not np.array_equal(trajectory[0][0], trajectory[-1][0])  # the weights moved
    average = [np.asarray(w, np.float64) for w in trajectory[0]]
    for t in range(2, steps + 1):
        d = reference_decay(t, decay, warmup)
        average = [d * a + (1 - d) * w for a, w in zip(average, trajectory[t - 1])]
        saved = ckpt(result.run, t).groups["ema"]
        assert len(saved) == len(average)
        for a, s in zip(average, saved):
            np.testing.assert_allclose(s, a, rtol=1e-5, atol=1e-6)
    # No validation: the average is the model, and best.json says so.
    assert result.run.best() == {"step": steps, "val_recall@1": None, "weights": "ema"}
    assert_weights_file_holds(result.run, raw, ckpt(result.run, steps).groups["ema"])


def assert_weights_file_holds(run, raw: dict, values: list) -> None:
    resolved = config.resolve(raw)
    model = nets.build_embedding_model(resolved["model"], (32, 32), pretrained=False)
    model.load_weights(run.best_weights)
    for kept, weights in zip(values, model.get_weights()):
        np.testing.assert_array_equal(kept, weights)


def test_validation_scores_both_and_best_json_records_the_choice(data_dir):
    raw = tiny_config(
        train__steps=12, train__validate_every=3, train__checkpoint_every=3,
        train__keep_checkpoints=4, train__ema={"decay": 0.8, "warmup": False},
    )  # fmt: skip
    result = train(config.resolve({**raw, "name": "ema_best"}))
    with open(result.run.metrics, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["val_recall@1"]]
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 12]
    scores = {
        int(r["step"]): {"raw": float(r["val_recall@1"]), "ema": float(r["val_recall@1_ema"])}
        for r in rows
    }
    best = result.run.best()
    assert set(best) == {"step", "val_recall@1", "weights"}
    chosen = scores[best["step"]]
    assert best["weights"] == max(chosen, key=lambda k: (chosen[k], k == "raw"))
    assert best["val_recall@1"] == pytest.approx(max(chosen.values()), abs=1e-6)
    assert best["val_recall@1"] == pytest.approx(
        max(max(s.values()) for s in scores.values()), abs=1e-6
    )
    group = "ema" if best["weights"] == "ema" else "model"
    assert_weights_file_holds(result.run, raw, ckpt(result.run, best["step"]).groups[group])


def test_the_better_of_raw_and_average_becomes_the_best(data_dir, monkeypatch):
    """Force each choice: a validation that prefers the average, then one that prefers the
    raw weights."""
    from training import ema

    swapped = []
    real = ema.WeightAverage.swapped_in

    def marked(self):
        swapped.append(True)
        return real(self)

    monkeypatch.setattr(ema.WeightAverage, "swapped_in", marked)
    for prefer, name in ((0.9, "ema"), (0.1, "raw")):
        swapped.clear()
        monkeypatch.setattr(
            "training.image.ImageTask.validation",
            lambda self, chosen, splits, p=prefer: lambda: p if swapped and swapped.pop() else 0.5,
        )
        raw = tiny_config(train__steps=2, train__validate_every=2, train__ema=True)
        result = train(config.resolve({**raw, "name": f"prefer_{name}"}))
        assert result.run.best() == {"step": 2, "val_recall@1": max(prefer, 0.5), "weights": name}


def test_runs_without_the_new_keys_write_what_they_wrote(data_dir):
    raw = tiny_config(train__steps=3, train__validate_every=3)
    result = train(config.resolve({**raw, "name": "plain"}))
    assert set(result.run.best()) == {"step", "val_recall@1"}
    assert "ema" not in ckpt(result.run, 3).groups
    header = result.run.metrics.read_text().splitlines()[0]
    assert "ema" not in header


def backbone_positions(raw: dict) -> list[bool]:
    """For each of the model's weights, whether the backbone holds it."""
    model = nets.build_embedding_model(config.resolve(raw)["model"], (32, 32), pretrained=False)
    inside = {id(w) for w in model.get_layer("backbone").weights}
    return [id(w) in inside for w in model.weights]


def test_frozen_backbone_stays_fixed_then_trains(data_dir):
    frozen, steps = 3, 6
    raw = tiny_config(
        train__steps=steps, train__validate_every=0, train__checkpoint_every=1,
        train__keep_checkpoints=steps, train__freeze_backbone_steps=frozen,
        train__optimizer={"name": "adamw", "lr": 0.003},
    )  # fmt: skip
    result = train(config.resolve({**raw, "name": "frozen"}))
    positions = backbone_positions(raw)
    assert sum(positions) > 4  # convolutions and BatchNorm statistics
    weights = [ckpt(result.run, t).groups["model"] for t in range(1, steps + 1)]

    def moved(t, in_backbone: bool) -> bool:  # did step t + 1 change them?
        pairs = [
            (a, b) for a, b, p in zip(weights[t - 1], weights[t], positions) if p == in_backbone
        ]
        return any(not np.array_equal(a, b) for a, b in pairs)

    # Steps 1..3 (checkpoints 1..3) leave the backbone as it was, statistics included; the head
    # trains. From step 4 on the backbone trains.
    assert not moved(1, True) and not moved(2, True)
    assert moved(1, False) and moved(2, False)
    assert moved(3, True) and moved(4, True)
    built = nets.build_embedding_model(config.resolve(raw)["model"], (32, 32), pretrained=False)
    assert len(built.get_layer("backbone").trainable_weights) > 0  # thawed as it was


@pytest.mark.parametrize(
    "changes",
    [
        {"train__ema": {"decay": 0.7, "warmup": True}},
        {"train__freeze_backbone_steps": 5},
        {"train__freeze_backbone_steps": 3, "train__ema": True},
    ],
)
def test_resume_is_exact(data_dir, changes):
    """A run stopped at step 4 (before the thaw at 5) and resumed to 8 ends where a straight
    run does: weights, optimiser state and averages."""
    raw = tiny_config(train__validate_every=0, train__checkpoint_every=4, **changes)
    straight = train(
        config.resolve({**raw, "name": "straight", "train": {**raw["train"], "steps": 8}})
    )
    first = train(config.resolve({**raw, "name": "resumed", "train": {**raw["train"], "steps": 4}}))
    assert first.step == 4
    resumed = train(
        config.resolve({**raw, "name": "resumed", "train": {**raw["train"], "steps": 8}})
    )
    assert resumed.step == 8
    a, b = ckpt(straight.run, 8), ckpt(resumed.run, 8)
    assert set(a.groups) == set(b.groups)
    for name in a.groups:
        for x, y in zip(a.groups[name], b.groups[name]):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize(
    "raw_change, message",
    [
        ({"train__ema": {"decay": 1.0}}, "train.ema.decay: 1.0 must be less than 1"),
        ({"train__ema": {"decy": 0.9}}, "train.ema.decy: unknown key"),
        ({"train__ema": "yes"}, "train.ema: 'yes' is not a mapping or a boolean"),
        ({"train__freeze_backbone_steps": -1}, "train.freeze_backbone_steps: -1"),
    ],
)
def test_bad_values_are_one_line(raw_change, message):
    with pytest.raises(UserError) as error:
        config.resolve(tiny_config(**raw_change))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_frozen_backbone_without_head_weights_is_refused(data_dir):
    raw = tiny_config(model__head="identity_normalize", train__freeze_backbone_steps=2)
    with pytest.raises(UserError, match="train.freeze_backbone_steps: the head has no weights"):
        train(config.resolve({**raw, "name": "nohead"}))


def test_mirrored_run_averages_and_freezes_alike(tmp_path, tiny_demo):
    """Two replicas (two logical CPU devices, in a fresh process): the averages follow the
    recurrence over the recorded weights and the frozen backbone stays fixed."""
    import shutil

    from runs.folder import RunFolder
    from tests.test_distribute import run_python

    root = tmp_path / "data"
    shutil.copytree(tiny_demo, root / "datasets" / "shapes")
    steps, decay = 4, 0.5
    raw = tiny_config(
        train__steps=steps, train__validate_every=2, train__checkpoint_every=1,
        train__keep_checkpoints=steps, train__distribute="mirrored",
        train__ema={"decay": decay, "warmup": False}, train__freeze_backbone_steps=2,
    )  # fmt: skip
    resolved = config.resolve({**raw, "name": "mirrored_ema"})
    result = run_python(
        f"""
        from training.trainer import train
        result = train({resolved!r})
        print(json.dumps({{"step": result.step, "best": result.best}}))
    """,
        TFCBIR_DATA_DIR=str(root),
    )
    assert result["step"] == steps and result["best"]["weights"] in ("ema", "raw")
    run = RunFolder(root / "trainings" / "mirrored_ema")
    trajectory = [ckpt(run, t).groups["model"] for t in range(1, steps + 1)]
    average = trajectory[0]
    for t in range(2, steps + 1):
        average = [decay * a + (1 - decay) * w for a, w in zip(average, trajectory[t - 1])]
    for a, s in zip(average, ckpt(run, steps).groups["ema"]):
        np.testing.assert_allclose(s, a, rtol=1e-5, atol=1e-6)
    positions = backbone_positions(raw)
    for a, b, p in zip(trajectory[0], trajectory[1], positions):
        if p:
            np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b) for a, b, p in zip(trajectory[1], trajectory[2], positions) if p
    )


def test_dual_encoder_averages_both_towers(data_dir):
    """The average covers the image and the text tower; the choice saves both towers."""
    from tests.test_training_dual import dual_config

    raw = dual_config(
        train__steps=4, train__validate_every=2, train__checkpoint_every=2,
        train__ema={"decay": 0.5, "warmup": False}, train__freeze_backbone_steps=2,
    )  # fmt: skip
    result = train(config.resolve({**raw, "name": "dual_ema"}))
    saved = ckpt(result.run, 4).groups
    assert len(saved["ema"]) == len(saved["model"]) + len(saved["text_model"])
    assert result.run.best()["weights"] in ("ema", "raw")
    assert result.run.best_text_weights.exists()


def test_mixed_precision_averages_and_freezes(data_dir, monkeypatch):
    """The GPU path (mixed_float16, a loss-scaling optimiser) on the CPU by pretending a GPU
    is there: the frozen backbone stays fixed, the averages stay float32."""
    import tensorflow as tf

    real = tf.config.list_physical_devices
    monkeypatch.setattr(
        tf.config,
        "list_physical_devices",
        lambda kind=None: ["GPU:0"] if kind == "GPU" else real(kind),
    )
    raw = tiny_config(
        train__steps=3, train__validate_every=3, train__checkpoint_every=1,
        train__mixed_precision=True, train__ema=True, train__freeze_backbone_steps=2,
    )  # fmt: skip
    result = train(config.resolve({**raw, "name": "mixed_ema"}))
    assert result.step == 3 and np.isfinite(result.loss)
    first, second = ckpt(result.run, 1).groups, ckpt(result.run, 2).groups
    for a, b, p in zip(first["model"], second["model"], backbone_positions(raw)):
        if p:
            np.testing.assert_array_equal(a, b)
    assert all(v.dtype == np.float32 for v in second["ema"])
