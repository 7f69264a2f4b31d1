"""Training end to end on the tiny demo set: the run folder, resume after kill, bad input."""

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
from runs import checkpoint
from tests.conftest import REPO, tiny_config, write_config
from tfcbir import UserError
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


def test_short_run_writes_the_run_folder_and_keeps_the_best_model(data_dir, tmp_path):
    """The run folder's files and the best-model bookkeeping; that losses learn is checked by
    tests/test_losses_training.py with a margin measured across seeds."""
    raw = tiny_config(train__steps=40, train__validate_every=10, train__keep_checkpoints=4)
    resolved = config.resolve({**raw, "name": "short"})
    result = train(resolved)
    run = result.run
    assert result.step == 40 and not result.interrupted
    rows = read_metrics(run.path)
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    assert [int(r["step"]) for r in rows if r["loss"]] == list(range(1, 41))
    assert all(np.isfinite(losses)) and result.loss == pytest.approx(losses[-1], rel=1e-5)
    validated = [(int(r["step"]), float(r["val_recall@1"])) for r in rows if r["val_recall@1"]]
    assert [step for step, _ in validated] == [10, 20, 30, 40]
    assert all(0.0 <= recall <= 1.0 for _, recall in validated)
    # best.json names the first step with the highest validation Recall@1, and best.weights.h5
    # holds that step's weights (checkpoints are kept at every 10th step: compare them).
    best_step, best_recall = max(validated, key=lambda item: (item[1], -item[0]))
    assert run.best() == {"step": best_step, "val_recall@1": pytest.approx(best_recall, abs=1e-6)}
    saved = checkpoint.read(run.checkpoints / f"ckpt-{best_step:08d}.h5")
    import nets

    model = nets.build_embedding_model(resolved["model"], (32, 32), pretrained=False)
    model.load_weights(run.best_weights)
    for kept, weights in zip(saved.groups["model"], model.get_weights()):
        np.testing.assert_array_equal(kept, weights)
    assert (run.path / "config.json").exists()
    assert any(p.name.startswith("events") for p in run.logs.rglob("*"))
    steps = [int(p.name[5:13]) for p in checkpoint.list_checkpoints(run.checkpoints)]
    assert steps == [40, 30, 20, 10]  # keep_checkpoints


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
    # No test split: every image is decoded by training or its validation, which name failures.
    raw = tiny_config(train__steps=6, train__validate_every=3, data__split={"by": "none"})
    path = write_config(tmp_path, "corrupt", raw)
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


@pytest.mark.parametrize(("name", "decay"), [("sgd", None), ("adam", None), ("adamw", 0.05)])
def test_variable_groups_train_as_one_optimiser_per_learning_rate(name, decay):
    """One optimiser with groups at 0.1x, 1x and 100x the rate takes the steps that three keras
    optimisers at those rates take (momentum, Adam's moments and decoupled weight decay
    included): the group mechanism is discriminative learning rates, nothing else."""
    import keras

    from training.optim import VariableGroup, build_optimizer

    train_cfg = config.resolve(tiny_config())["train"]
    train_cfg["optimizer"] = {
        **train_cfg["optimizer"],
        "name": name,
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": decay,
    }
    rng = np.random.default_rng(0)
    start = [rng.normal(size=(3, 2)).astype("float32") for _ in range(3)]
    grads = [[rng.normal(size=(3, 2)).astype("float32") for _ in range(3)] for _ in range(3)]
    multipliers = (0.1, 1.0, 100.0)

    grouped = [keras.Variable(v) for v in start]
    optimizer = build_optimizer(
        train_cfg,
        [VariableGroup(str(m), [v], m) for v, m in zip(grouped, multipliers)],
    )
    separate = [keras.Variable(v) for v in start]
    optimizers = []
    for m in multipliers:
        common = {"learning_rate": 0.01 * m}
        if name == "sgd":
            optimizers.append(keras.optimizers.SGD(momentum=0.9, **common))
        elif name == "adam":
            optimizers.append(keras.optimizers.Adam(**common))
        else:
            optimizers.append(keras.optimizers.AdamW(weight_decay=decay, **common))
    for step in grads:
        optimizer.apply_gradients(zip(step, grouped))
        for g, v, single in zip(step, separate, optimizers):
            single.apply_gradients([(g, v)])
    for a, b, v0 in zip(grouped, separate, start):
        assert np.abs(b.numpy() - v0).max() > 1e-4
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


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
    # The loss-scaling optimiser's state is saved: its current scale among the variables.
    assert any(np.ndim(v) == 0 and float(v) == 2.0**15 for v in saved.groups["optimizer"])


