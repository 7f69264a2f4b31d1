"""What every registry entry must do, parametrised over the registries' own listings
(``losses.LOSSES.names()``, ``nets.backbone_names()``, ``nets.head_names()`` and the keras-hub
families ``nets.hub.FAMILIES``), so a new entry is tested here without editing a list.

- A loss builds from its defaults through ``losses.get`` (as the trainers do), survives keras
  serialisation as an equal object computing the same value, and on a P x K batch its registry
  entry allows gives a finite float32 scalar whose gradients, with respect to the embeddings and
  to its own trainable variables (proxies, logit scale, bias), are finite and not all zero.
- A backbone (random weights, its smallest image size, the config's default head), a head (on
  small_cnn) and a keras-hub family (a tiny preset saved here, 32 px, random weights) give an
  embedding model whose output is ``(B, embedding_dim)`` float32 (``(B, C)`` for a head that
  keeps the features), whose trainable weights get finite, not-all-zero gradients, and whose
  weights round-trip through save_weights/load_weights into a model built again from the same
  config (as a run's checkpoint is loaded).

The formulas, degenerate batches and memory of the losses are checked in test_losses*.py; the
registries' facts, preprocessing and weights files in test_nets.py and test_hub.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from dataclasses import dataclass  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import losses  # noqa: E402
import nets  # noqa: E402
from nets import hub  # noqa: E402

NUM_CLASSES = 10  # classes of the losses that learn one vector per class
LOSS_DIM = 8  # embedding width of the loss batches
EMBEDDING_DIM = 12  # the configured model.embedding_dim
BATCH = 2  # images per model batch

# --- losses ---------------------------------------------------------------------------------------


def loss_batch_shape(name: str) -> tuple[int, int]:
    """(P, K): the registry's minimums for ``name``, raised to 4 classes x 2 images so that every
    loss finds pairs and negatives to learn from."""
    meta = losses.LOSSES.get(name).meta
    return max(4, meta["min_P"]), max(2, meta["min_K"])


def loss_inputs(name: str, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """labels (P*K,) int32, P classes of K, and the embeddings the loss takes: [images (B, D)],
    or [images (B, D), texts (B, D)] for an image-text loss (the labels are then its groups)."""
    P, K = loss_batch_shape(name)
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.choice(NUM_CLASSES, P, replace=False), K).astype(np.int32)
    towers = 2 if losses.is_image_text({"name": name}) else 1
    return labels, [rng.normal(size=(P * K, LOSS_DIM)).astype(np.float32) for _ in range(towers)]


def evaluate(loss, name: str, labels, embeddings):
    """The loss on one batch, called as its kind is: ``loss(labels, embeddings)`` or
    ``loss(image_embeddings, text_embeddings, groups)``."""
    if losses.is_image_text({"name": name}):
        images, texts = embeddings
        return loss(images, texts, labels)
    return loss(labels, embeddings[0])


def build_loss(name: str):
    """The loss ``name`` with its defaults, through the public factory as the trainers build it."""
    return losses.get({"name": name}, num_classes=NUM_CLASSES)


@pytest.mark.parametrize("name", losses.LOSSES.names())
def test_loss_round_trips_through_keras_serialization(name):
    loss = build_loss(name)
    P, K = loss_batch_shape(name)
    losses.check_batch({"name": name}, P, K)  # a batch the registry allows
    labels, embeddings = loss_inputs(name)
    expected = float(evaluate(loss, name, labels, embeddings))

    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(again) is type(loss)
    assert again.get_config() == loss.get_config()
    if getattr(loss, "weights", None):  # learned values: the same ones, the same result
        evaluate(again, name, labels, embeddings)  # creates what is built on the first call
        again.set_weights(loss.get_weights())
    assert float(evaluate(again, name, labels, embeddings)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", losses.LOSSES.names())
def test_loss_is_a_finite_float32_scalar_with_gradients(name):
    loss = build_loss(name)
    labels, values = loss_inputs(name, seed=1)
    evaluate(loss, name, labels, values)  # creates the variables built on the first call
    embeddings = [tf.Variable(x) for x in values]
    own = list(getattr(loss, "trainable_variables", []))
    if losses.LOSSES.get(name).meta["uses_proxies"]:
        assert own, f"{name} learns one vector per class but has no trainable variable"
    with tf.GradientTape() as tape:
        value = evaluate(loss, name, labels, embeddings)
    assert value.shape == () and value.dtype == tf.float32
    assert np.isfinite(float(value))
    gradients = tape.gradient(value, embeddings + own)
    for variable, gradient in zip(embeddings + own, gradients):
        assert gradient is not None, f"{name}: no gradient for {variable.name}"
        gradient = tf.convert_to_tensor(gradient).numpy()
        assert np.isfinite(gradient).all(), f"{name}: {variable.name}"
        assert np.any(gradient != 0), f"{name}: all-zero gradient for {variable.name}"


# --- backbones, heads, keras-hub families ---------------------------------------------------------


def _vision_config(image_size: int) -> dict:
    return {
        "patch_size": 8,
        "hidden_dim": 16,
        "num_layers": 1,
        "num_heads": 2,
        "intermediate_dim": 32,
        "image_shape": (image_size, image_size, 3),
    }


def _text_config() -> dict:
    return {
        "vocabulary_size": 20,
        "embedding_dim": 16,
        "hidden_dim": 16,
        "num_layers": 1,
        "num_heads": 2,
        "intermediate_dim": 32,
        "max_sequence_length": 8,
    }


def tiny_hub_preset(family: str, image_size: int = 32):
    """(keras-hub backbone, image converter) of a tiny random preset of ``family``, or None
    when no recipe is written here for it."""
    import keras_hub

    models, layers = keras_hub.models, keras_hub.layers
    vision, size = _vision_config(image_size), (image_size, image_size)
    recipes = {
        "clip": lambda: (
            models.CLIPBackbone(
                models.CLIPVisionEncoder(**vision),
                models.CLIPTextEncoder(**_text_config()),
                projection_dim=8,
            ),
            layers.CLIPImageConverter(image_size=size, scale=1 / 255.0, offset=0.0),
        ),
        "siglip": lambda: (
            models.SigLIPBackbone(
                models.SigLIPVisionEncoder(**vision), models.SigLIPTextEncoder(**_text_config())
            ),
            layers.SigLIPImageConverter(image_size=size, scale=1 / 127.5, offset=-1.0),
        ),
        "dinov2": lambda: (
            models.DINOV2Backbone(**vision, position_embedding_shape=(image_size, image_size, 3)),
            layers.DINOV2ImageConverter(image_size=size, scale=1 / 255.0, offset=0.0),
        ),
        "dinov3": lambda: (
            models.DINOV3Backbone(**vision),
            layers.DINOV3ImageConverter(image_size=size, scale=1 / 255.0, offset=0.0),
        ),
        "vit": lambda: (
            models.ViTBackbone(
                image_shape=(image_size, image_size, 3),
                patch_size=8,
                num_layers=1,
                num_heads=2,
                hidden_dim=16,
                mlp_dim=32,
            ),
            layers.ViTImageConverter(image_size=size, scale=1 / 127.5, offset=-1.0),
        ),
    }
    return recipes[family]() if family in recipes else None


def model_params(backbone: str, head: str | None = None, weights: str = "none") -> dict:
    """A ``model`` section: ``head`` None is the config's default head."""
    return {
        "backbone": backbone,
        "weights": weights,
        "head": head or nets.PARAMS["head"].default,
        "embedding_dim": EMBEDDING_DIM,
    }


