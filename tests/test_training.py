"""Training end to end on the tiny demo set: the loss falls, kills resume, bad input is reported."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import config
from tests.conftest import REPO, tiny_config, write_config
from training import checkpoint
from training.optim import WarmupDecay
from training.trainer import train


def read_metrics(run_path):
    with open(run_path / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def run_cli(*args, timeout=240):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def start_training(config_path) -> subprocess.Popen:
    """train.py in the background; its stderr (progress, messages) is readable at the end."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "train.py", "-c", str(config_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_short_run_loss_falls_and_writes_the_run_folder(data_dir, tmp_path):
    raw = tiny_config(train__steps=100, train__validate_every=25)
    result = train(config.resolve({**raw, "name": "falls"}))
    run = result.run
    assert result.step == 100 and not result.interrupted
    rows = read_metrics(run.path)
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    assert [int(r["step"]) for r in rows if r["loss"]] == list(range(1, 101))
    assert np.mean(losses[-25:]) < 0.8 * np.mean(losses[:25])
    recalls = [float(r["val_recall@1"]) for r in rows if r["val_recall@1"]]
    assert len(recalls) == 4  # steps 25, 50, 75, 100
    assert run.best_weights.exists()
    assert run.best()["val_recall@1"] == pytest.approx(max(recalls), abs=1e-6)
    assert max(recalls) > recalls[0]
    assert (run.path / "config.json").exists()
    assert any(p.name.startswith("events") for p in run.logs.rglob("*"))
    steps = [int(p.name[5:13]) for p in checkpoint.list_checkpoints(run.checkpoints)]
    assert steps == [100, 90, 80]  # keep_checkpoints=3


def test_resume_after_kill_continues_at_the_same_step(data_dir, tmp_path):
    raw = tiny_config(train__steps=40, train__checkpoint_every=4, train__validate_every=0)
    path = write_config(tmp_path, "killed", raw)
    process = start_training(path)
    folder = data_dir / "trainings" / "killed" / "checkpoints"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        found = checkpoint.list_checkpoints(folder)
        if found and int(found[0].name[5:13]) >= 8:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    newest = checkpoint.latest(folder)
    assert newest is not None and 8 <= newest.step < 40, "the run was not killed mid-way"

    resumed = run_cli("train.py", "-c", str(path))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and f"from step {newest.step}" in resumed.stderr
    rows = read_metrics(data_dir / "trainings" / "killed")
    assert [int(r["step"]) for r in rows] == list(range(1, 41))

    # The interrupted run ends where an uninterrupted one does.
    straight = train(config.resolve({**raw, "name": "straight"}))
    killed_final = checkpoint.latest(folder)
    straight_final = checkpoint.latest(straight.run.checkpoints)
    assert killed_final.step == straight_final.step == 40
    for a, b in zip(killed_final.groups["model"], straight_final.groups["model"]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    losses_killed = [float(r["loss"]) for r in rows]
    losses_straight = [float(r["loss"]) for r in read_metrics(straight.run.path)]
    np.testing.assert_allclose(losses_killed, losses_straight, rtol=1e-3, atol=1e-4)


def test_sigterm_saves_a_checkpoint_and_restart_starts_over(data_dir, tmp_path):
    raw = tiny_config(train__steps=100000, train__checkpoint_every=100000, train__validate_every=0)
    path = write_config(tmp_path, "term", raw)
    process = start_training(path)
    metrics = data_dir / "trainings" / "term" / "metrics.csv"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) > 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    saved = checkpoint.latest(data_dir / "trainings" / "term" / "checkpoints")
    assert saved is not None and saved.step >= 2
    assert f"interrupted at step {saved.step}" in err

    changed = write_config(
        tmp_path, "term", {**raw, "loss": {"name": "semi_hard_triplet", "margin": 0.5}}
    )
    refused = run_cli("train.py", "-c", str(changed))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
    assert "loss.margin changed since the run" in refused.stderr and "--restart" in refused.stderr