def test_train_sets_back_the_precision_policy_it_found(data_dir, monkeypatch):
    """A mixed-precision run sets mixed_float16 for itself and then the global policy it found
    (not float32 whatever it found), after a finished run and after an error alike."""
    import keras
    import tensorflow as tf

    real = tf.config.list_physical_devices
    monkeypatch.setattr(
        tf.config,
        "list_physical_devices",
        lambda kind=None: ["GPU:0"] if kind == "GPU" else real(kind),
    )
    raw = tiny_config(train__steps=2, train__validate_every=0, train__mixed_precision=True)
    keras.mixed_precision.set_global_policy("float64")
    try:
        result = train(config.resolve({**raw, "name": "policy"}))
        assert keras.mixed_precision.global_policy().name == "float64"
        saved = checkpoint.latest(result.run.checkpoints)
        # It trained in mixed precision: the loss-scaling optimiser's scale is saved.
        assert any(np.ndim(v) == 0 and float(v) == 2.0**15 for v in saved.groups["optimizer"])
        # A run that fails after the policy was set: its newest checkpoint does not fit.
        checkpoint.save(result.run.checkpoints, 3, {"model": [np.zeros(3)]}, {}, keep=10)
        with pytest.raises(UserError, match="does not fit the model"):
            train(config.resolve({**raw, "name": "policy"}))
        assert keras.mixed_precision.global_policy().name == "float64"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_precision_scales_the_loss_and_unscales_the_gradients():
    """One SGD step in mixed_float16 with dynamic loss scaling moves the weights as the float32
    step does: the loss is multiplied by the scale (2^15) before the float16 backward pass, and
    the gradients divided by it before the update (a missing unscale would move them 32768 times
    farther, a missing scale would underflow the float16 gradients)."""
    import keras
    import tensorflow as tf

    import losses
    import nets
    from training.image import make_step
    from training.optim import VariableGroup, build_optimizer

    train_cfg = config.resolve(tiny_config())["train"]
    train_cfg["optimizer"] = {**train_cfg["optimizer"], "name": "sgd", "momentum": 0.0, "lr": 0.05}
    model_cfg = {"backbone": "small_cnn", "weights": "none", "head": "direct", "embedding_dim": 8}
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    labels = tf.constant(np.repeat(np.arange(4), 2))
    keras.utils.set_random_seed(0)
    initial = nets.build_embedding_model(model_cfg, (16, 16)).get_weights()

    def one_step(mixed: bool):
        keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
        try:
            model = nets.build_embedding_model(model_cfg, (16, 16))
            model.set_weights(initial)
            groups = [VariableGroup("model", list(model.trainable_variables))]
            optimizer = build_optimizer(train_cfg, groups, mixed=mixed)
            loss_fn = losses.get({"name": "contrastive"})
            step = make_step(model, loss_fn, optimizer, groups, tf.distribute.get_strategy(), mixed)
            loss = float(step(images, labels))
            kernel = model.get_layer("head_projection").kernel
            return loss, keras.ops.convert_to_numpy(kernel) - initial[-2], optimizer
        finally:
            keras.mixed_precision.set_global_policy("float32")

    loss32, delta32, _ = one_step(mixed=False)
    loss16, delta16, optimizer = one_step(mixed=True)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    assert float(optimizer.dynamic_scale) == 2.0**15  # scaling was on, and no step overflowed
    assert loss16 == pytest.approx(loss32, rel=0.02)  # the reported loss is the unscaled one
    assert np.abs(delta32).max() > 1e-4  # the step moved the head
    ratio = np.linalg.norm(delta16) / np.linalg.norm(delta32)
    assert 0.9 < ratio < 1.1, ratio
    cosine = np.sum(delta16 * delta32) / (np.linalg.norm(delta16) * np.linalg.norm(delta32))
    assert cosine > 0.99


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


