"""Tests for nets/: registries, preprocessing values, heads, weights loading and serialisation.

Big backbones are built at 32x32 with random weights and called eagerly (no ``predict``) to keep
the file fast; nothing touches the network (keras' download function is replaced where needed).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import nets  # noqa: E402
from nets.freeze import application_blocks  # noqa: E402
from tfcbir import UserError  # noqa: E402
from tfcbir.registry import resolve  # noqa: E402

# The registries' order (what the config reference and error messages list), pinned; the tests
# below run over the registries' own listings, so a new entry is tested without editing a list
# (the tables of expected values, FEATURES and BLOCKS, take a line for a new backbone).
BACKBONES = [
    "resnet_v1_50",
    "resnet_v1_101",
    "resnet_v2_50",
    "mobilenet_v2",
    "efficientnet_b0",
    "densenet169",
    "small_cnn",
    "small_cnn_rgb",
]
HEADS = [
    "identity",
    "identity_normalize",
    "direct",
    "direct_normalize",
    "fc1024",
    "fc1024_normalize",
    "projection",
    "projection_normalize",
]
FEATURES = {
    "resnet_v1_50": 2048,
    "resnet_v1_101": 2048,
    "resnet_v2_50": 2048,
    "mobilenet_v2": 1280,
    "efficientnet_b0": 1280,
    "densenet169": 1664,
    "small_cnn": 128,
    "small_cnn_rgb": 128,
}
BLOCKS = {  # stages (blocks for mobilenet_v2) that model.freeze_backbone counts
    "resnet_v1_50": 4,
    "resnet_v1_101": 4,
    "resnet_v2_50": 4,
    "mobilenet_v2": 16,
    "efficientnet_b0": 7,
    "densenet169": 4,
    "small_cnn": 4,
    "small_cnn_rgb": 4,
}
# The preprocessing keras documents for each application (efficientnet's is the identity).
KERAS_PREPROCESS = {
    "resnet_v1_50": keras.applications.resnet50.preprocess_input,
    "resnet_v1_101": keras.applications.resnet.preprocess_input,
    "resnet_v2_50": keras.applications.resnet_v2.preprocess_input,
    "mobilenet_v2": keras.applications.mobilenet_v2.preprocess_input,
    "efficientnet_b0": keras.applications.efficientnet.preprocess_input,
    "densenet169": keras.applications.densenet.preprocess_input,
}


def params(backbone="small_cnn", head="direct_normalize", weights="none", dim=16) -> dict:
    return {"backbone": backbone, "weights": weights, "head": head, "embedding_dim": dim}


def pixels(n=3, size=32, seed=0) -> np.ndarray:
    """``(n, size, size, 3)`` uint8 random pixels."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def features_of(model: keras.Model, images) -> np.ndarray:
    """The backbone's pooled ``(B, C)`` features inside an embedding model."""
    x = model.get_layer("preprocess")(images)
    return keras.ops.convert_to_numpy(model.get_layer("backbone")(x, training=False))


def randomize(model: keras.Model, seed=0) -> None:
    """New random float weights (BN variances kept positive), so outputs are far from any init."""
    rng = np.random.default_rng(seed)
    values = []
    for w in model.weights:
        value = keras.ops.convert_to_numpy(w)
        if value.dtype.kind == "f":
            low, high = (0.5, 1.5) if "variance" in w.path else (-0.5, 0.5)
            value = rng.uniform(low, high, value.shape).astype(value.dtype)
        values.append(value)
    model.set_weights(values)


def norm_of(model: keras.Model) -> keras.layers.Normalization:
    return next(la for la in model.layers if isinstance(la, keras.layers.Normalization))


def no_network(monkeypatch) -> None:
    """Make every keras download fail the way it does offline."""

    def fail(*args, **kwargs):
        raise Exception(
            "URL fetch failure on https://storage.googleapis.com/x: None -- "
            "[Errno -3] Temporary failure in name resolution"
        )

    from keras.src.utils import file_utils

    monkeypatch.setattr(keras.utils, "get_file", fail)
    monkeypatch.setattr(file_utils, "get_file", fail)


# --- registries and names ---------------------------------------------------------------------