def test_corrupt_images_are_skipped_with_their_names(data_dir, tmp_path):
    shapes = data_dir / "datasets" / "shapes"
    first_class = sorted(p for p in shapes.iterdir() if p.is_dir())[0]
    (first_class / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (first_class / "empty.png").write_bytes(b"")
    path = write_config(tmp_path, "corrupt", tiny_config(train__steps=6, train__validate_every=3))
    done = run_cli("train.py", "-c", str(path))
    assert done.returncode == 0, done.stderr
    assert "broken.jpg" in done.stderr and "empty.png" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("raw_change", "message"),
    [
        ({"data": {"root": "datasets/missing"}}, "data.root"),
        ({"train": {"batch": {"P": 50, "K": 2}}}, "train.batch.P"),
        ({"loss": {"name": "angualr"}}, "loss.name: 'angualr' is not one of"),
    ],
)
def test_cli_reports_bad_input_in_one_line(data_dir, tmp_path, raw_change, message):
    raw = tiny_config()
    raw.update(raw_change)
    path = write_config(tmp_path, "bad", raw)
    done = run_cli("train.py", "-c", str(path))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert "Traceback" not in done.stderr


def test_learning_rate_schedules():
    constant = WarmupDecay(1.0, 100)
    assert float(constant(0)) == pytest.approx(1.0) and float(constant(99)) == pytest.approx(1.0)
    linear = WarmupDecay(1.0, 100, "linear", decay_start=50)
    assert float(linear(50)) == pytest.approx(1.0)
    assert float(linear(75)) == pytest.approx(0.5)
    assert float(linear(100)) == pytest.approx(0.0)
    cosine = WarmupDecay(2.0, 100, "cosine", final_fraction=0.1)
    assert float(cosine(50)) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    warm = WarmupDecay(1.0, 100, warmup_steps=10)
    assert float(warm(0)) == pytest.approx(0.1) and float(warm(9)) == pytest.approx(1.0)
    assert WarmupDecay(**linear.get_config()).get_config() == linear.get_config()


def test_mixed_precision_path_trains_with_loss_scaling(data_dir, monkeypatch):
    """The GPU path (mixed_float16 + loss scaling) run on the CPU by pretending a GPU is there."""
    import keras
    import tensorflow as tf

    real = tf.config.list_physical_devices
    monkeypatch.setattr(
        tf.config,
        "list_physical_devices",
        lambda kind=None: ["GPU:0"] if kind == "GPU" else real(kind),
    )
    raw = tiny_config(train__steps=4, train__validate_every=2, train__mixed_precision=True)
    result = train(config.resolve({**raw, "name": "mixed"}))
    assert keras.mixed_precision.global_policy().name == "float32"  # restored afterwards
    assert result.step == 4 and np.isfinite(result.loss)
    saved = checkpoint.latest(result.run.checkpoints)
    assert len(saved.groups["optimizer"]) > 0
    unmixed = train(
        config.resolve({**tiny_config(train__steps=4, train__validate_every=2), "name": "unmixed"})
    )
    # The loss-scaling optimiser keeps more state (the scale and its counter).
    assert len(saved.groups["optimizer"]) > len(
        checkpoint.latest(unmixed.run.checkpoints).groups["optimizer"]
    )


def test_a_run_saved_before_new_config_keys_resumes(data_dir):
    """A run folder written by an older tfcbir (without today's keys) is not 'changed'."""
    import json

    resolved = config.resolve(
        {**tiny_config(train__steps=2, train__validate_every=0), "name": "older"}
    )
    train(resolved)
    saved = data_dir / "trainings" / "older" / "config.json"
    old = json.loads(saved.read_text())
    del old["train"]["distribute"], old["index"]
    saved.write_text(json.dumps(old))
    again = train(
        config.resolve({**tiny_config(train__steps=3, train__validate_every=0), "name": "older"})
    )
    assert again.step == 3
