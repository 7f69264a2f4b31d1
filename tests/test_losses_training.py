"""Every registered loss trains the demo model: Recall@1 beats the untrained model's.

Small and quick (a few seconds a loss on 2 cores); the numbers are printed (pytest -s) for the
record, the assertion is only "better than untrained".
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import config
import losses
import nets
from datasets.demo import generate
from datasets.lists import load_splits
from tests.conftest import tiny_config
from training.trainer import train
from training.validation import Validator

STEPS = 80


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """6 shape classes x 30 images at 32 px, and a data_dir holding them."""
    root = tmp_path_factory.mktemp("losses") / "data"
    generate(root / "datasets" / "shapes", classes=6, per_class=30, size=32, seed=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFCBIR_DATA_DIR", str(root))
        yield root


def untrained_recall(resolved: dict) -> float:
    keras.utils.set_random_seed(resolved["seed"])
    model = nets.build_embedding_model(resolved["model"], tuple(resolved["data"]["image_size"]))
    return validator(resolved).recall_at_1(model)


def validator(resolved: dict) -> Validator:
    splits = load_splits(config.data_root(resolved), resolved["data"]["split"], resolved["seed"])
    return Validator(splits.test, resolved["data"], 1000, resolved["seed"])


@pytest.mark.parametrize("name", losses.LOSSES.names())
def test_each_loss_improves_recall_over_the_untrained_model(shapes, name):
    raw = tiny_config(
        train__steps=STEPS,
        train__validate_every=STEPS // 4,
        train__checkpoint_every=STEPS,
        loss={"name": name},
    )
    resolved = config.resolve({**raw, "name": f"loss_{name}"})
    before = untrained_recall(resolved)
    result = train(resolved)
    after = result.best["val_recall@1"]
    print(f"{name}: Recall@1 {before:.3f} untrained -> {after:.3f} after {STEPS} steps")
    assert np.isfinite(result.loss)
    assert after > before
