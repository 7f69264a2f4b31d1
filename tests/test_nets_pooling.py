"""model.pooling (average, max, average + max, GeM) and model.freeze_batchnorm, on small_cnn.

The pooling layers are checked against NumPy formulas (GeM's gradient in p against a finite
difference), the default against the model old runs saved, and both keys end to end: training
moves what it should, and a resumed run ends where a straight one does.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import config  # noqa: E402
import nets  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tfcbir import UserError  # noqa: E402

SMALL = {"backbone": "small_cnn", "weights": "none", "head": "direct", "embedding_dim": 8}


def numpy(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def feature_map(seed=0, shape=(3, 4, 5, 6)) -> np.ndarray:
    """Features ``(B, H, W, C)`` with negatives and exact zeros (a ReLU's output has zeros)."""
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    x[0, 0, 0, :] = 0.0
    return x


def gem_numpy(x: np.ndarray, p: float, eps: float = 1e-6) -> np.ndarray:
    """GeM in float64: (mean over H, W of max(x, eps)^p)^(1/p), ``(B, H, W, C) -> (B, C)``."""
    clamped = np.maximum(x.astype(np.float64), eps)
    return np.mean(clamped**p, axis=(1, 2)) ** (1.0 / p)


# --- the layers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1.0, 3.0, 7.5])
def test_gem_is_the_generalised_mean_of_the_clamped_features(p):
    x = feature_map()
    layer = nets.GeneralizedMeanPooling(p=p)
    np.testing.assert_allclose(numpy(layer(x)), gem_numpy(x, p), rtol=1e-5, atol=1e-7)
    assert float(numpy(layer.p)) == p and len(layer.trainable_weights) == 1
    # p = 1 on positive features is average pooling.
    positive = np.abs(x) + 0.1
    np.testing.assert_allclose(
        numpy(nets.GeneralizedMeanPooling(p=1.0)(positive)), positive.mean(axis=(1, 2)), rtol=1e-5
    )


def test_gem_gradient_in_p_matches_a_finite_difference():
    import tensorflow as tf

    x = np.abs(feature_map(1)) + 0.05
    weights = np.random.default_rng(2).normal(size=(3, 6))  # a linear read-out of the pooled
    layer = nets.GeneralizedMeanPooling(p=3.0)
    with tf.GradientTape() as tape:
        objective = tf.reduce_sum(layer(x) * weights.astype(np.float32))
    (grad,) = tape.gradient(objective, [layer.p])
    h = 1e-5
    numeric = (
        np.sum(gem_numpy(x, 3.0 + h) * weights) - np.sum(gem_numpy(x, 3.0 - h) * weights)
    ) / (2 * h)
    assert float(numpy(grad)) == pytest.approx(numeric, rel=1e-3)
    assert abs(numeric) > 1e-3  # the check is not one of zeros


def test_gem_stays_finite_on_zeros_and_under_mixed_precision():
    import tensorflow as tf

    x = np.zeros((2, 3, 3, 4), np.float32)
    layer = nets.GeneralizedMeanPooling()
    with tf.GradientTape() as tape:
        out = layer(x)
        total = tf.reduce_sum(out)
    np.testing.assert_allclose(numpy(out), 1e-6, rtol=1e-4)
    assert np.isfinite(numpy(tape.gradient(total, layer.p)))
    half = nets.GeneralizedMeanPooling(dtype="mixed_float16")
    big = np.full((1, 2, 2, 3), 60.0, np.float16)  # 60^3 overflows float16, 60 does not
    np.testing.assert_allclose(numpy(half(big)).astype(np.float32), 60.0, rtol=1e-3)


def test_average_max_pooling_is_the_sum_of_both():
    x = feature_map()
    expected = x.mean(axis=(1, 2)) + x.max(axis=(1, 2))
    np.testing.assert_allclose(numpy(nets.AverageMaxPooling()(x)), expected, rtol=1e-6)


def test_pooling_layers_serialise(tmp_path):
    for layer in (nets.GeneralizedMeanPooling(p=2.5, eps=1e-4), nets.AverageMaxPooling()):
        again = keras.layers.deserialize(keras.layers.serialize(layer))
        assert type(again) is type(layer) and again.get_config() == layer.get_config()
    model = nets.build_embedding_model({**SMALL, "pooling": "gem"}, (32, 32))
    model.get_layer("pooling").p.assign(2.0)
    path = tmp_path / "gem.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(numpy(loaded(x)), numpy(model(x)), atol=1e-6)
    assert float(numpy(loaded.get_layer("pooling").p)) == 2.0


# --- the model -----------------------------------------------------------------------------------


def test_default_pooling_is_the_backbones_own_average_layer_for_layer():
    """avg builds the model of old runs: no "pooling" layer, the backbone ends with its
    avg_pool, and the weights are, name for name, those of the model tfcbir built before
    model.pooling existed (so its best.weights.h5 files load)."""
    model = nets.build_embedding_model({**SMALL, "pooling": "avg"}, (32, 32))
    assert [layer.name for layer in model.layers] == [
        "images",
        "preprocess",
        "backbone",
        "head_projection",
    ]
    assert model.get_layer("backbone").layers[-1].name == "avg_pool"
    before_pooling = [  # the weight paths of this model before model.pooling
        path
        for block in range(1, 5)
        for path in [f"block{block}_conv/kernel"]
        + [
            f"block{block}_bn/{name}"
            for name in ("gamma", "beta", "moving_mean", "moving_variance")
        ]
    ] + ["head_projection/kernel", "head_projection/bias"]
    assert [w.path for w in model.weights] == before_pooling
    assert [w.path for w in nets.build_embedding_model(SMALL, (32, 32)).weights] == before_pooling


@pytest.mark.parametrize("pooling", ["max", "avgmax", "gem"])
def test_each_pooling_pools_the_backbones_feature_map(pooling):
    model = nets.build_embedding_model({**SMALL, "pooling": pooling}, (32, 32))
    backbone = model.get_layer("backbone")
    assert backbone.output.shape[1:] == (4, 4, 128)  # the feature map, unpooled
    assert model.output_shape == (None, 8)
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    maps = numpy(backbone(model.get_layer("preprocess")(x), training=False))
    pooled = numpy(model.get_layer("pooling")(maps))
    expected = {
        "max": maps.max(axis=(1, 2)),
        "avgmax": maps.mean(axis=(1, 2)) + maps.max(axis=(1, 2)),
        "gem": gem_numpy(maps, 3.0),
    }[pooling]
    np.testing.assert_allclose(pooled, expected, rtol=1e-4, atol=1e-6)


def test_a_backbone_weights_file_fits_every_pooling(tmp_path):
    """model.weights: a backbone saved from one pooling loads into another (same layers)."""
    gem = nets.build_embedding_model({**SMALL, "pooling": "gem"}, (32, 32))
    path = str(tmp_path / "backbone.weights.h5")
    gem.get_layer("backbone").save_weights(path)
    for pooling in ("avg", "max"):
        other = nets.build_embedding_model({**SMALL, "pooling": pooling, "weights": path}, (32, 32))
        for a, b in zip(other.get_layer("backbone").weights, gem.get_layer("backbone").weights):
            np.testing.assert_array_equal(numpy(a), numpy(b))


@pytest.mark.parametrize(
    "model, message",
    [
        ({"pooling": "sum"}, r"^model\.pooling: .*avg, max, avgmax, gem"),
        ({"backbone": "hub:dinov2_small", "pooling": "gem"}, r"^model\.pooling: gem, but hub:"),
        (
            {"backbone": "hub:dinov2_small", "freeze_batchnorm": True},
            r"^model\.freeze_batchnorm: hub:dinov2_small has no BatchNormalization",
        ),
        ({"freeze_batchnorm": "yes"}, r"^model\.freeze_batchnorm: "),
    ],
)
def test_bad_pooling_values_are_one_line_errors(model, message):
    with pytest.raises(UserError, match=message) as caught:
        config.resolve({"data": {"root": "x"}, "model": model})
    assert "\n" not in str(caught.value)


def test_model_hash_changes_with_pooling_but_not_at_its_default():
    base = config.resolve({"data": {"root": "x"}, "model": {"backbone": "small_cnn"}})
    avg = config.resolve(
        {"data": {"root": "x"}, "model": {"backbone": "small_cnn", "pooling": "avg"}}
    )
    gem = config.resolve(
        {"data": {"root": "x"}, "model": {"backbone": "small_cnn", "pooling": "gem"}}
    )
    frozen = config.resolve(
        {"data": {"root": "x"}, "model": {"backbone": "small_cnn", "freeze_batchnorm": True}}
    )
    assert config.model_hash(base) == config.model_hash(avg) == config.model_hash(frozen)
    assert config.model_hash(gem) != config.model_hash(base)


# --- training ------------------------------------------------------------------------------------


def _train_steps(params: dict, steps: int):
    """``steps`` SGD steps of the trainer's step function on small_cnn with ``params``; returns
    the model and its weights before training (by path)."""
    import tensorflow as tf

    import losses
    from training.image import make_step
    from training.optim import build_optimizer, trainable_groups

    keras.utils.set_random_seed(0)
    model = nets.build_embedding_model({**SMALL, **params}, (32, 32))
    before = {w.path: numpy(w).copy() for w in model.weights}
    train_cfg = config.resolve(tiny_config())["train"]
    train_cfg["optimizer"] = {**train_cfg["optimizer"], "name": "sgd", "lr": 0.1}
    loss_fn = losses.get({"name": "contrastive"})
    groups = trainable_groups(model, loss_fn, [], train_cfg)
    optimizer = build_optimizer(train_cfg, groups)
    step = make_step(model, loss_fn, optimizer, groups, tf.distribute.get_strategy(), False)
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(4), 2)
    for _ in range(steps):
        step(tf.constant(images), tf.constant(labels))
    return model, before