def test_registries_list_every_backbone_and_head():
    assert nets.backbone_names() == BACKBONES
    assert nets.head_names() == HEADS
    assert [nets.min_image_size(b) for b in BACKBONES] == [32, 32, 32, 32, 32, 32, 8, 8]
    assert [nets.is_normalized(h) for h in HEADS] == [False, True] * 4
    assert [nets.preprocess_mode(b) for b in BACKBONES] == [
        "caffe",
        "caffe",
        "tf",
        "tf",
        "raw",
        "torch",
        "per_image",
        "tf",
    ]


@pytest.mark.parametrize("key, value", [("backbone", "resnet50"), ("head", "direct_norm")])
def test_unknown_names_give_the_registry_error(key, value):
    allowed = ", ".join(BACKBONES if key == "backbone" else HEADS)
    with pytest.raises(UserError) as error:
        nets.build_embedding_model({**params(), key: value}, (32, 32))
    message = str(error.value)
    assert message.startswith(f"model.{key}: {value!r} is not one of {allowed}")
    assert "\n" not in message
    with pytest.raises(UserError, match=r"^model\.backbone: 'resnet50' is not one of"):
        nets.min_image_size("resnet50")


def test_params_are_validated():
    with pytest.raises(UserError, match=r"^model\.embedding_dim: 0 is below the minimum 1"):
        nets.build_embedding_model(params(dim=0), (32, 32))
    with pytest.raises(UserError, match=r"^model\.weights: 'imagnet' is not \"imagenet\""):
        nets.build_embedding_model(params(weights="imagnet"), (32, 32))
    with pytest.raises(UserError, match=r"small_cnn needs images of at least 8 px a side, got 7x8"):
        nets.build_embedding_model(params(), (7, 8))


# --- every backbone and every head --------------------------------------------------------------


def out_dim(head: str, features: int, embedding_dim: int) -> int:
    """The embedding width of ``head``: identity heads keep the feature width."""
    keeps_features = nets.HEADS.get(head).meta.get("keeps_features", False)
    return features if keeps_features else embedding_dim


@pytest.mark.parametrize("backbone", nets.backbone_names())
def test_every_backbone_builds_and_feeds_every_head(backbone):
    # every head also on a real backbone (the identity heads on small_cnn)
    heads = nets.head_names()
    head = heads[(nets.backbone_names().index(backbone) + 2) % len(heads)]
    dim = out_dim(head, FEATURES[backbone], 24)
    model = nets.build_embedding_model(params(backbone, head, dim=24), (32, 32))
    assert model.name == "embedding"
    assert isinstance(model.get_layer("backbone"), keras.Model)
    assert model.get_layer("preprocess").mode == nets.preprocess_mode(backbone)
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, dim)

    embeddings = keras.ops.convert_to_numpy(model(pixels(2), training=False))
    assert embeddings.shape == (2, dim) and embeddings.dtype == np.float32
    assert np.isfinite(embeddings).all()
    assert features_of(model, pixels(2)).shape == (2, FEATURES[backbone])
    # Its blocks for model.freeze_backbone: n (stages of the CNNs).
    stem, blocks = application_blocks(
        model.get_layer("backbone"), nets.BACKBONES.get(backbone).meta["blocks"]
    )
    assert len(blocks) == BLOCKS[backbone] and stem and all(blocks)

    # Every head on this backbone's feature width (cheap: no need to rebuild the backbone).
    features = np.random.default_rng(1).normal(size=(4, FEATURES[backbone])).astype("float32")
    for name in heads:
        inputs = keras.Input(shape=(FEATURES[backbone],))
        head_model = keras.Model(inputs, nets.HEADS.get(name).builder(inputs, 24))
        out = keras.ops.convert_to_numpy(head_model(features))
        assert out.shape == (4, out_dim(name, FEATURES[backbone], 24))
        assert out.dtype == np.float32
        if nets.is_normalized(name):
            np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("head", nets.head_names())
def test_heads_give_unit_norm_rows_only_when_normalized(head):
    model = nets.build_embedding_model(params(head=head, dim=16), (32, 32))
    embeddings = keras.ops.convert_to_numpy(model(pixels(4), training=False))
    norms = np.linalg.norm(embeddings, axis=1)
    if nets.is_normalized(head):
        np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    else:
        assert not np.allclose(norms, 1.0, rtol=1e-3)


def test_small_backbone_min_size_and_too_small_keras_input():
    model = nets.build_embedding_model(params(), (8, 8))
    assert keras.ops.convert_to_numpy(model(pixels(2, size=8))).shape == (2, 16)
    with pytest.raises(
        UserError,
        match=r"^model\.backbone: mobilenet_v2 needs images of at "
        r"least 32 px a side, got 31x64",
    ):
        nets.build_embedding_model(params("mobilenet_v2"), (31, 64))


