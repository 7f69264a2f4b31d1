"""losses/: the registry and its config contract, distances, and what every loss must do (graphs
of unknown batch size, gradients, degenerate batches, dtypes, serialisation, O(B^2) memory).
The formulas are checked in test_losses_reference.py and test_losses_semi_hard.py."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import losses
from losses.base import ClassVectorLoss, MetricLoss
from tfcbir import UserError
from tfcbir.params import Param

# The registry's order (what the config reference and error messages list), pinned; the tests
# below run over the registry's own listing, so a new loss is tested without editing a list.
NAMES = [
    "semi_hard_triplet",
    "angular",
    "batch_hard_triplet",
    "batch_all_triplet",
    "contrastive",
    "lifted_structure",
    "npair",
    "multi_similarity",
    "ntxent",
    "proxy_anchor",
    "arcface",
]
PROXIES = {"proxy_anchor", "arcface"}
IMAGE_LOSSES = losses.image_loss_names()
NUM_CLASSES = 10


def make(name, **params):
    return losses.get({"name": name, **params}, num_classes=NUM_CLASSES)


def batch(P=4, K=3, D=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(rng.choice(NUM_CLASSES, P, replace=False), K))
    x = rng.normal(size=(P * K, D)).astype(np.float32)
    return labels.astype(np.int32), x / np.linalg.norm(x, axis=1, keepdims=True)


def value_and_gradient(loss, labels, x):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss(tf.convert_to_tensor(labels), x)
    return value, tape.gradient(value, x)


# --- registry and config contract -------------------------------------------------------------


def test_registry_lists_every_loss_with_its_params_and_facts():
    # The image losses; the image-text ones (dual encoders) are tested in
    # test_losses_image_text.py.
    assert losses.LOSSES.names() == NAMES + ["clip", "siglip"]
    assert losses.image_loss_names() == NAMES
    for name in NAMES:
        entry = losses.LOSSES.get(name)
        assert entry.doc
        assert all(isinstance(p, Param) and p.doc for p in entry.params.values())
        assert isinstance(entry.meta["min_K"], int) and isinstance(entry.meta["min_P"], int)
        assert entry.meta["uses_proxies"] is (name in PROXIES)
        assert entry.meta["min_K"] == (1 if name in PROXIES else 2)


def test_get_fills_defaults_and_builds_the_registered_class():
    loss = losses.get({"name": "batch_hard_triplet"})
    assert isinstance(loss, MetricLoss)
    assert (loss.margin, loss.soft_margin, loss.metric) == (0.3, False, "euclidean")
    assert losses.get({}).__class__.__name__ == "SemiHardTripletLoss"
    assert losses.get({"name": "semi_hard_triplet", "margin": 0}).margin == 0.0
    proxy = losses.get({"name": "proxy_anchor"}, num_classes=7)
    assert isinstance(proxy, ClassVectorLoss) and proxy.num_classes == 7
    assert proxy.lr_multiplier == proxy.proxy_lr_multiplier == 100.0
    assert losses.get({"name": "arcface"}, num_classes=3).lr_multiplier == 1.0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"name": "semi_hard_triplet", "margin": -1}, "loss.margin: -1 is below the minimum 0"),
        ({"name": "angualr"}, "loss.name: 'angualr' is not one of semi_hard_triplet, angular, "),
        ({"name": "angular", "alpha": 90}, "loss.alpha: 90 must be less than 90"),
        ({"name": "contrastive", "metric": "l2"}, "loss.metric: 'l2' is not one of euclidean, "),
        ({"name": "npair", "margin": 1.0}, "loss.margin: unknown key; allowed keys are l2_reg"),
        ({"name": "ntxent", "temperature": "hot"}, "loss.temperature: 'hot' is not a number"),
    ],
)
def test_bad_params_raise_one_line_user_errors(params, message):
    with pytest.raises(UserError) as raised:
        losses.get(params)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_proxy_losses_need_the_number_of_classes():
    with pytest.raises(UserError, match="loss.name: proxy_anchor learns one vector per class"):
        losses.get({"name": "proxy_anchor"})


def test_check_batch():
    with pytest.raises(UserError) as raised:
        losses.check_batch({"name": "npair"}, P=8, K=1)
    assert str(raised.value) == (
        "loss.name: npair needs K >= 2 images per class in a batch; set train.batch.K >= 2"
    )
    with pytest.raises(UserError, match=r"needs P >= 2 classes .* set train.batch.P >= 2"):
        losses.check_batch({"name": "contrastive", "pos_margin": 0.0}, P=1, K=4)
    for name in IMAGE_LOSSES:
        losses.check_batch({"name": name}, P=2, K=2)
    losses.check_batch({"name": "proxy_anchor"}, P=1, K=1)
    with pytest.raises(UserError, match="is not one of"):
        losses.check_batch({"name": "nope"}, P=2, K=2)


# --- distances --------------------------------------------------------------------------------


def test_pairwise_distances_match_numpy_with_zero_diagonal():
    x = np.random.default_rng(0).normal(size=(6, 4))
    diff = x[:, None] - x[None]
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = {
        "euclidean": np.sqrt((diff**2).sum(-1)),
        "squared_euclidean": (diff**2).sum(-1),
        "cosine": 1 - unit @ unit.T,
    }
    for metric in losses.METRICS:
        d = losses.pairwise_distances(tf.constant(x), metric).numpy()
        np.testing.assert_allclose(d, expected[metric], atol=1e-12)
        assert np.all(np.diag(d) == 0)
    with pytest.raises(ValueError, match="unknown metric"):
        losses.pairwise_distances(x, "manhattan")


def test_duplicate_points_have_zero_not_nan_gradients():
    x = tf.constant([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]])
    for metric in losses.METRICS:
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(losses.pairwise_distances(x, metric))
        assert np.all(np.isfinite(tape.gradient(total, x).numpy()))


# --- what every loss must do ------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGE_LOSSES)
def test_graph_with_unknown_batch_size_matches_eager(name):
    loss = make(name)
    labels, x = batch()
    eager_value, eager_grad = value_and_gradient(loss, labels, x)

    @tf.function(
        input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, 8], tf.float32)]
    )
    def step(labels, embeddings):
        return value_and_gradient(loss, labels, embeddings)

    for P, K in [(4, 3), (2, 5), (6, 2)]:
        labels_, x_ = (labels, x) if (P, K) == (4, 3) else batch(P, K, seed=P)
        value, grad = step(labels_, x_)
        assert value.shape == () and value.dtype == tf.float32
        assert np.isfinite(value.numpy()) and np.all(np.isfinite(grad.numpy()))
        if (P, K) == (4, 3):
            np.testing.assert_allclose(value.numpy(), eager_value.numpy(), rtol=1e-6)
            np.testing.assert_allclose(grad.numpy(), eager_grad.numpy(), rtol=1e-5, atol=1e-7)
    assert step.experimental_get_tracing_count() == 1


ZERO_WITHOUT_PAIRS = {
    "semi_hard_triplet",
    "angular",
    "batch_hard_triplet",
    "batch_all_triplet",
    "lifted_structure",
    "multi_similarity",
    "ntxent",
}


@pytest.mark.parametrize("name", IMAGE_LOSSES)
def test_degenerate_batches_are_defined(name):
    loss = make(name)
    x = batch(2, 2)[1]
    cases = {
        "no positive pair": np.array([0, 1, 2, 3]),
        "one class only": np.array([5, 5, 5, 5]),
        "the trainer's build batch [0, 0]": np.array([0, 0]),
        "one sample": np.array([3]),
    }
    for what, labels in cases.items():
        value, grad = value_and_gradient(loss, labels, x[: len(labels)])
        assert np.isfinite(value.numpy()), what
        assert np.all(np.isfinite(grad.numpy())), what
        if what == "no positive pair" and name in ZERO_WITHOUT_PAIRS:
            assert value.numpy() == 0.0


@pytest.mark.parametrize("name", IMAGE_LOSSES)
def test_labels_as_floats_or_columns_and_half_precision_embeddings(name):
    loss = make(name)
    labels, x = batch(seed=3)
    expected = loss(labels, x).numpy()
    assert loss(labels.astype(np.float32), x).numpy() == pytest.approx(expected, rel=1e-6)
    assert loss(labels[:, None].astype(np.int64), x).numpy() == pytest.approx(expected, rel=1e-6)
    for dtype in (tf.float16, tf.bfloat16):
        low = tf.cast(x, dtype)
        value = loss(labels, low)
        assert value.dtype == tf.float32
        same_inputs = loss(labels, tf.cast(low, tf.float32))
        np.testing.assert_allclose(value.numpy(), same_inputs.numpy(), rtol=1e-5)


@pytest.mark.parametrize("name", IMAGE_LOSSES)
def test_config_round_trip(name):
    loss = make(name)
    labels, x = batch(seed=4)
    expected = loss(labels, x).numpy()
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(again) is type(loss)
    assert again.get_config() == loss.get_config()
    if losses.LOSSES.get(name).meta["uses_proxies"]:  # same weights, same value
        again(labels, x)
        again.set_weights(loss.get_weights())
    assert again(labels, x).numpy() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "name", [n for n in IMAGE_LOSSES if losses.LOSSES.get(n).meta["uses_proxies"]]
)
def test_class_vectors_build_lazily_and_train(name):
    loss = make(name)
    assert loss.trainable_variables == []
    labels, x = batch(D=6)
    optimizer = keras.optimizers.SGD(0.5)
    embeddings = tf.Variable(x)
    before = float(loss(labels, embeddings))
    (vectors,) = loss.trainable_variables
    assert vectors.shape == (NUM_CLASSES, 6) and loss.weights == [vectors]
    for _ in range(5):
        with tf.GradientTape() as tape:
            value = loss(labels, embeddings)
        variables = [embeddings, *loss.trainable_variables]
        optimizer.apply_gradients(zip(tape.gradient(value, variables), variables))
    assert float(loss(labels, embeddings)) < before
    built = make(name)
    built.build(labels_shape=(None,), embeddings_shape=(None, 12))
    assert built.trainable_variables[0].shape == (NUM_CLASSES, 12)
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_classes"):
        loss(np.array([0, NUM_CLASSES]), x[:2])


def test_keras_compile_and_fit():
    labels, x = batch(4, 4, 8)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    model.compile(optimizer="sgd", loss=losses.get({"name": "semi_hard_triplet"}))
    history = model.fit(x, labels, batch_size=16, epochs=2, verbose=0, shuffle=False)
    assert all(np.isfinite(history.history["loss"]))


# --- O(B^2) memory ----------------------------------------------------------------------------


def largest_tensor(fn, B, D=8):
    """Elements of the largest tensor in the traced forward + backward graph of fn at batch B."""

    @tf.function
    def step(labels, embeddings):
        with tf.GradientTape() as tape:
            tape.watch(embeddings)
            value = fn(labels, embeddings)
        return tape.gradient(value, embeddings)

    labels, x = batch(B // 4, 4, D)
    graph = step.get_concrete_function(tf.constant(labels), tf.constant(x)).graph
    largest = 0
    for op in graph.get_operations():
        for output in op.outputs:
            if output.shape.rank:
                largest = max(
                    largest, math.prod(d if d is not None else B for d in output.shape.as_list())
                )
    return largest


def test_no_loss_builds_a_cubic_tensor():
    from tests.test_losses_semi_hard import addons_triplet_semihard_loss

    B = 40  # 10 classes x 4
    # The check itself: addons' formulation does build B^3-element tiles.
    assert largest_tensor(addons_triplet_semihard_loss, B) >= B**3
    for name in IMAGE_LOSSES:
        assert largest_tensor(make(name), B) <= 2 * B * B, name
