"""The image-text losses (clip, siglip) against NumPy loops over their formulas (values in float32
and float64, gradients against finite differences of the loops), NumPy transcriptions of
open_clip's ClipLoss and big_vision's sigmoid loss, tiny cases by hand, the clamped temperature,
the weighted image loss, and O(B^2) memory."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import losses
from losses.clip import ClipLoss
from losses.siglip import SigLipLoss
from tfcbir import UserError

# --- the formulas, as loops over pairs in float64 ---------------------------------------------


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def allowed(groups, i, j):
    return i == j or groups[i] != groups[j]


def ref_clip(x, y, groups, scale):
    """1/2 mean_i CE(image i -> its text) + 1/2 mean_j CE(text j -> its image), pairs of one
    group (i != j) left out of the softmax."""
    s = scale * unit(x) @ unit(y).T
    n = len(groups)
    rows = [
        np.log(sum(np.exp(s[i, j]) for j in range(n) if allowed(groups, i, j))) - s[i, i]
        for i in range(n)
    ]
    cols = [
        np.log(sum(np.exp(s[i, j]) for i in range(n) if allowed(groups, i, j))) - s[j, j]
        for j in range(n)
    ]
    return 0.5 * np.mean(rows) + 0.5 * np.mean(cols)


def ref_siglip(x, y, groups, t, b):
    """1/B sum over allowed pairs of -log sigmoid(z_ij (t x_i.y_j + b))."""
    s = unit(x) @ unit(y).T
    n = len(groups)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if allowed(groups, i, j):
                z = 1.0 if i == j else -1.0
                total += -np.log(1.0 / (1.0 + np.exp(-z * (t * s[i, j] + b))))
    return total / n


# --- NumPy transcriptions of the reference implementations -----------------------------------


def open_clip_loss(image_features, text_features, logit_scale):
    """open_clip/loss.py ClipLoss.forward (one process): the model normalises the features."""
    image_features, text_features = unit(image_features), unit(text_features)
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    labels = np.arange(logits_per_image.shape[0])

    def cross_entropy(logits, labels):  # F.cross_entropy, mean reduction
        logits = logits - logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return -log_probs[np.arange(len(labels)), labels].mean()

    return (cross_entropy(logits_per_image, labels) + cross_entropy(logits_per_text, labels)) / 2


def big_vision_sigmoid_loss(zimg, ztxt, t, b):
    """big_vision/trainers/proj/image_text/siglip.py loss_fn (t = exp(t'), already applied)."""
    zimg, ztxt = unit(zimg), unit(ztxt)
    logits = np.dot(zimg, ztxt.T)
    logits = logits * t + b
    eye = np.eye(zimg.shape[0])
    m1_diag1 = -np.ones_like(logits) + 2 * eye
    loglik = -np.logaddexp(0.0, -(m1_diag1 * logits))  # jax.nn.log_sigmoid
    nll = -np.sum(loglik, axis=-1)
    return np.mean(nll)


def batch(B=8, D=6, seed=0, groups="some"):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(B, D)), rng.normal(size=(B, D))
    if groups == "distinct":
        g = np.arange(B)
    else:  # a few pairs share a group (same image or class)
        g = rng.integers(0, B // 2 + 1, B)
    return x, y, g.astype(np.int64)


def make(name, dtype="float32", **params):
    return {"clip": ClipLoss, "siglip": SigLipLoss}[name](dtype=dtype, **params)


def tf_value(loss, x, y, g):
    return float(loss(tf.constant(x), tf.constant(y), tf.constant(g)))


# --- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_matches_its_formula_and_open_clip(seed):
    x, y, g = batch(seed=seed)
    for dtype, rtol in (("float64", 1e-10), ("float32", 1e-5)):
        loss = make("clip", dtype)
        scale = 1 / 0.07
        assert tf_value(loss, x.astype(dtype), y.astype(dtype), g) == pytest.approx(
            ref_clip(x, y, g, scale), rel=rtol
        )
    # Without pairs of one group: open_clip's ClipLoss, at any logit scale.
    x, y, g = batch(seed=seed, groups="distinct")
    loss = make("clip", "float64", temperature=0.5)
    expected = open_clip_loss(x, y, 2.0)
    assert tf_value(loss, x, y, g) == pytest.approx(expected, rel=1e-10)
    assert ref_clip(x, y, g, 2.0) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_siglip_matches_its_formula_and_big_vision(seed):
    x, y, g = batch(seed=seed)
    for dtype, rtol in (("float64", 1e-10), ("float32", 1e-5)):
        loss = make("siglip", dtype)
        assert tf_value(loss, x.astype(dtype), y.astype(dtype), g) == pytest.approx(
            ref_siglip(x, y, g, 10.0, -10.0), rel=rtol
        )
    x, y, g = batch(seed=seed, groups="distinct")
    loss = make("siglip", "float64", logit_scale=3.0, bias=-1.5)
    expected = big_vision_sigmoid_loss(x, y, 3.0, -1.5)
    assert tf_value(loss, x, y, g) == pytest.approx(expected, rel=1e-10)
    assert ref_siglip(x, y, g, 3.0, -1.5) == pytest.approx(expected, rel=1e-10)


def test_by_hand():
    e = np.eye(2)
    distinct, together = np.array([0, 1]), np.array([4, 4])
    # CLIP at temperature 1: logits = I; each direction log(e^1 + e^0) - 1 = log(1 + e^-1).
    clip = make("clip", "float64", temperature=1.0)
    assert tf_value(clip, e, e, distinct) == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-12)
    # One group: the other pair is left out, only the matching logit remains: log e^1 - 1 = 0.
    assert tf_value(clip, e, e, together) == pytest.approx(0.0, abs=1e-12)
    # Swapped texts at temperature 1: each image prefers the wrong text: log(1 + e) - 0.
    assert tf_value(clip, e, e[::-1].copy(), distinct) == pytest.approx(
        math.log(1 + math.e), rel=1e-12
    )
    # SigLIP, t = 10, b = -10: matching logits 0 (log 2 each), the others -10 (log(1 + e^-10)),
    # summed per image and averaged over the 2 images.
    siglip = make("siglip", "float64")
    assert tf_value(siglip, e, e, distinct) == pytest.approx(
        math.log(2) + math.log1p(math.exp(-10)), rel=1e-12
    )
    assert tf_value(siglip, e, e, together) == pytest.approx(math.log(2), rel=1e-12)
    # Unnormalised inputs are normalised first.
    assert tf_value(clip, 3 * e, 0.5 * e, distinct) == pytest.approx(
        math.log(1 + math.exp(-1)), rel=1e-12
    )


# --- gradients --------------------------------------------------------------------------------


def numeric_gradient(f, x, h=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = h
        grad[index] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_gradients_match_finite_differences(name):
    x, y, g = batch(B=6, D=4, seed=5)
    loss = make(name, "float64", **({"temperature": 0.3} if name == "clip" else {}))
    tx, ty = tf.constant(x), tf.constant(y)
    with tf.GradientTape() as tape:
        tape.watch([tx, ty])
        value = loss(tx, ty, tf.constant(g))
    variables = loss.trainable_variables
    grads = tape.gradient(value, [tx, ty, *variables])

    if name == "clip":
        params = [math.log(1 / 0.3)]

        def ref(xx, yy, log_scale=params[0]):
            return ref_clip(xx, yy, g, math.exp(log_scale))

    else:
        params = [math.log(10.0), -10.0]

        def ref(xx, yy, log_t=params[0], b=params[1]):
            return ref_siglip(xx, yy, g, math.exp(log_t), b)

    np.testing.assert_allclose(grads[0], numeric_gradient(lambda v: ref(v, y), x), atol=1e-7)
    np.testing.assert_allclose(grads[1], numeric_gradient(lambda v: ref(x, v), y), atol=1e-7)
    for k, variable_grad in enumerate(grads[2:]):

        def shifted(v, k=k):
            values = list(params)
            values[k] = float(v[0])
            return ref(x, y, *values)

        expected = numeric_gradient(shifted, np.array([params[k]]))[0]
        assert float(variable_grad) == pytest.approx(expected, rel=1e-6, abs=1e-9)


# --- temperature, bias and their training -----------------------------------------------------


def test_initial_values_and_the_clamp_at_100():
    clip = losses.get({"name": "clip"})
    assert clip.logit_scale == pytest.approx(1 / 0.07)
    siglip = losses.get({"name": "siglip"})
    assert siglip.logit_scale == pytest.approx(10.0)
    assert float(siglip.bias) == -10.0
    assert len(siglip.trainable_variables) == 2 and len(clip.trainable_variables) == 1

    # An optimiser that pushes the scale far up stops at 100 (open_clip's clamp after a step).
    x, y, g = batch(seed=3, groups="distinct")
    optimizer = keras.optimizers.SGD(50.0)
    for _ in range(3):
        with tf.GradientTape() as tape:
            value = -clip(tf.constant(x, tf.float32), tf.constant(y, tf.float32), g)
        optimizer.apply_gradients(
            zip(tape.gradient(value, clip.trainable_variables), clip.trainable_variables)
        )
    assert clip.logit_scale == pytest.approx(100.0, rel=1e-6)
    fixed = losses.get({"name": "clip", "learn_temperature": False})
    assert fixed.trainable_variables == [] and len(fixed.weights) == 1


def test_training_the_temperature_lowers_the_loss():
    x, y, g = batch(B=16, seed=7, groups="distinct")
    y = x + 0.1 * y  # texts close to their images: a sharper softmax helps
    for name in ("clip", "siglip"):
        loss = losses.get({"name": name})
        optimizer = keras.optimizers.Adam(0.05)
        tx, ty = tf.constant(x, tf.float32), tf.constant(y, tf.float32)
        before = float(loss(tx, ty, g))
        for _ in range(20):
            with tf.GradientTape() as tape:
                value = loss(tx, ty, g)
            variables = loss.trainable_variables
            optimizer.apply_gradients(zip(tape.gradient(value, variables), variables))
        assert float(loss(tx, ty, g)) < 0.9 * before, name


# --- the weighted image loss ------------------------------------------------------------------


def test_image_loss_is_added_with_its_weight():
    x, y, g = batch(B=8, seed=2)
    labels = np.repeat(np.arange(4), 2)
    dual = losses.get_dual(
        {"name": "clip", "image_loss": {"name": "ntxent", "weight": 0.25, "temperature": 0.5}}
    )
    total, parts = dual(tf.constant(x, tf.float32), tf.constant(y, tf.float32), g, labels)
    pair = float(losses.get({"name": "clip"})(x.astype(np.float32), y.astype(np.float32), g))
    image = float(losses.get({"name": "ntxent", "temperature": 0.5})(labels, x.astype(np.float32)))
    assert float(parts["pair"]) == pytest.approx(pair, rel=1e-6)
    assert float(parts["image"]) == pytest.approx(image, rel=1e-6)
    assert float(total) == pytest.approx(pair + 0.25 * image, rel=1e-6)
    alone = losses.get_dual({"name": "siglip"})
    total, parts = alone(x, y, g, labels)
    assert list(parts) == ["pair"] and alone.image is None
    proxies = losses.get_dual(
        {"name": "clip", "image_loss": {"name": "proxy_anchor"}}, num_classes=5
    )
    assert proxies.image_weight == 1.0 and proxies.image.lr_multiplier == 100.0


@pytest.mark.parametrize(
    ("image_loss", "message"),
    [
        ("ntxent", "loss.image_loss: 'ntxent' is not a mapping"),
        ({"weight": 2}, "loss.image_loss.name: missing; give one of semi_hard_triplet"),
        ({"name": "clip"}, "loss.image_loss.name: clip is an image-text loss"),
        ({"name": "ntxent", "weight": 0}, "loss.image_loss.weight: 0 must be greater than 0"),
        ({"name": "ntxent", "margin": 1}, "loss.image_loss.margin: unknown key"),
        ({"name": "nope"}, "loss.image_loss.name: 'nope' is not one of"),
    ],
)
def test_bad_image_losses_are_one_line_errors(image_loss, message):
    with pytest.raises(UserError) as raised:
        losses.get_dual({"name": "clip", "image_loss": image_loss})
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_facts_and_batch_needs():
    for name in ("clip", "siglip"):
        assert losses.is_image_text({"name": name})
        assert losses.geometry({"name": name}) == "cosine"
        losses.check_batch({"name": name}, P=1, K=1)
    assert not losses.is_image_text({"name": "ntxent"})
    assert "clip" not in losses.image_loss_names()
    with pytest.raises(UserError, match=r"loss.image_loss.name: ntxent needs K >= 2"):
        losses.check_batch({"name": "clip", "image_loss": {"name": "ntxent"}}, P=4, K=1)
    with pytest.raises(UserError, match=r"^loss.image_loss.name: npair needs P >= 2 classes"):
        losses.check_batch({"name": "siglip", "image_loss": {"name": "npair"}}, P=1, K=4)
    with pytest.raises(UserError, match=r"^teacher.loss.name: ntxent needs K >= 2"):
        losses.check_batch({"name": "ntxent"}, P=4, K=1, path="teacher.loss")
    with pytest.raises(UserError, match="ntxent is an image loss; a dual encoder trains with"):
        losses.get_dual({"name": "ntxent"})


# --- graphs, memory, serialisation ------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_graph_of_unknown_batch_size_and_quadratic_memory(name):
    loss = losses.get({"name": name})
    spec = [tf.TensorSpec([None, 8], tf.float32)] * 2 + [tf.TensorSpec([None], tf.int64)]

    @tf.function(input_signature=spec)
    def step(x, y, g):
        with tf.GradientTape() as tape:
            tape.watch([x, y])
            value = loss(x, y, g)
        return value, tape.gradient(value, [x, y])

    for B in (4, 10):
        x, y, g = batch(B=B, D=8, seed=B)
        value, grads = step(x.astype(np.float32), y.astype(np.float32), g)
        assert np.isfinite(float(value)) and all(np.isfinite(gr.numpy()).all() for gr in grads)
        assert float(value) == pytest.approx(
            tf_value(loss, x.astype(np.float32), y.astype(np.float32), g), rel=1e-5
        )
    assert step.experimental_get_tracing_count() == 1

    B = 40
    graph = step.get_concrete_function().graph
    largest = max(
        math.prod(d if d is not None else B for d in out.shape.as_list())
        for op in graph.get_operations()
        for out in op.outputs
        if out.shape.rank
    )
    assert largest <= 2 * B * B


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_config_round_trip_and_one_pair(name):
    loss = losses.get({"name": name})
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(again) is type(loss) and again.get_config() == loss.get_config()
    x, y, g = batch(seed=9)
    assert tf_value(again, x, y, g) == pytest.approx(tf_value(loss, x, y, g), rel=1e-6)
    one = tf_value(loss, x[:1], y[:1], g[:1])
    assert np.isfinite(one)
    assert isinstance(loss, ClipLoss if name == "clip" else SigLipLoss)