def test_uint8_and_float_pixels_give_the_same_embeddings():
    model = nets.build_embedding_model(params(), (32, 32))
    images = pixels(2)
    as_uint8 = keras.ops.convert_to_numpy(model(images))
    as_float = keras.ops.convert_to_numpy(model(images.astype("float32")))
    np.testing.assert_allclose(as_uint8, as_float, rtol=1e-6)


def test_mixed_precision_keeps_float32_embeddings():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        for head in ("direct", "fc1024_normalize"):
            model = nets.build_embedding_model(params(head=head), (32, 32))
            assert model.get_layer("preprocess").compute_dtype == "float16"
            assert model.get_layer("head_projection").compute_dtype == "float32"
            out = model(pixels(2), training=False)
            assert keras.backend.standardize_dtype(out.dtype) == "float32"
            assert np.isfinite(keras.ops.convert_to_numpy(out)).all()
    finally:
        keras.mixed_precision.set_global_policy("float32")


# --- preprocessing ------------------------------------------------------------------------------


RED = np.array([[[[255, 0, 0]]]], dtype=np.uint8)  # (1, 1, 1, 3)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("caffe", [0 - 103.939, 0 - 116.779, 255 - 123.68]),  # BGR minus the BGR mean pixel
        ("tf", [1.0, -1.0, -1.0]),
        ("torch", [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225]),
        ("unit", [1.0, 0.0, 0.0]),
        ("raw", [255.0, 0.0, 0.0]),
    ],
)
def test_preprocessing_of_pure_red(mode, expected):
    out = keras.ops.convert_to_numpy(nets.ImagePreprocessing(mode)(RED))
    assert out.shape == (1, 1, 1, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-5)


@pytest.mark.parametrize("backbone", sorted(KERAS_PREPROCESS))
def test_preprocessing_matches_keras_applications(backbone):
    images = pixels(2, size=4).astype("float32")
    expected = KERAS_PREPROCESS[backbone](images.copy())
    layer = nets.ImagePreprocessing(nets.preprocess_mode(backbone))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(images)), expected, rtol=1e-5, atol=1e-4
    )


def test_per_image_preprocessing_removes_each_images_colour_cast():
    # Two 2x2 images: a two-tone one, and the same pattern on another colour, brighter.
    first = np.array([[[10, 20, 30], [10, 20, 30]], [[50, 60, 70], [50, 60, 70]]], np.float32)
    second = first * 2 + 40
    out = keras.ops.convert_to_numpy(
        nets.ImagePreprocessing("per_image")(np.stack([first, second]))
    )
    np.testing.assert_allclose(out.mean(axis=(1, 2)), 0.0, atol=1e-6)
    # each channel: values mean +-20 (std 20) -> +-20 / 21; doubled: +-40 / 41
    np.testing.assert_allclose(out[0, 0, 0], [-20 / 21] * 3, rtol=1e-6)
    np.testing.assert_allclose(out[1, 1, 1], [40 / 41] * 3, rtol=1e-6)
    flat = keras.ops.convert_to_numpy(
        nets.ImagePreprocessing("per_image")(np.full((1, 2, 2, 3), 90.0))
    )
    np.testing.assert_array_equal(flat, 0.0)


@pytest.mark.parametrize("mode", sorted(nets.PREPROCESS_MODES))
def test_preprocessing_under_mixed_precision_matches_float32(mode):
    """Statistics over a 128 x 128 image overflow float16 (max 65504) unless computed in float32."""
    pixels = np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3)).astype("uint8")
    expected = keras.ops.convert_to_numpy(nets.ImagePreprocessing(mode)(pixels))
    mixed = nets.ImagePreprocessing(mode, dtype="mixed_float16")(pixels)
    assert keras.backend.standardize_dtype(mixed.dtype) == "float16"
    mixed = keras.ops.convert_to_numpy(mixed).astype("float32")
    assert np.isfinite(mixed).all()
    np.testing.assert_allclose(mixed, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_unknown_preprocessing_mode_is_a_bug():
    with pytest.raises(ValueError, match="unknown preprocessing mode 'bgr'"):
        nets.ImagePreprocessing("bgr")


# --- custom layers and serialisation --------------------------------------------------------------


def test_custom_layers_round_trip_through_get_config():
    pre = nets.ImagePreprocessing("torch", name="preprocess")
    copy = nets.ImagePreprocessing.from_config(pre.get_config())
    assert (copy.mode, copy.name) == ("torch", "preprocess")

    l2 = nets.L2Normalize(epsilon=1e-6, name="l2")
    copy = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(l2))
    assert isinstance(copy, nets.L2Normalize)
    assert (copy.axis, copy.epsilon, copy.name, copy.dtype_policy.name) == (
        -1,
        1e-6,
        "l2",
        "float32",
    )
    assert keras.saving.get_registered_name(nets.L2Normalize) == "tfcbir>L2Normalize"
    assert keras.saving.get_registered_name(nets.ImagePreprocessing) == "tfcbir>ImagePreprocessing"