def test_model_selection_uses_a_holdout_never_the_test_split(data_dir, caplog):
    """The default validation images are held out of training, and the run records it."""
    import json

    raw = tiny_config(train__steps=4, train__validate_every=2)
    result = train(config.resolve({**raw, "name": "held"}))
    saved = json.loads((result.run.path / "config.json").read_text())
    assert saved["train"]["validation"]["source"] == "holdout"
    assert result.best is not None and result.best["val_recall@1"] is not None

    raw_test = tiny_config(train__steps=2, train__validate_every=2)
    raw_test["train"]["validation"] = {"source": "test"}
    with caplog.at_level("WARNING", logger="tfcbir"):
        tested = train(config.resolve({**raw_test, "name": "on_test"}))
    assert any("optimistic" in r.getMessage() for r in caplog.records)
    saved = json.loads((tested.run.path / "config.json").read_text())
    assert saved["train"]["validation"]["source"] == "test"
    # Resuming with the default source is a change: the model would be chosen on other images.
    raw_test["train"]["validation"] = {"source": "auto"}
    with pytest.raises(UserError, match="train.validation.source changed"):
        train(config.resolve({**raw_test, "name": "on_test"}))


@pytest.mark.parametrize("name", ["proxy_anchor", "arcface"])
def test_per_class_losses_learn_vectors_of_training_classes_only(data_dir, name):
    """6 classes, 3 of them test classes and 1 held out for validation: 2 vectors, not 6."""
    raw = tiny_config(
        train__steps=2,
        train__validate_every=2,
        train__checkpoint_every=2,
        loss={"name": name},
        train__batch={"P": 2, "K": 4},
        data__split={"by": "classes", "train_classes": 0.5},
        train__validation={"holdout": 0.3},
    )
    result = train(config.resolve({**raw, "name": f"classes_{name}"}))
    vectors = checkpoint.latest(result.run.checkpoints).groups["loss"]
    assert [v.shape for v in vectors] == [(2, 16)]


@pytest.mark.parametrize(
    ("loss", "normalized"),
    [({"name": "ntxent"}, True), ({"name": "contrastive", "metric": "euclidean"}, False)],
)
def test_validation_and_search_use_the_geometry_the_loss_trained(
    data_dir, monkeypatch, loss, normalized
):
    """A direct (unnormalised) head: a loss on angles is validated and searched by cosine on unit
    vectors, a Euclidean loss by Euclidean distance on the raw embeddings."""
    from retrieval.embedder import load_embedder
    from training import validation

    seen = []
    real = validation.Validator

    def spy(*args, **kwargs):
        seen.append(kwargs["normalized"])
        return real(*args, **kwargs)

    monkeypatch.setattr(validation, "Validator", spy)
    raw = tiny_config(train__steps=2, train__validate_every=2, loss=loss)
    raw["model"]["head"] = "direct"
    resolved = config.resolve({**raw, "name": f"geometry_{loss['name']}"})
    train(resolved)
    assert seen == [normalized]
    embedder = load_embedder(resolved)
    assert embedder.normalized is normalized
    pixels = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    norms = np.linalg.norm(embedder.embed_pixels(pixels), axis=1)
    if normalized:
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    else:
        assert np.abs(norms - 1.0).max() > 1e-2  # raw embeddings, as the loss saw them


def test_leave_one_out_validation_samples_whole_classes(tmp_path):
    """A capped leave-one-out validation set keeps whole classes of two images or more, so no
    sampled image lacks classmates (a sample of images would leave mostly singletons)."""
    from datasets.lists import ImageList
    from training.validation import _sample

    labels = np.repeat(np.arange(40), 3)
    labels = np.concatenate([labels, [40, 41]])  # two single-image classes
    images = ImageList(tmp_path, [f"{i}.png" for i in range(len(labels))], labels, list("x" * 42))
    sampled = _sample(images, 20, seed=0, by_class=True)
    counts = np.bincount(sampled.labels)
    assert 18 <= len(sampled) <= 20 and set(counts[counts > 0]) == {3}
    assert _sample(images, 20, seed=0, by_class=True).paths == sampled.paths  # seeded
    assert len(_sample(images, 20, seed=0)) == 20  # plain image sample otherwise


def test_validation_images_all_unreadable_is_one_line(tmp_path):
    from datasets.lists import ImageList
    from training.validation import DecodedImages

    for name in ("a.jpg", "b.png"):
        (tmp_path / name).write_bytes(b"not an image")
    images = ImageList(tmp_path, ["a.jpg", "b.png"], [0, 1], ["x", "y"])
    data = config.resolve(tiny_config())["data"]
    with pytest.raises(UserError) as error:
        DecodedImages(images, data)
    message = str(error.value)
    assert "none of the 2 validation images can be read" in message
    assert str(tmp_path / "a.jpg") in message and "train.validate_every: 0" in message
    assert "\n" not in message
