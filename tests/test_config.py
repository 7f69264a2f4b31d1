"""The config is the user interface: every mistake gets one line naming the key and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import config
from config import legacy
from config.schema import reference, resolve
from tfcbir import UserError

REPO = Path(__file__).resolve().parent.parent

MINIMAL = {
    "data": {"root": "datasets/demo_shapes"},
    "model": {"backbone": "small_cnn", "weights": "none"},
}


def write(tmp_path: Path, content, name="run.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_defaults_are_filled_and_name_is_the_file_stem(tmp_path):
    resolved = config.load(write(tmp_path, MINIMAL, "my_run.json"))
    assert resolved["name"] == "my_run"
    assert resolved["seed"] == 0
    assert resolved["data"]["image_size"] == [224, 224]
    assert resolved["data"]["split"] == {
        "by": "auto",
        "test_fraction": 0.2,
        "train_classes": 0.5,
        "order": "random",
    }
    assert resolved["model"]["head"] == "direct_normalize"
    assert resolved["loss"]["name"] == "semi_hard_triplet"
    assert resolved["loss"]["margin"] == pytest.approx(1.0)
    assert resolved["loss"]["metric"] == "euclidean"
    assert resolved["train"]["batch"] == {"P": 20, "K": 2}
    assert resolved["train"]["optimizer"]["lr"] == pytest.approx(3e-4)


def test_yaml_is_accepted(tmp_path):
    text = (
        "data: {root: /somewhere}\nmodel: {backbone: small_cnn, weights: none}\n"
        "loss: {name: angular, alpha: 30}\n"
    )
    resolved = config.load(write(tmp_path, text, "y.yaml"))
    assert resolved["loss"] == {
        "name": "angular",
        **{k: v for k, v in resolved["loss"].items() if k != "name"},
    }
    assert resolved["loss"]["alpha"] == pytest.approx(30.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"loss": {"name": "angualr"}},
            "loss.name: 'angualr' is not one of semi_hard_triplet, angular",
        ),
        (
            {"loss": {"name": "semi_hard_triplet", "margin": -1}},
            "loss.margin: -1 is below the minimum 0",
        ),
        (
            {"loss": {"name": "semi_hard_triplet", "metric": "manhattan"}},
            "loss.metric: 'manhattan' is not one of euclidean, squared_euclidean, cosine",
        ),
        ({"train": {"steps": "many"}}, "train.steps: 'many' is not an integer"),
        ({"train": {"stesp": 10}}, "train.stesp: unknown key; allowed keys are batch, steps"),
        ({"train": {"batch": {"P": 0}}}, "train.batch.P: 0 is below the minimum 1"),
        (
            {"train": {"optimizer": {"name": "rmsprop"}}},
            "train.optimizer.name: 'rmsprop' is not one of adam, adamw, sgd",
        ),
        (
            {"data": {"root": "x", "image_size": [224]}},
            "data.image_size: [224] has 1 items; give a list of 2 integers",
        ),
        (
            {"data": {"root": "x", "split": {"by": "random"}}},
            "data.split.by: 'random' is not one of auto, images, classes",
        ),
        (
            {"data": {"root": "x", "split": {"by": "images", "test_fraction": 1.5}}},
            "data.split.test_fraction: 1.5 must be less than 1",
        ),
        ({"data": None}, "data.root: missing"),
        (
            {"model": {"backbone": "resnet50", "weights": "none"}},
            "model.backbone: 'resnet50' is not one of",
        ),
        (
            {"data": {"root": "x", "image_size": [64, 64], "resize": [32, 32]}},
            "data.resize: [32, 32] is smaller than data.image_size [64, 64]",
        ),
        ({"seed": True}, "seed: true is not an integer"),
        ({"name": "a b"}, "name: 'a b' is not a usable folder name"),
        ({"loss": {"name": "angular", "alpha": 90}}, "loss.alpha: 90 must be less than 90"),
        ({"loss": {"name": "angular"}, "train": {"batch": {"P": 4, "K": 1}}}, "K >= 2"),
        # A name that is not a string: the unknown-name error, not Python's "unhashable".
        (
            {"loss": {"name": "siglip", "image_loss": {"name": ["ntxent"]}}},
            "loss.image_loss.name: ['ntxent'] is not one of semi_hard_triplet, angular",
        ),
        (
            {"loss": {"name": "clip", "image_loss": {"name": {"ntxent": 1}}}},
            "loss.image_loss.name: {'ntxent': 1} is not one of semi_hard_triplet",
        ),
        # JSON writes NaN and Infinity; no parameter means them.
        ({"loss": {"name": "siglip", "bias": float("nan")}}, "loss.bias: nan is not a finite"),
        (
            {"loss": {"name": "siglip", "image_loss": {"name": "ntxent", "weight": float("inf")}}},
            "loss.image_loss.weight: inf is not a finite number; give a number > 0",
        ),
        (
            {"train": {"optimizer": {"lr": float("inf")}}},
            "train.optimizer.lr: inf is not a finite number; give a number > 0",
        ),
        # CLIP's clamp acts after updates only: a start above it would stay there (or overflow).
        (
            {"loss": {"name": "clip", "temperature": 0.001, "learn_temperature": False}},
            "loss.temperature: 0.001 starts the logit scale at 1000, above "
            "loss.max_logit_scale 100; raise the temperature to at least 0.01",
        ),
    ],
)
def test_bad_configs_are_rejected_with_the_key_path(tmp_path, change, message):
    raw = json.loads(json.dumps(MINIMAL))
    for section, values in change.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    path = write(tmp_path, raw)
    with pytest.raises(UserError) as caught:
        config.load(path)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ")
    assert message in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"data": {"root": "x"},}', "line 1 column 24"),
        ("[1, 2]", "not a mapping"),
        ("data: [unclosed\n", "line 2"),
    ],
)
def test_unreadable_files_name_the_file_and_line(tmp_path, content, message):
    name = "bad.yaml" if content.startswith("data:") else "bad.json"
    path = write(tmp_path, content, name)
    with pytest.raises(UserError, match=message):
        config.load(path)


def test_yaml_nan_and_infinity_are_refused(tmp_path):
    for value, shown in ((".nan", "nan"), ("-.inf", "-inf")):
        text = (
            "data: {root: /somewhere}\nmodel: {backbone: small_cnn, weights: none}\n"
            f"loss: {{name: angular, alpha: {value}}}\n"
        )
        with pytest.raises(UserError, match=f"loss.alpha: {shown} is not a finite number"):
            config.load(write(tmp_path, text, "y.yaml"))


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        config.load(tmp_path / "nope.json")
    with pytest.raises(UserError, match="unknown config format '.toml'"):
        config.load(write(tmp_path, "x", "a.toml"))


def test_legacy_config_is_translated_with_a_warning(tmp_path, caplog):
    old = {
        "dataset": "bags_40",
        "model": {
            "name": "small_cnn",
            "head": "direct_normalize",
            "input": 64,
            "crop": 72,
            "weights": "none",
            "batch": {"P": 10, "K": 2},
            "fit": {
                "loss": "angular_loss",
                "alpha": 30,
                "optimizer": "momentum",
                "epochs": 1234,
                "lr": 0.01,
                "decay_start_iteration": 600,
            },
        },
    }
    with caplog.at_level("WARNING", logger="tfcbir"):
        resolved = config.load(write(tmp_path, old, "old.json"))
    assert "original system's form" in caplog.text
    assert '"name": "angular"' in caplog.text
    assert resolved["data"]["root"] == "datasets/bags_40"
    assert resolved["data"]["image_size"] == [64, 64]
    assert resolved["data"]["resize"] == [72, 72]
    assert resolved["loss"]["name"] == "angular"
    assert resolved["loss"]["alpha"] == pytest.approx(30.0)
    assert resolved["train"]["steps"] == 1234
    assert resolved["train"]["batch"] == {"P": 10, "K": 2}
    assert resolved["train"]["optimizer"]["name"] == "sgd"
    assert resolved["train"]["lr_schedule"]["name"] == "linear"
    assert resolved["train"]["lr_schedule"]["decay_start"] == 600


def test_legacy_semi_hard_metric_names_and_unknown_keys():
    new = legacy.translate(
        {
            "dataset": "d",
            "model": {
                "fit": {"loss": "triplet_semihard_loss", "margin": 0.5, "metric": "squared-L2"}
            },
        }
    )
    assert new["loss"] == {
        "name": "semi_hard_triplet",
        "margin": 0.5,
        "metric": "squared_euclidean",
    }
    with pytest.raises(UserError, match="model.fit.lossy: unknown key"):
        legacy.translate({"dataset": "d", "model": {"fit": {"lossy": 1}}})


@pytest.mark.parametrize(
    "path",
    sorted((REPO / "trainings").rglob("*.json")) + sorted((REPO / "trainings").rglob("*.yaml")),
    ids=lambda p: str(p.relative_to(REPO / "trainings")),
)
def test_every_shipped_config_loads(path):
    resolved = config.load(path)
    assert resolved["name"] == path.stem


def test_new_and_legacy_shipped_configs_agree():
    for old in sorted((REPO / "trainings" / "legacy").glob("*.json")):
        new = REPO / "trainings" / old.name
        assert config.load(old) == config.load(new), old.name


def test_reference_lists_every_key():
    keys = [row[0] for row in reference()]
    for key in (
        "seed",
        "data.root",
        "data.split.by",
        "model.embedding_dim",
        "train.batch.P",
        "train.lr_schedule.decay_start",
        "eval.protocol",
    ):
        assert key in keys


def test_hashes_follow_what_matters():
    base = resolve(MINIMAL)
    other_steps = resolve({**MINIMAL, "train": {"steps": 5}})
    assert config.model_hash(base) == config.model_hash(other_steps)
    assert config.config_hash(base) != config.config_hash(other_steps)
    other_dim = resolve({**MINIMAL, "model": {**MINIMAL["model"], "embedding_dim": 32}})
    assert config.model_hash(base) != config.model_hash(other_dim)


def test_data_dir_from_environment_or_configuration(tmp_path, monkeypatch):
    monkeypatch.setenv("TFCBIR_DATA_DIR", str(tmp_path))
    assert config.data_dir() == tmp_path.resolve()
    resolved = resolve({**MINIMAL, "name": "x"})
    assert config.run_dir(resolved) == tmp_path.resolve() / "trainings" / "x"
    assert config.data_root(resolved) == tmp_path.resolve() / "datasets" / "demo_shapes"


def test_docs_document_every_key_and_loss():
    from config.reference import PAGE, with_reference
    from config.schema import reference_markdown

    page = PAGE.read_text(encoding="utf-8")
    assert PAGE == REPO / "docs" / "config.md"
    # Regenerate with: python -m config.reference
    assert reference_markdown() in page
    assert with_reference(page) == page
    import losses

    losses_page = (REPO / "docs" / "losses.md").read_text(encoding="utf-8")
    for name in losses.LOSSES.names():
        assert f"## {name}\n" in losses_page, name
        for param in losses.LOSSES.get(name).params:
            assert f"| {param} |" in losses_page, f"{name}.{param}"


def test_validating_a_config_needs_no_tensorflow(tmp_path):
    """evaluation.py and train.py --check start fast: loading a config imports no TensorFlow."""
    import subprocess
    import sys

    path = tmp_path / "c.json"
    path.write_text(json.dumps({**MINIMAL, "loss": {"name": "proxy_anchor"}}))
    code = (
        "import sys, config, retrieval.evaluate\n"
        f"config.load({str(path)!r})\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))\n"
        "print(heavy[:3])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("loss", "head", "normalized"),
    [
        ({"name": "semi_hard_triplet"}, "direct", False),  # Euclidean distances
        ({"name": "semi_hard_triplet", "metric": "squared_euclidean"}, "direct", False),
        ({"name": "semi_hard_triplet", "metric": "cosine"}, "direct", True),
        ({"name": "contrastive", "metric": "cosine"}, "fc1024", True),
        ({"name": "ntxent"}, "direct", True),  # losses on angles
        ({"name": "angular"}, "direct", True),
        ({"name": "npair"}, "fc1024", True),
        ({"name": "multi_similarity"}, "direct", True),
        ({"name": "proxy_anchor"}, "direct", True),
        ({"name": "arcface"}, "direct", True),
        ({"name": "batch_hard_triplet"}, "direct_normalize", True),  # unit vectors: same ranking
    ],
)
def test_search_geometry_follows_the_loss(loss, head, normalized):
    resolved = resolve({**MINIMAL, "model": {**MINIMAL["model"], "head": head}, "loss": loss})
    assert config.normalized_embeddings(resolved) is normalized


def test_split_order_is_a_config_key():
    resolved = resolve({**MINIMAL, "data": {**MINIMAL["data"], "split": {"order": "sorted"}}})
    assert resolved["data"]["split"]["order"] == "sorted"
    with pytest.raises(UserError, match="data.split.order: 'alphabetic' is not one of random"):
        resolve({**MINIMAL, "data": {**MINIMAL["data"], "split": {"order": "alphabetic"}}})