def test_l2_normalize_is_epsilon_safe_and_float32():
    rows = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float16)
    out = nets.L2Normalize()(rows)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)


def test_json_round_trip_gives_identical_outputs():
    model = nets.build_embedding_model(params(head="fc1024_normalize"), (32, 32))
    config = json.loads(model.to_json())
    assert config["config"]["name"] == "embedding"
    copy = keras.models.model_from_json(model.to_json())
    assert [layer.name for layer in copy.layers] == [layer.name for layer in model.layers]
    copy.set_weights(model.get_weights())
    images = pixels(3)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(copy(images, training=False)),
        keras.ops.convert_to_numpy(model(images, training=False)),
    )


def test_keras_file_round_trip(tmp_path):
    model = nets.build_embedding_model(params(head="direct"), (32, 32))
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    images = pixels(2)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(images)),
        keras.ops.convert_to_numpy(model(images)),
        rtol=1e-6,
    )


# --- weights --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["small_cnn", "mobilenet_v2"])
def test_weights_from_a_local_file(backbone, tmp_path):
    first = nets.build_embedding_model(params(backbone), (32, 32))
    randomize(first.get_layer("backbone"))
    path = tmp_path / f"{backbone}.weights.h5"
    first.get_layer("backbone").save_weights(path)

    second = nets.build_embedding_model(params(backbone, weights=str(path)), (32, 32))
    images = pixels(3)
    expected = features_of(first, images)
    assert np.abs(expected).mean() > 1e-3  # far from a degenerate all-zero output
    np.testing.assert_allclose(features_of(second, images), expected, rtol=1e-5, atol=1e-6)

    # pretrained=False ignores the file (random init, as when a checkpoint is loaded over it);
    # it also shows that loading the file is what made `second` equal to `first`.
    unloaded = nets.build_embedding_model(
        params(backbone, weights=str(path)), (32, 32), pretrained=False
    )
    assert not np.allclose(features_of(unloaded, images), expected, rtol=1e-2)


def test_missing_or_unfitting_weights_files_name_the_file(tmp_path):
    missing = tmp_path / "nothing.weights.h5"
    with pytest.raises(
        UserError,
        match=r"^model\.weights: weights file .*nothing\.weights\.h5"
        r"' for backbone small_cnn not found",
    ):
        nets.build_embedding_model(params(weights=str(missing)), (32, 32))

    small = tmp_path / "small.weights.h5"
    nets.build_backbone("small_cnn", (32, 32), "none").save_weights(small)
    with pytest.raises(UserError) as error:
        nets.build_embedding_model(params("mobilenet_v2", weights=str(small)), (32, 32))
    message = str(error.value)
    assert message.startswith(f"model.weights: {str(small)!r} does not fit backbone mobilenet_v2")
    assert "\n" not in message

    junk = tmp_path / "junk.h5"
    junk.write_text("not an HDF5 file")
    with pytest.raises(UserError, match=r"junk\.h5' does not fit backbone small_cnn"):
        nets.build_embedding_model(params(weights=str(junk)), (32, 32))


def test_imagenet_without_network_gives_the_user_error(monkeypatch):
    no_network(monkeypatch)
    with pytest.raises(UserError) as error:
        nets.build_embedding_model(params("resnet_v1_50", weights="imagenet"), (32, 32))
    message = str(error.value)
    assert message.startswith(
        "model.weights: could not download ImageNet weights for resnet_v1_50 (URL fetch failure"
    )
    assert "download resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 (" in message
    assert message.endswith('set model.weights to its path, or use "none"')
    assert "\n" not in message

    with pytest.raises(UserError, match=r"^model\.weights: small_cnn has no ImageNet weights"):
        nets.build_embedding_model(params(weights="imagenet"), (32, 32))

    # pretrained=False never downloads, so embedding from a checkpoint works offline.
    model = nets.build_embedding_model(
        params("mobilenet_v2", weights="imagenet"), (32, 32), pretrained=False
    )
    assert model.output_shape == (None, 16)


