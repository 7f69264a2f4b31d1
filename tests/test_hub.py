"""Foundation backbones (nets/hub.py) and their training knobs, offline.

Every preset here is built by the test itself: tiny CLIP, SigLIP, DINOv2, DINOv3 and ViT configs
(1-2 transformer blocks, 16-wide, 32 px images, random weights) saved with keras-hub's
``save_to_preset`` into a temporary folder and loaded back through ``hub:<folder>``, the path a
user without internet takes. Nothing is downloaded: keras-hub's loader is replaced where a
named preset would go to the network.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import config  # noqa: E402
import nets  # noqa: E402
from tests.conftest import REPO, tiny_config  # noqa: E402
from tfcbir import UserError  # noqa: E402

keras_hub = pytest.importorskip("keras_hub")

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY = {"num_layers": 2, "num_heads": 2, "hidden_dim": 16}


def _normalizer(mean, std) -> dict:
    """An ImageConverter's scale and offset for (x / 255 - mean) / std."""
    return {
        "scale": [1.0 / (255.0 * s) for s in std],
        "offset": [-m / s for m, s in zip(mean, std)],
    }


def _tiny_presets() -> dict:
    """family -> (keras-hub backbone, its image converter), random weights, 32 px images."""
    v = {"patch_size": 8, "intermediate_dim": 32, "image_shape": (32, 32, 3), **TINY}
    text = {
        "vocabulary_size": 20,
        "embedding_dim": 16,
        "num_layers": 1,
        "num_heads": 2,
        "hidden_dim": 16,
        "intermediate_dim": 32,
        "max_sequence_length": 8,
    }
    models, layers = keras_hub.models, keras_hub.layers
    return {
        "clip": (
            models.CLIPBackbone(
                models.CLIPVisionEncoder(**v), models.CLIPTextEncoder(**text), projection_dim=12
            ),
            layers.CLIPImageConverter(image_size=(32, 32), **_normalizer(CLIP_MEAN, CLIP_STD)),
        ),
        "siglip": (
            models.SigLIPBackbone(
                models.SigLIPVisionEncoder(**v), models.SigLIPTextEncoder(**text)
            ),
            layers.SigLIPImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0),
        ),
        "dinov2": (
            models.DINOV2Backbone(**v, position_embedding_shape=(32, 32, 3)),
            layers.DINOV2ImageConverter(
                image_size=(32, 32), **_normalizer(IMAGENET_MEAN, IMAGENET_STD)
            ),
        ),
        "dinov3": (
            models.DINOV3Backbone(**v),
            layers.DINOV3ImageConverter(
                image_size=(32, 32), **_normalizer(IMAGENET_MEAN, IMAGENET_STD)
            ),
        ),
        "vit": (
            models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, mlp_dim=32, **TINY),
            layers.ViTImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0),
        ),
    }


@pytest.fixture(scope="session")
def presets(tmp_path_factory) -> dict:
    """family -> ``hub:<folder>`` of a tiny saved preset (backbone and image converter)."""
    root = tmp_path_factory.mktemp("presets")
    keras.utils.set_random_seed(0)
    out = {}
    for family, (backbone, converter) in _tiny_presets().items():
        folder = root / family
        backbone.save_to_preset(str(folder))
        converter.save_to_preset(str(folder))
        out[family] = f"hub:{folder}"
    return out


def model_params(backbone, head="identity", **extra) -> dict:
    return {"backbone": backbone, "weights": "pretrained", "head": head, **extra}