@dataclass
class BuiltModel:
    """An embedding model built from ``params`` for square ``image_size`` images."""

    params: dict
    image_size: int
    model: keras.Model

    @property
    def images(self) -> np.ndarray:
        """(BATCH, size, size, 3) uint8 random pixels."""
        shape = (BATCH, self.image_size, self.image_size, 3)
        return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)

    def rebuilt(self) -> keras.Model:
        """The model built again from its config, loading nothing (as for a checkpoint)."""
        size = (self.image_size, self.image_size)
        return nets.build_embedding_model(self.params, size, pretrained=False)


MODEL_CASES = (
    [("backbone", name) for name in nets.backbone_names()]
    + [("head", name) for name in nets.head_names()]
    + [("hub", family) for family in hub.FAMILIES]
)


def _case_params(kind: str, name: str, folder) -> tuple[dict, int]:
    """The model section and image side of a MODEL_CASES entry (hub presets saved in folder)."""
    if kind == "backbone":
        return model_params(name), nets.min_image_size(name)
    if kind == "head":
        return model_params("small_cnn", head=name), nets.min_image_size("small_cnn")
    pytest.importorskip("keras_hub")
    preset = tiny_hub_preset(name)
    if preset is None:
        pytest.fail(f"hub family {name!r} has no tiny preset recipe in tiny_hub_preset")
    for part in preset:
        part.save_to_preset(str(folder))
    return model_params(f"hub:{folder}", weights="pretrained"), 32


