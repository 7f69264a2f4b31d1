"""train.distribute: mirrored training on two logical CPU devices equals one-device training.

TensorFlow fixes its devices when it starts, so each case runs in a fresh Python process that
splits the CPU into two logical devices first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import config
from tests.conftest import REPO, tiny_config

PRELUDE = """
import json, os, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, {repo!r})
"""


def run_python(code: str, **env) -> dict:
    script = PRELUDE.format(repo=str(REPO)) + textwrap.dedent(code)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_mirrored_step_equals_the_single_device_step():
    result = run_python("""
        import keras, numpy as np
        import losses
        from training import distribute
        from training.optim import VariableGroup, build_optimizer
        from training.image import make_step

        train_cfg = {
            "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": None,
                          "clipnorm": None},
            "lr_schedule": {"name": "constant", "decay_start": 0, "warmup_steps": 0,
                            "final_lr_fraction": 0.0},
            "steps": 10,
        }
        rng = np.random.default_rng(0)
        images = rng.normal(size=(16, 6)).astype("float32")
        labels = np.repeat(np.arange(4), 4).astype("int32")
        updated = {}
        for name in ("none", "mirrored"):
            strategy = distribute.make_strategy(name)
            with strategy.scope():
                keras.utils.set_random_seed(0)
                model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
                loss_fn = losses.get({"name": "batch_hard_triplet", "margin": 0.5})
                # Two learning rates: the per-variable multiplier works on mirrored variables.
                dense = model.layers[0]
                groups = [VariableGroup("kernel", [dense.kernel], 0.25),
                          VariableGroup("bias", [dense.bias])]
                optimizer = build_optimizer(train_cfg, groups)
            updated["initial"] = [np.asarray(w).tolist() for w in model.weights]
            step = make_step(model, loss_fn, optimizer, groups, strategy, False)
            x, y = distribute.split_per_replica(strategy, tf.constant(images),
                                                tf.constant(labels))
            loss = float(step(x, y))
            updated[name] = {"loss": loss, "replicas": strategy.num_replicas_in_sync,
                             "weights": [np.asarray(w).tolist() for w in model.weights]}
        print(json.dumps(updated))
    """)
    single, mirrored = result["none"], result["mirrored"]
    assert single["replicas"] == 1 and mirrored["replicas"] == 2
    assert mirrored["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert single["weights"] != result["initial"]  # the step did change the weights
    for a, b in zip(single["weights"], mirrored["weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mirrored_dual_encoder_step_equals_the_single_device_step():
    """Both towers and the CLIP temperature: the image-text loss sees the whole batch."""
    result = run_python("""
        import keras, numpy as np
        import losses
        from training import distribute
        from training.dual import make_step
        from training.optim import VariableGroup

        rng = np.random.default_rng(0)
        images = rng.normal(size=(8, 6)).astype("float32")
        tokens = rng.normal(size=(8, 5)).astype("float32")
        labels = np.repeat(np.arange(4), 2).astype("int32")
        pair_groups = np.array([0, 0, 1, 2, 3, 4, 5, 5], dtype="int64")
        updated = {}
        for name in ("none", "mirrored"):
            strategy = distribute.make_strategy(name)
            with strategy.scope():
                keras.utils.set_random_seed(0)
                model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
                text = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4)])
                loss = losses.get_dual({"name": "clip", "temperature": 0.5})
                groups = [VariableGroup("image", model.trainable_variables),
                          VariableGroup("text", text.trainable_variables),
                          VariableGroup("temperature", loss.pair_variables)]
                optimizer = keras.optimizers.SGD(0.5)
                optimizer.build([v for g in groups for v in g.variables])
            step = make_step(model, text, loss, optimizer, groups, strategy, False)
            parts = distribute.split_per_replica(
                strategy, *(tf.constant(v) for v in (images, labels, tokens, pair_groups)))
            total, pair, image = (float(v) for v in step(*parts))
            variables = model.weights + text.weights + loss.weights
            updated[name] = {"loss": total, "replicas": strategy.num_replicas_in_sync,
                             "weights": [np.asarray(w).tolist() for w in variables]}
        print(json.dumps(updated))
    """)
    single, mirrored = result["none"], result["mirrored"]
    assert single["replicas"] == 1 and mirrored["replicas"] == 2
    assert mirrored["loss"] == pytest.approx(single["loss"], rel=1e-5)
    for a, b in zip(single["weights"], mirrored["weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert single["weights"][-1] != pytest.approx(np.log(2.0))  # the temperature trained too


def test_mirrored_training_run(tmp_path, tiny_demo):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_demo, root / "datasets" / "shapes")
    raw = tiny_config(train__steps=6, train__validate_every=3, train__distribute="mirrored")
    resolved = config.resolve({**raw, "name": "mirrored"})
    result = run_python(
        f"""
        import config
        from training.trainer import train
        result = train({resolved!r})
        print(json.dumps({{"step": result.step, "best": result.best}}))
    """,
        TFCBIR_DATA_DIR=str(root),
    )
    assert result["step"] == 6 and result["best"]["step"] in (3, 6)
    assert (root / "trainings" / "mirrored" / "checkpoints" / "ckpt-00000006.h5").exists()


def test_batch_that_cannot_be_split_is_refused(tmp_path, tiny_demo):
    raw = tiny_config(train__distribute="mirrored", train__batch={"P": 3, "K": 4})
    resolved = config.resolve({**raw, "name": "odd"})
    script = PRELUDE.format(repo=str(REPO)) + textwrap.dedent(f"""
        from tfcbir import UserError
        from training.trainer import train
        try:
            train({resolved!r})
        except UserError as error:
            print(json.dumps({{"error": str(error)}}))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TFCBIR_DATA_DIR": str(tmp_path)},
    )
    message = json.loads(done.stdout.strip().splitlines()[-1])["error"]
    assert message.startswith("train.batch.P: 3 classes cannot be split evenly over 2 replicas")


def test_multi_worker_training_on_two_local_workers(tmp_path, tiny_demo):
    """Two train.py processes on this machine form a cluster through TF_CONFIG."""
    import shutil
    import socket

    root = tmp_path / "data"
    shutil.copytree(tiny_demo, root / "datasets" / "shapes")
    raw = tiny_config(train__steps=6, train__validate_every=3, train__distribute="multi_worker")
    path = tmp_path / "workers.json"
    path.write_text(json.dumps(raw))
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    workers = []
    for index in range(2):
        cluster = {
            "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
            "task": {"type": "worker", "index": index},
        }
        env = {**os.environ, "TF_CONFIG": json.dumps(cluster), "TFCBIR_DATA_DIR": str(root)}
        workers.append(
            subprocess.Popen(
                [sys.executable, "train.py", "-c", str(path)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (_out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    assert "2 replica(s)" in outputs[0][1]
    run = root / "trainings" / "workers"
    assert (run / "checkpoints" / "ckpt-00000006.h5").exists()
    assert (run / "best.weights.h5").exists()
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2", "3", "4", "5", "6"]