def test_frozen_batchnorm_keeps_statistics_and_affine_while_the_rest_trains():
    model, before = _train_steps({"freeze_batchnorm": True}, 3)
    backbone = model.get_layer("backbone")
    norms = [
        layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert len(norms) == 4 and not any(layer.trainable for layer in norms)
    for layer in norms:  # gamma, beta, moving mean and variance
        for w in layer.weights:
            np.testing.assert_array_equal(numpy(w), before[w.path], err_msg=w.path)
    # Kernels (a distance loss gives the head's bias next to no gradient: it shifts every row).
    for w in backbone.trainable_weights + [model.get_layer("head_projection").kernel]:
        assert np.abs(numpy(w) - before[w.path]).max() > 1e-6, w.path
    # Inference mode whatever the flag: training and inference features agree.
    x = model.get_layer("preprocess")(np.zeros((2, 32, 32, 3), np.uint8) + 100)
    np.testing.assert_allclose(
        numpy(backbone(x, training=True)), numpy(backbone(x, training=False)), atol=1e-6
    )
    # Without the key the same steps move BatchNorm's statistics and affine.
    model, before = _train_steps({}, 3)
    moved = [
        np.abs(numpy(w) - before[w.path]).max()
        for w in model.get_layer("backbone").weights
        if "_bn" in w.path
    ]
    assert min(moved) > 1e-6


def test_gem_p_trains_with_the_head():
    model, before = _train_steps({"pooling": "gem"}, 3)
    p = model.get_layer("pooling").p
    assert abs(float(numpy(p)) - 3.0) > 1e-5


def test_a_run_with_gem_and_frozen_batchnorm_resumes_exactly(data_dir):
    from runs import checkpoint
    from training.trainer import train

    def run(steps: int, name: str) -> dict:
        raw = tiny_config(
            model__pooling="gem",
            model__freeze_batchnorm=True,
            train__steps=steps,
            train__checkpoint_every=2,
            train__validate_every=0,
        )
        return config.resolve({**raw, "name": name})

    train(run(2, "gem_resumed"))
    resumed = train(run(4, "gem_resumed"))
    straight = train(run(4, "gem_straight"))
    assert resumed.step == straight.step == 4
    a = checkpoint.latest(resumed.run.checkpoints)
    b = checkpoint.latest(straight.run.checkpoints)
    for group in ("model", "optimizer"):
        assert len(a.groups[group]) == len(b.groups[group])
        for x, y in zip(a.groups[group], b.groups[group]):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_a_run_saved_before_these_keys_resumes(data_dir):
    """A run folder whose config has no model.pooling, model.freeze_batchnorm or
    train.optimizer.layer_decay (written before they existed) resumes: it is not 'changed'."""
    import json

    from training.trainer import train

    raw = tiny_config(train__steps=2, train__validate_every=0)
    train(config.resolve({**raw, "name": "before_pooling"}))
    saved = data_dir / "trainings" / "before_pooling" / "config.json"
    old = json.loads(saved.read_text())
    del old["model"]["pooling"], old["model"]["freeze_batchnorm"]
    del old["train"]["optimizer"]["layer_decay"]
    saved.write_text(json.dumps(old))
    again = train(
        config.resolve(
            {**tiny_config(train__steps=3, train__validate_every=0), "name": "before_pooling"}
        )
    )
    assert again.step == 3