def test_imagenet_files_are_the_ones_keras_downloads():
    """Same file name, url and hash as keras.applications(weights="imagenet", include_top=False),
    so both share keras' cache. Read from keras' source instead of building every model."""
    import inspect

    from keras.src.applications import densenet, efficientnet, mobilenet_v2, resnet

    expected = {
        "resnet_v1_50": ("resnet50", resnet.BASE_WEIGHTS_PATH, resnet.WEIGHTS_HASHES),
        "resnet_v1_101": ("resnet101", resnet.BASE_WEIGHTS_PATH, resnet.WEIGHTS_HASHES),
        "resnet_v2_50": ("resnet50v2", resnet.BASE_WEIGHTS_PATH, resnet.WEIGHTS_HASHES),
    }
    for backbone, (name, base, hashes) in expected.items():
        file = nets.imagenet_file(backbone)
        assert file.file_name == f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5"
        assert (file.url, file.md5) == (base + file.file_name, hashes[name][1])

    file = nets.imagenet_file("efficientnet_b0")
    assert file.file_name == "efficientnetb0_notop.h5"
    assert file.url == efficientnet.BASE_WEIGHTS_PATH + file.file_name
    assert file.md5 == efficientnet.WEIGHTS_HASHES["b0"][1]

    file = nets.imagenet_file("mobilenet_v2")  # keras' default: alpha 1.0, trained at 224 px
    assert file.file_name == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    assert file.url == mobilenet_v2.BASE_WEIGHT_PATH + file.file_name

    file = nets.imagenet_file("densenet169")
    assert file.url == densenet.DENSENET169_WEIGHT_PATH_NO_TOP
    assert f'file_hash="{file.md5}"' in inspect.getsource(densenet)
    assert nets.imagenet_file("small_cnn") is None


def test_efficientnet_imagenet_file_gives_keras_imagenet_model(monkeypatch, tmp_path):
    """keras' EfficientNet files hold the ImageNet std as the stem's variance; keras' imagenet
    model compensates with an extra layer, we square the variance. Both must compute the same."""
    from keras.src.legacy.saving import legacy_h5_format
    from keras.src.utils import file_utils

    source = keras.applications.EfficientNetB0(
        include_top=False, weights=None, pooling="avg", input_shape=(32, 32, 3)
    )
    norm = norm_of(source)
    norm.adapt_mean.assign([0.485, 0.456, 0.406])
    norm.adapt_variance.assign([0.229, 0.224, 0.225])
    file = tmp_path / "efficientnetb0_notop.h5"  # written the way keras' published files are
    with h5py.File(file, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, source)

    monkeypatch.setattr(file_utils, "get_file", lambda *args, **kwargs: str(file))
    monkeypatch.setattr(keras.utils, "get_file", lambda *args, **kwargs: str(file))
    reference = keras.applications.EfficientNetB0(
        include_top=False, weights="imagenet", pooling="avg", input_shape=(32, 32, 3)
    )
    ours = nets.build_embedding_model(params("efficientnet_b0", weights="imagenet"), (32, 32))

    images = pixels(2)
    expected = keras.ops.convert_to_numpy(reference(images.astype("float32"), training=False))
    scale = np.abs(expected).max()
    assert np.abs(features_of(ours, images) - expected).max() < 1e-4 * scale
    unfixed = keras.ops.convert_to_numpy(source(images.astype("float32"), training=False))
    assert np.abs(unfixed - expected).max() > 1e-2 * scale  # the difference the fix makes

    # Weights saved from our model already hold the squared std: loading them again (which runs
    # the fix again) must leave them alone.
    backbone = ours.get_layer("backbone")
    before = [keras.ops.convert_to_numpy(w) for w in backbone.weights]
    resolve(nets.BACKBONES.get("efficientnet_b0").meta["after_load"])(backbone)
    for old, new in zip(before, backbone.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(new), old)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(norm_of(backbone).adapt_variance),
        np.square([0.229, 0.224, 0.225]),
        rtol=1e-6,
    )