def pixels(n=3, size=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def numpy(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


# --- the install --------------------------------------------------------------------------------


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_keras_hub_installs_beside_one_tensorflow():
    """The install trap: tensorflow-text's wheels require `tensorflow`, which pip would install
    over tensorflow-cpu into the same folder. The Makefile installs keras-hub and
    tensorflow-text with --no-deps, so exactly one TensorFlow distribution is there."""
    assert _installed("tensorflow-cpu") != _installed("tensorflow")
    import tensorflow_text  # noqa: F401  (it runs on tensorflow-cpu alone)

    assert keras_hub.__version__ == importlib.metadata.version("keras-hub")


# --- config values ------------------------------------------------------------------------------


def test_config_takes_hub_values_without_importing_tensorflow(tmp_path):
    folder = tmp_path / "my preset"
    folder.mkdir()
    (folder / "config.json").write_text('{"registered_name": "keras_hub>CLIPBackbone"}')
    raw = {
        "data": {"root": "somewhere"},
        "model": {"backbone": f"hub:{folder}", "freeze_backbone": 2, "head_dropout": 0.1},
        "train": {"optimizer": {"backbone_lr_multiplier": 0.1}},
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    code = (
        "import sys, config\n"
        f"c = config.load({str(path)!r})\n"
        "config.model_hash(c)\n"
        "heavy = sorted(m for m in sys.modules\n"
        "               if m.split('.')[0] in ('tensorflow', 'keras', 'keras_hub'))\n"
        "print(c['model']['freeze_backbone'], heavy[:3])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2 []"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"backbone": "hub:"}, r"^model\.backbone: 'hub:' is not one of resnet_v1_50, .*hub:<"),
        ({"backbone": "resnet50"}, r"^model\.backbone: 'resnet50' is not one of resnet_v1_50"),
        ({"freeze_backbone": 0}, r"^model\.freeze_backbone: 0 is below the minimum 1"),
        ({"freeze_backbone": "yes"}, r"^model\.freeze_backbone: 'yes' is not a boolean or an"),
        ({"head_dropout": 1.0}, r"^model\.head_dropout: 1\.0 must be less than 1"),
    ],
)
def test_bad_model_values_are_one_line_errors(model, message):
    with pytest.raises(UserError, match=message) as error:
        config.resolve({"data": {"root": "x"}, "model": model})
    assert "\n" not in str(error.value)


def test_bad_presets_are_one_line_errors_at_build_time(tmp_path, presets, monkeypatch):
    def build(backbone):
        with pytest.raises(UserError) as error:
            nets.build_embedding_model(model_params(backbone), (32, 32))
        assert "\n" not in str(error.value)
        return str(error.value)

    missing = build(f"hub:{tmp_path / 'nowhere'}")
    assert missing.startswith(f"model.backbone: hub:{tmp_path / 'nowhere'}: no such preset")
    assert "save the preset with keras-hub" in missing

    (tmp_path / "empty").mkdir()
    assert "is not a keras-hub preset directory (no config.json)" in build(
        f"hub:{tmp_path / 'empty'}"
    )

    typo = build("hub:clip_vit_base_patch3")
    assert "is neither a keras-hub preset nor a preset directory" in typo
    assert "did you mean hub:clip_vit_base_patch32?" in typo

    # A preset without its image converter: says how to save one.
    folder = tmp_path / "no_converter"
    shutil.copytree(presets["vit"][4:], folder)
    (folder / "image_converter.json").unlink()
    assert "ImageConverter.from_preset(<name>).save_to_preset(<folder>)" in build(f"hub:{folder}")

    # A keras-hub backbone without an image tower.
    text_only = tmp_path / "text_only"
    keras_hub.models.CLIPTextEncoder(
        vocabulary_size=20,
        embedding_dim=8,
        hidden_dim=8,
        num_layers=1,
        num_heads=2,
        intermediate_dim=16,
        max_sequence_length=8,
    ).save_to_preset(str(text_only))
    assert "a CLIPTextEncoder preset has no image tower here" in build(f"hub:{text_only}")

    # A named preset on a machine without internet (the download is replaced by its failure).
    def offline(*args, **kwargs):
        raise ConnectionError("Max retries exceeded (Caused by NameResolutionError)")

    monkeypatch.setattr(keras_hub.models.Backbone, "from_preset", offline)
    no_network = build("hub:dinov2_small")
    assert no_network.startswith("model.backbone: hub:dinov2_small: could not download")
    assert "NameResolutionError" in no_network and "hub:<folder>" in no_network


# --- what each family computes -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["clip", "siglip", "dinov2", "dinov3", "vit"])
def test_each_tower_gives_the_presets_own_image_features(presets, family):
    """Our model (preprocessing + tower, identity head) equals keras-hub's own computation on
    the preset: its image converter, then CLIP's/SigLIP's image embedding, or the class token
    of the backbone's output for DINOv2, DINOv3 and ViT."""
    model = nets.build_embedding_model(model_params(presets[family]), (32, 32))
    images = pixels(3)
    ours = numpy(model(images, training=False))

    folder = presets[family][4:]
    backbone = keras_hub.models.Backbone.from_preset(folder)
    converter = keras_hub.layers.ImageConverter.from_preset(folder)
    x = converter(images.astype("float32"))
    if family in ("clip", "siglip"):
        reference = backbone.get_vision_embeddings(x)
    else:
        key = next(iter(backbone.input)) if isinstance(backbone.input, dict) else None
        reference = backbone({key: x} if key else x)[:, 0, :]
    reference = numpy(reference)
    assert ours.shape == reference.shape == (3, 12 if family == "clip" else 16)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
    assert np.abs(reference).max() > 1e-2  # not a trivially zero feature


