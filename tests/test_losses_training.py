"""Every registered image loss trains the demo model: retrieval on the training images improves far
beyond the untrained model, with a margin measured across seeds.

The signal is MAP@R (Musgrave et al. 2020) of the training images searched among themselves
(leave-one-out), in the run's search geometry: it averages over every rank of every image, so it
is far steadier than Recall@1 of a few dozen held-out images, and it measures what the loss
optimises (fitting the training classes), not how far 160 steps generalise. The numbers are
printed (pytest -s) for the record.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import config
import losses
import nets
from benchmarks.learning_margin import BAR, SHAPES, check_config, training_map_at_r
from datasets.demo import generate
from training.trainer import train


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """6 shape classes x 30 images at 32 px, and a data_dir holding them."""
    root = tmp_path_factory.mktemp("losses") / "data"
    generate(root / "datasets" / "shapes", **SHAPES)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFCBIR_DATA_DIR", str(root))
        yield root


@pytest.mark.parametrize("name", losses.image_loss_names())
def test_each_loss_trains_the_model(shapes, name):
    # The protocol, its steps and its bar are benchmarks/learning_margin.py's, which measured the
    # margin of this check across seeds and oneDNN settings.
    resolved = config.resolve({**check_config(name), "name": f"loss_{name}"})
    keras.utils.set_random_seed(resolved["seed"])
    untrained = nets.build_embedding_model(resolved["model"], (32, 32))
    before = training_map_at_r(resolved, untrained)
    result = train(resolved)
    assert np.isfinite(result.loss)
    trained = nets.build_embedding_model(resolved["model"], (32, 32), pretrained=False)
    trained.load_weights(result.run.best_weights)
    after = training_map_at_r(resolved, trained)
    print(f"{name}: MAP@R of the training images {before:.3f} untrained -> {after:.3f}")
    assert before < 0.1  # the untrained model is near chance
    assert after > BAR