@pytest.fixture(
    scope="module", params=MODEL_CASES, ids=[f"{kind}-{name}" for kind, name in MODEL_CASES]
)
def built(request, tmp_path_factory) -> BuiltModel:
    """One model per backbone, head and hub family, shared by the tests below."""
    kind, name = request.param
    keras.utils.set_random_seed(0)
    params, size = _case_params(kind, name, tmp_path_factory.mktemp(f"preset_{name}"))
    return BuiltModel(params, size, nets.build_embedding_model(params, (size, size)))


def expected_width(built: BuiltModel) -> int:
    """embedding_dim, or the backbone's feature width for a head that keeps the features."""
    if nets.HEADS.get(built.params["head"]).meta.get("keeps_features", False):
        return built.model.get_layer("backbone").output.shape[-1]
    return built.params["embedding_dim"]


def test_model_output_is_batch_by_embedding_dim_float32(built):
    width = expected_width(built)
    assert built.model.output_shape == (None, width)
    embeddings = built.model(built.images, training=False)
    assert keras.backend.standardize_dtype(embeddings.dtype) == "float32"
    embeddings = keras.ops.convert_to_numpy(embeddings)
    assert embeddings.shape == (BATCH, width)
    assert np.isfinite(embeddings).all()


def test_model_gradients_are_finite_and_not_all_zero(built):
    model = built.model
    variables = model.trainable_variables
    assert variables
    # A fixed random direction of the embeddings: a normalised head's gradient of their plain
    # sum could vanish by symmetry.
    direction = np.random.default_rng(1).normal(size=(BATCH, expected_width(built)))
    with tf.GradientTape() as tape:
        embeddings = model(built.images, training=True)  # as the trainer calls it
        value = tf.reduce_sum(embeddings * tf.constant(direction, tf.float32))
    gradients = tape.gradient(value, variables)
    unread = [v.path for v, gradient in zip(variables, gradients) if gradient is None]
    if nets.is_hub(built.params["backbone"]):
        # A preset holds variables its image tower never reads (DINOv2's mask token, used in
        # masked pretraining): no gradient, so the optimiser leaves them alone. The head's all
        # get one.
        unread = [path for path in unread if path.startswith("head_")]
    assert not unread, f"no gradient for {unread}"
    read = [tf.convert_to_tensor(g).numpy() for g in gradients if g is not None]
    assert all(np.isfinite(gradient).all() for gradient in read)
    assert any(np.any(gradient != 0) for gradient in read)


def test_model_weights_round_trip_into_a_model_built_again(built, tmp_path):
    path = tmp_path / "model.weights.h5"
    built.model.save_weights(path)
    expected = keras.ops.convert_to_numpy(built.model(built.images, training=False))
    again = built.rebuilt()
    before = keras.ops.convert_to_numpy(again(built.images, training=False))
    assert not np.allclose(before, expected, rtol=1e-3, atol=1e-5)  # so loading is what counts
    again.load_weights(path)
    after = keras.ops.convert_to_numpy(again(built.images, training=False))
    np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-6)
