"""train.validation.metric: the holdout score that selects the best weights (Recall@1 or MAP@R)."""

from __future__ import annotations

import types

import numpy as np
import pytest

import config
from retrieval.metrics import evaluate
from retrieval.search import unit_rows
from runs import checkpoint
from tests.conftest import tiny_config
from tfcbir import UserError
from training import validation
from training.trainer import train


class ColourModel:
    """A fake embedding model: each image's mean colour per channel and per image quarter
    (12-d), so the embeddings differ by shape and colour without training anything."""

    def __call__(self, pixels, training=False):
        pixels = np.asarray(pixels, np.float32)
        h, w = pixels.shape[1] // 2, pixels.shape[2] // 2
        quarters = [
            pixels[:, i : i + h, j : j + w].mean(axis=(1, 2)) for i in (0, h) for j in (0, w)
        ]
        return np.concatenate(quarters, axis=1)


def validator_of(raw: dict, metric: str, leave_one_out: bool) -> validation.Validator:
    from datasets.lists import load_splits

    resolved = config.resolve(raw)
    data = resolved["data"]
    splits = load_splits(config.data_root(resolved), data["split"], 0, data["format"])
    chosen = validation.choose_validation(resolved, splits)
    return validation.Validator(
        chosen.validation,
        data,
        max_images=1000,
        seed=0,
        normalized=True,
        gallery=None if leave_one_out else chosen.train,
        metric=metric,
    )


@pytest.mark.parametrize("leave_one_out", [True, False], ids=["leave_one_out", "train_gallery"])
def test_map_at_r_is_retrieval_metrics_map_at_r_of_the_same_embeddings(data_dir, leave_one_out):
    model = ColourModel()
    raw = tiny_config(train__validation={"holdout": 0.5})  # several images of each class
    validator = validator_of(raw, "map@r", leave_one_out)
    queries = unit_rows(model(validator.queries.pixels))
    labels = validator.queries.labels
    if leave_one_out:
        gallery, gallery_labels, exclude = queries, labels, np.arange(len(queries))
    else:
        gallery = unit_rows(model(validator.gallery.pixels))
        gallery_labels, exclude = validator.gallery.labels, None
    reference = evaluate(
        queries, labels, gallery, gallery_labels, normalized=True, exclude=exclude, nmi=False
    )
    assert validator.score(model) == pytest.approx(reference.map_at_r, abs=1e-12)
    assert 0 < reference.map_at_r != reference.recall_at_k[1]  # the two metrics differ here
    recall = validator_of(raw, "recall@1", leave_one_out)
    assert recall.score(model) == pytest.approx(reference.recall_at_k[1], abs=1e-12)
    assert recall.score(model) == recall.recall_at_1(model)


# Validation scores at steps 1, 2 and 3 on which the two metrics disagree: Recall@1 is best at
# step 1, MAP@R at step 2.
SCORES = [(0.9, 0.1), (0.5, 0.6), (0.7, 0.3)]


@pytest.mark.parametrize("metric, best_step", [("recall@1", 1), ("map@r", 2)])
def test_the_best_weights_follow_the_chosen_metric(data_dir, monkeypatch, metric, best_step):
    calls = iter(SCORES)

    def fake_metrics(self, model):
        recall, map_at_r = next(calls)
        return types.SimpleNamespace(recall_at_k={1: recall}, map_at_r=map_at_r)

    monkeypatch.setattr(validation.Validator, "metrics", fake_metrics)
    raw = tiny_config(
        train__steps=3, train__validate_every=1, train__checkpoint_every=1,
        train__keep_checkpoints=3, train__validation={"metric": metric},
    )  # fmt: skip
    resolved = config.resolve({**raw, "name": f"select_{metric.replace('@', '_at_')}"})
    result = train(resolved)
    key = {"recall@1": "val_recall@1", "map@r": "val_map@r"}[metric]
    value = dict(zip(("recall@1", "map@r"), SCORES[best_step - 1]))[metric]
    assert result.run.best() == {"step": best_step, key: value}
    header = result.run.metrics.read_text().splitlines()[0].split(",")
    assert key in header and ({"val_recall@1", "val_map@r"} - {key}).isdisjoint(header)
    columns = result.run.read_metrics()
    assert list(columns[key][~np.isnan(columns[key])]) == [s[metric == "map@r"] for s in SCORES]
    # best.weights.h5 holds the chosen step's weights.
    import nets

    model = nets.build_embedding_model(resolved["model"], (32, 32), pretrained=False)
    model.load_weights(result.run.best_weights)
    saved = checkpoint.read(result.run.checkpoints / f"ckpt-{best_step:08d}.h5")
    for kept, weights in zip(saved.groups["model"], model.get_weights()):
        np.testing.assert_array_equal(kept, weights)