@pytest.mark.parametrize("family", ["clip", "vit"])
def test_preprocessing_is_the_presets_converter_on_the_same_pixels(presets, family):
    """scale_offset with the preset's values gives keras-hub's converter output bit for bit
    (per-channel values for CLIP, one number for ViT)."""
    from nets import hub
    from nets.layers import ImagePreprocessing

    values = hub.preprocessing(presets[family])
    assert values["mode"] == "scale_offset"
    layer = ImagePreprocessing(**values)
    converter = keras_hub.layers.ImageConverter.from_preset(presets[family][4:])
    images = pixels(4)
    ours = numpy(layer(images))
    theirs = numpy(converter(images.astype("float32")))
    np.testing.assert_array_equal(ours, theirs)
    if family == "clip":  # the CLIP normalisation, per channel
        expected = (images / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    # The layer serialises with its values.
    again = ImagePreprocessing.from_config(layer.get_config())
    np.testing.assert_array_equal(numpy(again(images)), ours)


def test_image_size_is_the_presets_or_any_patch_multiple_for_dino(presets):
    with pytest.raises(UserError) as error:
        nets.build_embedding_model(model_params(presets["clip"]), (48, 48))
    assert str(error.value) == (
        f"data.image_size: [48, 48], but {presets['clip']} takes 32x32 images; set "
        "data.image_size to [32, 32] (and data.resize to at least that, or null)"
    )
    # DINOv2 interpolates its position embeddings (DINOv3's are rotary): any multiple of 8.
    for family in ("dinov2", "dinov3"):
        model = nets.build_embedding_model(model_params(presets[family]), (48, 48))
        assert model.input_shape == (None, 48, 48, 3) and model.output_shape == (None, 16)
        assert np.isfinite(numpy(model(pixels(2, size=48)))).all()
    with pytest.raises(UserError, match=r"multiple of its patch size 8; e\.g\. \[48, 48\]"):
        nets.build_embedding_model(model_params(presets["dinov2"]), (44, 44))


def test_random_init_and_weights_files_for_hub_backbones(presets, tmp_path):
    """weights none: the preset's architecture with random weights; a weights file saved from
    a tower loads into it, like the registry backbones' files."""
    pretrained = nets.build_embedding_model(model_params(presets["vit"]), (32, 32))
    random = nets.build_embedding_model(model_params(presets["vit"], weights="none"), (32, 32))
    images = pixels(2)
    assert not np.allclose(numpy(pretrained(images)), numpy(random(images)), atol=1e-3)
    path = tmp_path / "tower.weights.h5"
    pretrained.get_layer("backbone").save_weights(path)
    loaded = nets.build_embedding_model(model_params(presets["vit"], weights=str(path)), (32, 32))
    np.testing.assert_allclose(numpy(loaded(images)), numpy(pretrained(images)), atol=1e-6)


# --- freezing ----------------------------------------------------------------------------------


def _trainable_paths(model) -> set[str]:
    return {v.path for v in model.get_layer("backbone").trainable_variables}


def test_freeze_backbone_by_blocks_per_family(presets):
    """n: the last n transformer blocks and what follows them train; the patch embedding and
    earlier blocks do not. true: nothing of the backbone trains."""
    for family, backbone in presets.items():
        last = nets.build_embedding_model(model_params(backbone, freeze_backbone=1), (32, 32))
        frozen = nets.build_embedding_model(model_params(backbone, freeze_backbone=True), (32, 32))
        trained = _trainable_paths(last)
        full = nets.build_embedding_model(model_params(backbone), (32, 32))
        assert 0 < len(trained) < len(_trainable_paths(full)), family
        assert not _trainable_paths(frozen), family
        assert all("embed" not in path for path in trained), (family, sorted(trained))
        # The one block left is the last (blocks are numbered from 0 or 1 in their names).
        numbers = {
            int(part.rsplit("_", 1)[-1])
            for path in trained
            for part in path.split("/")
            if part.rsplit("_", 1)[-1].isdigit() and ("block" in part or "layers" in part)
        }
        assert len(numbers) == 1, (family, sorted(trained))
    with pytest.raises(UserError, match=r"^model\.freeze_backbone: 3 blocks to train, but"):
        nets.build_embedding_model(model_params(presets["vit"], freeze_backbone=3), (32, 32))


def test_freeze_backbone_of_registry_backbones_by_stage():
    """small_cnn's stages are its 4 conv blocks: n = 1 trains block4 only."""
    params = {"backbone": "small_cnn", "weights": "none", "head": "direct", "embedding_dim": 8}
    model = nets.build_embedding_model({**params, "freeze_backbone": 1}, (32, 32))
    assert {p.split("/")[0] for p in _trainable_paths(model)} == {"block4_conv", "block4_bn"}
    model = nets.build_embedding_model({**params, "freeze_backbone": 4}, (32, 32))
    assert len(_trainable_paths(model)) == 12  # 4 x (conv kernel, BN gamma and beta)


def _train_steps(model, groups_of, train_cfg, loss, steps, images, labels):
    """``steps`` training steps of the trainer's own step function; returns the losses."""
    import tensorflow as tf

    import losses
    from training.image import make_step
    from training.optim import build_optimizer

    loss_fn = losses.get(loss, num_classes=int(labels.max()) + 1)
    loss_variables = []
    if hasattr(loss_fn, "trainable_variables"):
        loss_fn(tf.constant(labels[:2]), model(images[:2], training=False))
        loss_variables = list(loss_fn.trainable_variables)
    groups = groups_of(model, loss_fn, loss_variables, train_cfg)
    optimizer = build_optimizer(train_cfg, groups)
    step = make_step(model, loss_fn, optimizer, groups, tf.distribute.get_strategy(), False)
    return [float(step(tf.constant(images), tf.constant(labels))) for _ in range(steps)]


def _sgd(lr=0.05, multiplier=1.0) -> dict:
    train_cfg = config.resolve(tiny_config())["train"]
    train_cfg["optimizer"] = {
        **train_cfg["optimizer"],
        "name": "sgd",
        "momentum": 0.0,
        "lr": lr,
        "backbone_lr_multiplier": multiplier,
    }
    return train_cfg


@pytest.mark.parametrize("backbone", ["clip", "small_cnn"])
def test_a_frozen_backbone_stays_bitwise_unchanged(presets, backbone):
    """freeze_backbone true: after training steps every backbone weight, BatchNorm moving
    statistics included (small_cnn), is bitwise what it was; the head moved."""
    from training.optim import trainable_groups

    name = presets.get(backbone, backbone)
    params = {**model_params(name, "direct_normalize", embedding_dim=8), "freeze_backbone": True}
    if backbone == "small_cnn":
        params["weights"] = "none"
    model = nets.build_embedding_model(params, (32, 32))
    before = [numpy(w).copy() for w in model.get_layer("backbone").weights]
    head_before = numpy(model.get_layer("head_projection").kernel).copy()
    images, labels = pixels(8), np.repeat(np.arange(4), 2)
    losses_ = _train_steps(
        model, trainable_groups, _sgd(), {"name": "contrastive"}, 3, images, labels
    )
    assert all(np.isfinite(losses_)) and losses_[-1] < losses_[0]  # the head learns
    for w, old in zip(model.get_layer("backbone").weights, before):
        np.testing.assert_array_equal(numpy(w), old, err_msg=w.path)
    assert np.abs(numpy(model.get_layer("head_projection").kernel) - head_before).max() > 1e-4
    # Frozen BatchNorm runs in inference mode: training and inference features agree.
    features = model.get_layer("backbone")
    x = model.get_layer("preprocess")(images)
    np.testing.assert_allclose(
        numpy(features(x, training=True)), numpy(features(x, training=False)), atol=1e-6
    )


def test_backbone_lr_multiplier_scales_the_backbones_first_step(presets):
    """One SGD step from the same weights on the same batch: with backbone_lr_multiplier 0.1
    the backbone moves 0.1 times as far as with 1 (same gradient, a tenth of the rate); the
    head moves the same."""
    from training.optim import trainable_groups

    params = model_params(presets["clip"], "direct_normalize", embedding_dim=8)
    initial = nets.build_embedding_model(params, (32, 32)).get_weights()
    images, labels = pixels(8), np.repeat(np.arange(4), 2)
    moved = {}
    for multiplier in (1.0, 0.1):
        model = nets.build_embedding_model(params, (32, 32))
        model.set_weights(initial)
        _train_steps(
            model,
            trainable_groups,
            _sgd(lr=0.5, multiplier=multiplier),
            {"name": "contrastive"},
            1,
            images,
            labels,
        )
        backbone = model.get_layer("backbone")
        n = len(backbone.weights)
        delta = [numpy(w) - w0 for w, w0 in zip(model.weights, initial)]
        moved[multiplier] = (
            np.sqrt(sum(np.sum(d**2) for d in delta[:n])),
            np.concatenate([d.ravel() for d in delta[n:]]),
        )
    (backbone_1, head_1), (backbone_01, head_01) = moved[1.0], moved[0.1]
    assert backbone_1 > 1e-4  # the step moved the backbone
    assert backbone_01 / backbone_1 == pytest.approx(0.1, rel=1e-3)
    np.testing.assert_allclose(head_01, head_1, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["vit", "clip", "dinov2"])
def test_layer_decay_multipliers_follow_the_depth(presets, family):
    """layer_decay d on a 2-block tower at backbone_lr_multiplier m: the embeddings train at
    m d^3, block 0 at m d^2, block 1 at m d, the layers after the blocks at m, the head at 1;
    every trainable variable is in exactly one group."""
    from training.optim import trainable_groups

    model = nets.build_embedding_model(
        model_params(presets[family], "direct_normalize", embedding_dim=8), (32, 32)
    )
    train_cfg = _sgd(multiplier=0.5)
    train_cfg["optimizer"]["layer_decay"] = 0.75
    groups = trainable_groups(model, None, [], train_cfg)
    rates = {group.name: group.lr_multiplier for group in groups}
    expected = {
        "backbone.embeddings": 0.5 * 0.75**3,
        "backbone.block0": 0.5 * 0.75**2,
        "backbone.block1": 0.5 * 0.75,
        "head": 1.0,
    }
    for name, rate in expected.items():
        assert rates[name] == pytest.approx(rate, rel=1e-12), (family, rates)
    assert rates.get("backbone.top", 0.5) == 0.5  # final norm (CLIP: pooler, projection)
    by_group = {v.path: g.name for g in groups for v in g.variables}
    assert sum(len(g.variables) for g in groups) == len(by_group)
    assert set(by_group) == {v.path for v in model.trainable_variables}
    # The position embedding is the stem's; a block's attention weights are the block's.
    embeddings = [p for p, g in by_group.items() if g == "backbone.embeddings"]
    assert embeddings and all("embed" in p or "norm" in p for p in embeddings), embeddings
    # Without layer_decay (null or 1): one backbone group at m, as before.
    for decay in (None, 1.0):
        train_cfg["optimizer"]["layer_decay"] = decay
        names = [g.name for g in trainable_groups(model, None, [], train_cfg)]
        assert names == ["backbone", "head"]


def test_layer_decay_scales_one_sgd_step_block_by_block(presets):
    """One SGD step from the same weights: under layer_decay 0.5 the 2-block ViT's patch and
    position embeddings move 0.125 times as far as without, its first block (named
    transformer_block_1) 0.25 times, its second 0.5 times, its final norm and the head as far."""
    from training.optim import trainable_groups

    params = model_params(presets["vit"], "direct_normalize", embedding_dim=8)
    initial = nets.build_embedding_model(params, (32, 32)).get_weights()
    images, labels = pixels(8), np.repeat(np.arange(4), 2)
    deltas = {}
    for decay in (None, 0.5):
        model = nets.build_embedding_model(params, (32, 32))
        model.set_weights(initial)
        train_cfg = _sgd(lr=0.5)
        train_cfg["optimizer"]["layer_decay"] = decay
        _train_steps(model, trainable_groups, train_cfg, {"name": "contrastive"}, 1, images, labels)
        deltas[decay] = {
            w.path: numpy(w) - w0 for w, w0 in zip(model.weights, initial) if w.trainable
        }
    expected = {
        "vit_patching_and_embedding/": 0.125,
        "vit_encoder/transformer_block_1/": 0.25,
        "vit_encoder/transformer_block_2/": 0.5,
        "vit_encoder/ln/": 1.0,
        "head_projection/kernel": 1.0,
    }
    checked = set()
    for path, plain in deltas[None].items():
        prefix = next((p for p in expected if path.startswith(p)), None)
        if prefix is None or np.linalg.norm(plain) < 1e-6:
            continue
        ratio = np.linalg.norm(deltas[0.5][path]) / np.linalg.norm(plain)
        assert ratio == pytest.approx(expected[prefix], rel=1e-3), path
        checked.add(prefix)
    assert checked == set(expected)


def test_layer_decay_is_refused_for_a_backbone_without_blocks():
    raw = {"data": {"root": "x"}, "model": {"backbone": "small_cnn"}}
    raw["train"] = {"optimizer": {"layer_decay": 0.65}}
    with pytest.raises(
        UserError, match=r"^train\.optimizer\.layer_decay: small_cnn has no"
    ) as error:
        config.resolve(raw)
    assert "\n" not in str(error.value)
    raw["train"]["optimizer"]["layer_decay"] = 1.5
    with pytest.raises(UserError, match=r"^train\.optimizer\.layer_decay: 1\.5"):
        config.resolve(raw)
    for decay in (None, 1.0):  # no decay: fine for any backbone
        raw["train"]["optimizer"]["layer_decay"] = decay
        config.resolve(raw)


def test_a_hub_run_with_layer_decay_resumes_exactly(data_dir, presets):
    from runs import checkpoint
    from training.trainer import train

    def run(steps, name):
        raw = config.resolve(
            {
                **tiny_config(
                    model__backbone=presets["vit"],
                    model__weights="pretrained",
                    model__embedding_dim=8,
                    train__steps=steps,
                    train__checkpoint_every=2,
                    train__validate_every=0,
                    train__optimizer__layer_decay=0.65,
                ),
                "name": name,
            }
        )
        return raw

    train(run(2, "decay_resumed"))
    resumed = train(run(4, "decay_resumed"))
    straight = train(run(4, "decay_straight"))
    assert resumed.step == straight.step == 4
    a = checkpoint.latest(resumed.run.checkpoints)
    b = checkpoint.latest(straight.run.checkpoints)
    for group in ("model", "optimizer"):
        assert len(a.groups[group]) == len(b.groups[group])
        for x, y in zip(a.groups[group], b.groups[group]):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


# --- heads -------------------------------------------------------------------------------------


def test_head_dropout_acts_only_when_training():
    params = {"backbone": "small_cnn", "weights": "none", "embedding_dim": 8}
    for head in ("direct", "fc1024_normalize", "projection", "identity"):
        plain = nets.build_embedding_model({**params, "head": head}, (32, 32))
        dropped = nets.build_embedding_model(
            {**params, "head": head, "head_dropout": 0.5}, (32, 32)
        )
        assert "head_dropout" in [layer.name for layer in dropped.layers]
        dropped.set_weights(plain.get_weights())  # dropout adds no weights
        images = pixels(4)
        np.testing.assert_allclose(
            numpy(dropped(images, training=False)), numpy(plain(images, training=False)), atol=1e-6
        )
        assert not np.allclose(
            numpy(dropped(images, training=True)), numpy(plain(images, training=True)), atol=1e-4
        )


def test_projection_head_is_the_residual_mlp_with_layer_norm():
    features = np.random.default_rng(0).normal(size=(5, 12)).astype("float32")
    inputs = keras.Input(shape=(12,))
    head = keras.Model(inputs, nets.HEADS.get("projection").builder(inputs, 6))
    out = numpy(head(features))
    w1, b1 = (numpy(v) for v in head.get_layer("head_projection_in").weights)
    w2, b2 = (numpy(v) for v in head.get_layer("head_fc").weights)
    gamma, beta = (numpy(v) for v in head.get_layer("head_layer_norm").weights)
    from scipy.special import erf

    p = features @ w1 + b1
    h = (0.5 * p * (1 + erf(p / np.sqrt(2)))) @ w2 + b2 + p
    mean, var = h.mean(axis=1, keepdims=True), h.var(axis=1, keepdims=True)
    expected = (h - mean) / np.sqrt(var + 1e-3) * gamma + beta
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


# --- identity of galleries ---------------------------------------------------------------------


def test_model_hash_knows_the_preset_not_its_folder_or_training_knobs(presets, tmp_path):
    def resolved(backbone, **model):
        return config.resolve(
            {
                "data": {"root": "x", "image_size": [32, 32]},
                "model": {"backbone": backbone, **model},
            }
        )

    clip = resolved(presets["clip"])
    moved = tmp_path / "moved"
    shutil.copytree(presets["clip"][4:], moved)
    assert config.model_hash(resolved(f"hub:{moved}")) == config.model_hash(clip)
    assert config.model_hash(resolved(presets["siglip"])) != config.model_hash(clip)
    (moved / "config.json").write_text((moved / "config.json").read_text().replace("16", "17"))
    assert config.model_hash(resolved(f"hub:{moved}")) != config.model_hash(clip)
    for knob in ({"freeze_backbone": 2}, {"head_dropout": 0.2}, {"weights": "none"}):
        assert config.model_hash(resolved(presets["clip"], **knob)) == config.model_hash(clip)
    assert config.model_hash(resolved("hub:dinov2_small")) != config.model_hash(
        resolved("hub:dinov2_base")
    )


def test_model_hash_of_registry_backbones_is_what_galleries_already_record():
    """Galleries embedded before these keys existed stay valid: the hash of a registry
    backbone's model is computed from the same values as before."""
    import hashlib

    resolved = config.resolve({"data": {"root": "x"}, "model": {"backbone": "small_cnn"}})
    old_model = {"backbone": "small_cnn", "head": "direct_normalize", "embedding_dim": 128}
    before = hashlib.sha256(
        json.dumps(
            {
                "model": old_model,
                "image_size": [224, 224],
                "resize": [256, 256],
                "normalized": True,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    assert config.model_hash(resolved) == before


# --- training end to end -----------------------------------------------------------------------


def _hub_run(presets, loss: str, steps: int, name: str) -> dict:
    """A config training the tiny CLIP preset: last block unfrozen, backbone at 0.1 of the rate,
    projection head with dropout."""
    raw = tiny_config(
        model__backbone=presets["clip"],
        model__weights="pretrained",
        model__head="projection_normalize",
        model__head_dropout=0.1,
        model__freeze_backbone=1,
        model__embedding_dim=8,
        loss={"name": loss},
        train__steps=steps,
        train__checkpoint_every=2,
        train__validate_every=0,
        train__optimizer__backbone_lr_multiplier=0.1,
    )
    return config.resolve({**raw, "name": name})


def test_a_hub_preset_trains_with_an_image_loss(data_dir, presets):
    from training.trainer import train

    result = train(_hub_run(presets, "semi_hard_triplet", 2, "hub_triplet"))
    assert result.step == 2 and np.isfinite(result.loss)


def test_a_hub_preset_resumes_exactly_and_embeds_like_the_trained_model(data_dir, presets):
    """With proxy_anchor (its proxies at 100x the rate, the backbone at 0.1x, dropout in the
    head) a run resumed from its checkpoint ends where a straight run does, bit for bit up to
    float noise; the best weights embed images as the trained model does."""
    from retrieval.embedder import load_embedder
    from runs import checkpoint
    from training.trainer import train

    first = train(_hub_run(presets, "proxy_anchor", 2, "hub_resumed"))
    assert first.step == 2 and np.isfinite(first.loss)
    resumed = train(_hub_run(presets, "proxy_anchor", 4, "hub_resumed"))
    straight = train(_hub_run(presets, "proxy_anchor", 4, "hub_straight"))
    assert resumed.step == straight.step == 4
    a = checkpoint.latest(resumed.run.checkpoints)
    b = checkpoint.latest(straight.run.checkpoints)
    assert a.groups["rng"] and len(a.groups["loss"]) == 1  # dropout's seed state, the proxies
    for group in ("model", "optimizer", "loss", "rng"):
        assert len(a.groups[group]) == len(b.groups[group])
        for x, y in zip(a.groups[group], b.groups[group]):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)

    resolved = _hub_run(presets, "proxy_anchor", 4, "hub_straight")
    embedder = load_embedder(resolved)
    model = nets.build_embedding_model(resolved["model"], (32, 32), pretrained=False)
    model.load_weights(straight.run.best_weights)
    images = pixels(4)
    np.testing.assert_allclose(
        embedder.embed_pixels(images), numpy(model(images, training=False)), atol=1e-5
    )
    assert embedder.dim == 8
