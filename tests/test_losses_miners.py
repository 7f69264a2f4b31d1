"""The distance-weighted miner (Wu et al. 2017): its probabilities against a NumPy reference of
the inverse distance density, and its draws as a function of (seed, step)."""

import numpy as np
import pytest
import tensorflow as tf

import config
import losses
from losses.distances import EuclideanDistance
from losses.miners import DistanceWeightedMiner, PairwiseBatch, miner
from runs import checkpoint
from tests.conftest import tiny_config
from tfcbir import UserError
from training.trainer import train


def ref_weights(labels, x, cutoff=0.5, nonzero_loss_cutoff=1.4):
    """Row a: q(d(a, n))^-1 over a's negatives n with d < nonzero_loss_cutoff, d clipped at
    cutoff, normalised; uniform over the negatives if none qualifies (the miner's fallback)."""
    n, dim = x.shape
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    out = np.zeros((n, n))
    for a in range(n):
        negatives = [j for j in range(n) if labels[j] != labels[a]]
        weights = {}
        for j in negatives:
            dist = max(d[a, j], cutoff)
            if dist < nonzero_loss_cutoff:
                weights[j] = dist ** (2.0 - dim) * (1.0 - 0.25 * dist**2) ** (-(dim - 3.0) / 2.0)
        if not weights:
            weights = dict.fromkeys(negatives, 1.0)
        total = sum(weights.values())
        for j, w in weights.items():
            out[a, j] = w / total
    return out