def test_map_at_r_selection_records_the_best_weights_score(data_dir):
    """A real run selected on MAP@R: best.json's val_map@r is the validator's MAP@R of
    best.weights.h5, and the best step is the first with the highest logged MAP@R."""
    import nets

    raw = tiny_config(
        train__steps=6, train__validate_every=2, train__validation={"metric": "map@r"}
    )
    resolved = config.resolve({**raw, "name": "map_at_r"})
    result = train(resolved)
    columns = result.run.read_metrics()
    logged = [(int(s), v) for s, v in zip(columns["step"], columns["val_map@r"]) if not np.isnan(v)]
    assert [s for s, _ in logged] == [2, 4, 6]
    step, score = max(logged, key=lambda item: (item[1], -item[0]))
    best = result.run.best()
    assert best["step"] == step and best["val_map@r"] == pytest.approx(score, abs=1e-6)
    model = nets.build_embedding_model(resolved["model"], (32, 32), pretrained=False)
    model.load_weights(result.run.best_weights)
    again = validator_of(raw, "map@r", leave_one_out=False).score(model)
    assert again == pytest.approx(best["val_map@r"], abs=1e-5)


def test_resume_is_exact_with_map_at_r(data_dir):
    raw = tiny_config(
        train__validate_every=2, train__checkpoint_every=4, train__validation={"metric": "map@r"}
    )
    straight = train(
        config.resolve({**raw, "name": "straight", "train": {**raw["train"], "steps": 8}})
    )
    train(config.resolve({**raw, "name": "resumed", "train": {**raw["train"], "steps": 4}}))
    resumed = train(
        config.resolve({**raw, "name": "resumed", "train": {**raw["train"], "steps": 8}})
    )
    assert resumed.step == 8 and resumed.best == straight.best
    for run in (straight, resumed):
        assert set(run.run.best()) == {"step", "val_map@r"}
    a = checkpoint.read(straight.run.checkpoints / "ckpt-00000008.h5")
    b = checkpoint.read(resumed.run.checkpoints / "ckpt-00000008.h5")
    for name in a.groups:
        for x, y in zip(a.groups[name], b.groups[name]):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=name)


def test_the_default_is_recall_at_1():
    assert config.resolve(tiny_config())["train"]["validation"]["metric"] == "recall@1"


def test_a_bad_metric_is_one_line():
    with pytest.raises(UserError) as error:
        config.resolve(tiny_config(train__validation={"metric": "ndcg"}))
    message = str(error.value)
    assert "train.validation.metric: 'ndcg' is not one of recall@1, map@r" in message
    assert "\n" not in message


def test_a_dual_encoder_selects_on_text_to_image_map_at_r(data_dir, monkeypatch):
    """The text-to-image validation takes the metric too: MAP@R of the same embeddings."""
    from tests.test_training_dual import dual_config
    from training import dual

    seen = []
    real = dual.TextValidator.score

    def spy(self, model, text_model, metric, batch_size=256):
        value = real(self, model, text_model, metric, batch_size)
        seen.append((metric, value, real(self, model, text_model, "recall@1", batch_size)))
        return value

    monkeypatch.setattr(dual.TextValidator, "score", spy)
    raw = dual_config(
        train__steps=4, train__validate_every=2, train__validation={"metric": "map@r"}
    )
    result = train(config.resolve({**raw, "name": "dual_map"}))
    assert [metric for metric, _, _ in seen] == ["map@r", "map@r"]
    best = result.run.best()
    assert set(best) == {"step", "val_map@r"}
    assert best["val_map@r"] == max(value for _, value, _ in seen)
    header = result.run.metrics.read_text().splitlines()[0].split(",")
    assert "val_map@r" in header and "val_recall@1" not in header