def unit_batch(n=12, dim=5, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.arange(n) % classes, x


def table(labels, x, refs=None):
    ref_labels, ref_x = refs if refs is not None else (None, None)
    return PairwiseBatch.compare(EuclideanDistance(), labels, x, ref_labels, ref_x)


@pytest.mark.parametrize("cutoffs", [(0.5, 1.4), (0.8, 1.2), (0.3, 2.1)])
def test_weights_match_the_inverse_distance_density(cutoffs):
    labels, x = unit_batch()
    mined = DistanceWeightedMiner(*cutoffs)
    got = mined.weights(table(tf.constant(labels), tf.constant(x))).numpy()
    np.testing.assert_allclose(got, ref_weights(labels, x, *cutoffs), rtol=1e-9, atol=1e-12)


def test_a_row_without_a_close_negative_draws_uniformly():
    # Two classes at opposite poles: every negative is at distance 2 > 1.4.
    x = np.array([[1.0, 0, 0], [1.0, 0, 0], [-1.0, 0, 0], [-1.0, 0, 0]])
    labels = np.array([0, 0, 1, 1])
    got = DistanceWeightedMiner(0.5, 1.4).weights(table(labels, x)).numpy()
    np.testing.assert_allclose(got, ref_weights(labels, x))
    np.testing.assert_allclose(got[0], [0, 0, 0.5, 0.5])


def test_draws_are_negatives_deterministic_per_seed_and_step():
    labels, x = unit_batch(n=16, dim=4)
    batch = table(tf.constant(labels), tf.constant(x))
    step = tf.Variable(3, dtype=tf.int64)
    mined = miner("distance_weighted")
    mined.seed_draws(7, lambda: step)
    first, again = mined.draw(batch).numpy(), mined.draw(batch).numpy()
    np.testing.assert_array_equal(first, again)
    other = miner("distance_weighted")
    other.seed_draws(7, lambda: tf.constant(3))
    np.testing.assert_array_equal(other.draw(batch).numpy(), first)
    step.assign(4)
    assert (mined.draw(batch).numpy() != first).any()
    other.seed_draws(8, lambda: tf.constant(3))
    assert (other.draw(batch).numpy() != first).any()
    # Every draw of a kept pair is one of the anchor's negatives.
    triplets = mined.triplets(batch)
    drawn = mined.draw(batch).numpy()
    for a, p in zip(*np.nonzero(triplets.mask.numpy())):
        assert labels[drawn[a, p]] != labels[a]


def test_draws_follow_the_weights():
    """Over many steps, each anchor's drawn negatives have the weights' frequencies."""
    labels, x = unit_batch(n=8, dim=3, classes=2)
    batch = table(tf.constant(labels), tf.constant(x))
    mined = DistanceWeightedMiner(0.5, 1.4)
    counts = np.zeros((8, 8))
    for step in range(300):
        mined.seed_draws(0, lambda s=step: tf.constant(s))
        drawn = mined.draw(batch).numpy()
        for a, p in zip(*np.nonzero(batch.positives.numpy())):
            counts[a, drawn[a, p]] += 1
    frequencies = counts / counts.sum(1, keepdims=True)
    np.testing.assert_allclose(frequencies, ref_weights(labels, x), atol=0.06)


@pytest.mark.parametrize("name", ["semi_hard_triplet", "batch_all_triplet", "contrastive"])
def test_losses_with_the_miner_match_numpy(name):
    """The loss on the drawn negatives equals the formula on the same draws."""
    labels, x = unit_batch(n=12, dim=4, classes=3)
    loss = losses.get({"name": name, "miner": "distance_weighted"})
    loss.seed_draws(1, lambda: tf.constant(5))
    value = loss(labels, x).numpy()
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    drawn = loss.mining.draw(table(tf.constant(labels), tf.constant(x))).numpy()
    pairs = [(a, p) for a in range(12) for p in range(12) if a != p and labels[a] == labels[p]]
    if name == "contrastive":
        positive = [d[a, p] for a, p in pairs if d[a, p] > 0]
        negatives = {(a, drawn[a, p]) for a, p in pairs}
        negative = [1.0 - d[a, n] for a, n in negatives if 1.0 - d[a, n] > 0]
        expected = np.mean(positive) + (np.mean(negative) if negative else 0.0)
    else:
        margin = loss.margin
        expected = np.mean([max(margin + d[a, p] - d[a, drawn[a, p]], 0.0) for a, p in pairs])
    np.testing.assert_allclose(value, expected, rtol=1e-9)


def test_config_errors_in_one_line():
    raw = tiny_config()
    raw["loss"] = {"name": "batch_all_triplet", "miner": "distance_weighted", "metric": "cosine"}
    with pytest.raises(UserError, match="loss.miner: distance_weighted .* set loss.metric"):
        config.resolve(raw)
    raw["loss"] = {"name": "contrastive", "miner": "distance_weighted", "cutoff": -1}
    with pytest.raises(UserError, match="loss.cutoff"):
        config.resolve(raw)
    raw["loss"] = {"name": "multi_similarity", "miner": "distance_weighted"}
    with pytest.raises(UserError, match="loss.miner"):
        config.resolve(raw)
    with pytest.raises(UserError, match="loss.image_loss.miner: distance_weighted is for"):
        losses.resolve_image_loss({"name": "contrastive", "miner": "distance_weighted"})
    raw["loss"] = {"name": "contrastive", "miner": "distance_weighted"}
    resolved = config.resolve(raw)["loss"]
    assert resolved["cutoff"] == 0.5 and resolved["nonzero_loss_cutoff"] == 1.4


def test_a_resumed_run_draws_what_the_uninterrupted_one_did(data_dir):
    def run(name, steps):
        raw = tiny_config(train__steps=steps, train__checkpoint_every=4, train__validate_every=0)
        raw["loss"] = {"name": "batch_all_triplet", "miner": "distance_weighted"}
        return train(config.resolve({**raw, "name": name}))

    straight = run("straight", 8)
    assert run("halves", 4).step == 4
    resumed = run("halves", 8)
    assert resumed.step == 8
    for result in (straight, resumed):
        assert np.isfinite(result.loss)
    a, b = (checkpoint.latest(r.run.checkpoints).groups["model"] for r in (straight, resumed))
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
