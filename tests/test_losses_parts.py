"""losses built from parts: distance objects, miners on hand-worked batches, presets that are
compositions of one formula with other miners, composed losses against NumPy loops, references
other than the batch (the cross-batch interface), the catalog as the one place of defaults, and
the config keys ``loss.miner`` and ``loss.metric`` (the distance)."""

from __future__ import annotations

from functools import partial

import keras
import numpy as np
import pytest
import tensorflow as tf

import losses
from config.schema import resolve
from losses.base import class_masks
from losses.distances import (
    CosineDistance,
    CosineSimilarity,
    DotProductSimilarity,
    EuclideanDistance,
    SquaredEuclideanDistance,
    distance,
)
from losses.miners import (
    AllMiner,
    BatchHardMiner,
    Pairs,
    PairwiseBatch,
    SemiHardMiner,
    Triplets,
    miner,
)
from losses.triplet import SemiHardTripletLoss, TripletLoss
from tests.test_losses_reference import (
    batch,
    distances,
    numeric_gradient,
    others,
    pairs,
    ref_multi_similarity,
    value_and_gradient,
)
from tfcbir import UserError

METRICS = ["euclidean", "squared_euclidean", "cosine"]

# --- distances --------------------------------------------------------------------------------


def test_distance_objects_against_references_and_themselves():
    rng = np.random.default_rng(0)
    x, refs = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    diff = x[:, None] - refs[None]
    expected = {
        EuclideanDistance: np.sqrt((diff**2).sum(-1)),
        SquaredEuclideanDistance: (diff**2).sum(-1),
        CosineDistance: 1 - unit(x) @ unit(refs).T,
        CosineSimilarity: unit(x) @ unit(refs).T,
        DotProductSimilarity: x @ refs.T,
    }
    for cls, values in expected.items():
        np.testing.assert_allclose(cls().pairwise(x, refs).numpy(), values, atol=1e-12)
        assert cls.larger_is_closer is (cls in (CosineSimilarity, DotProductSimilarity))
    for name in METRICS:  # the config's names, and the old function, give the same object
        assert isinstance(distance(name), losses.DISTANCES.get(name).builder)
        np.testing.assert_array_equal(
            distance(name).pairwise(x).numpy(), losses.pairwise_distances(x, name).numpy()
        )
    assert list(losses.METRICS) == METRICS


# --- miners on a hand-worked batch ------------------------------------------------------------
# 1-D points 0, 1 (class 0) and 3, 5 (class 1); euclidean distances:
#        0  1  3  5
#   0 [  0  1  3  5 ]
#   1 [  1  0  2  4 ]
#   3 [  3  2  0  2 ]
#   5 [  5  4  2  0 ]

LABELS = np.array([0, 0, 1, 1])
POINTS = np.array([[0.0], [1.0], [3.0], [5.0]])


def hand_batch(metric="euclidean"):
    return PairwiseBatch.compare(
        distance(metric), tf.constant(LABELS), tf.constant(POINTS, tf.float64)
    )


def mask(entries):
    out = np.zeros((4, 4), bool)
    for a, b in entries:
        out[a, b] = True
    return out


def test_all_miner_keeps_every_pair():
    kept = AllMiner().pairs(hand_batch())
    np.testing.assert_array_equal(kept.positives, mask([(0, 1), (1, 0), (2, 3), (3, 2)]))
    np.testing.assert_array_equal(
        kept.negatives, mask([(a, b) for a in range(4) for b in range(4) if (a < 2) != (b < 2)])
    )
    assert isinstance(AllMiner().triplets(hand_batch()), Pairs)  # every combination


def test_semi_hard_miner_picks_the_closest_negative_beyond_the_positive():
    # (0, 1): d 1, negatives 3, 5 -> 3. (1, 0): d 1, negatives 2, 4 -> 2.
    # (3, 5): d 2, negatives 3, 2 -> 3 (2 is not strictly beyond). (5, 3): d 2, negatives 5, 4 -> 4.
    mined = SemiHardMiner().triplets(hand_batch())
    assert isinstance(mined, Triplets)
    np.testing.assert_array_equal(mined.mask, mask([(0, 1), (1, 0), (2, 3), (3, 2)]))
    negative = mined.negative.numpy()
    assert [negative[0, 1], negative[1, 0], negative[2, 3], negative[3, 2]] == [3, 2, 3, 4]
    with pytest.raises(ValueError, match="semi_hard miner picks triplets, not pairs"):
        SemiHardMiner().pairs(hand_batch())


def test_batch_hard_miner_picks_the_hardest_positive_and_negative():
    # Farthest positive: 1, 1, 2, 2; closest negative: 3 (point 3), 2 (point 3), 2 (point 1), 4.
    mined = BatchHardMiner().triplets(hand_batch())
    np.testing.assert_array_equal(mined.positive.numpy()[:, 0], [1, 1, 2, 2])
    np.testing.assert_array_equal(mined.negative.numpy()[:, 0], [3, 2, 2, 4])
    assert mined.mask.numpy().all()
    kept = BatchHardMiner().pairs(hand_batch())
    np.testing.assert_array_equal(kept.positives, mask([(0, 1), (1, 0), (2, 3), (3, 2)]))
    np.testing.assert_array_equal(kept.negatives, mask([(0, 2), (1, 2), (2, 1), (3, 1)]))


def test_multi_similarity_miner_on_a_distance():
    # Closeness is -d. Anchor 3 (third point): its negative at d 2 is within 0.1 of its positive
    # (d 2) and that positive is within 0.1 of it: both kept. Every other anchor's closest
    # negative is farther than its farthest positive by more than 0.1: nothing kept.
    kept = miner("multi_similarity").pairs(hand_batch())
    np.testing.assert_array_equal(kept.positives, mask([(2, 3)]))
    np.testing.assert_array_equal(kept.negatives, mask([(2, 1)]))
    # A wider margin keeps anchor 1's negative at 2 (within 1.5 of its positive at 1).
    wide = miner("multi_similarity", {"epsilon": 1.5}).pairs(hand_batch())
    assert wide.negatives.numpy()[1, 2] and not wide.negatives.numpy()[1, 3]


def test_miners_come_from_the_catalog_with_its_defaults():
    assert losses.MINERS.names() == [
        "semi_hard",
        "batch_hard",
        "all",
        "multi_similarity",
        "distance_weighted",
    ]
    assert miner("multi_similarity").epsilon == 0.1
    assert miner("multi_similarity").name == "multi_similarity"
    with pytest.raises(UserError, match="'semi' is not one of semi_hard"):
        miner("semi")


# --- presets are compositions -----------------------------------------------------------------


def random_batch(P, K, D, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(rng.choice(50, P, replace=False), K)).astype(np.int32)
    return labels, rng.normal(size=(P * K, D)).astype(dtype)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(
    ("preset", "composed"),
    [
        ("semi_hard_triplet", {"name": "batch_all_triplet", "miner": "semi_hard", "margin": 1.0}),
        ("batch_hard_triplet", {"name": "semi_hard_triplet", "miner": "batch_hard", "margin": 0.3}),
        ("batch_all_triplet", {"name": "batch_hard_triplet", "miner": "all", "margin": 0.2}),
        ("semi_hard_triplet", {"name": "semi_hard_triplet", "miner": "semi_hard"}),
        ("contrastive", {"name": "contrastive", "miner": "all"}),
        ("multi_similarity", {"name": "multi_similarity", "miner": "multi_similarity"}),
    ],
)
def test_a_composed_loss_with_the_presets_parts_is_the_preset(preset, composed, metric):
    with_metric = preset != "multi_similarity"
    extra = {"metric": metric} if with_metric else {}
    expected = losses.get({"name": preset, **extra})
    loss = losses.get({**composed, **extra})
    for seed, (P, K, D) in enumerate([(4, 3, 5), (3, 5, 2), (2, 2, 3)]):
        labels, x = random_batch(P, K, D, seed)
        value, grad = value_and_gradient(loss, labels, x)
        ref_value, ref_grad = value_and_gradient(expected, labels, x)
        np.testing.assert_allclose(value, ref_value, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_the_triplet_formula_is_built_as_a_preset():
    with pytest.raises(TypeError, match="TripletLoss is not in the loss catalog"):
        TripletLoss()
    assert issubclass(SemiHardTripletLoss, TripletLoss)


# --- composed losses against NumPy loops ------------------------------------------------------


def ms_kept(labels, d, epsilon):
    """The multi-similarity miner on distances: (kept positive pairs, kept negative pairs)."""
    kept_pos, kept_neg = [], []
    for a in range(len(labels)):
        pos = [p for a_, p in pairs(labels) if a_ == a]
        neg = others(labels, a)
        if not pos or not neg:
            continue
        kept_neg += [(a, n) for n in neg if d[a, n] - epsilon < max(d[a, p] for p in pos)]
        kept_pos += [(a, p) for p in pos if d[a, p] + epsilon > min(d[a, n] for n in neg)]
    return kept_pos, kept_neg


def ref_contrastive_ms(labels, x, pos_margin=0.0, neg_margin=1.0, metric="euclidean", eps=0.1):
    d = distances(x, metric)
    kept_pos, kept_neg = ms_kept(labels, d, eps)

    def mean_nonzero(values):
        nonzero = [v for v in values if v > 0]
        return sum(nonzero) / len(nonzero) if nonzero else 0.0

    return mean_nonzero([max(d[a, p] - pos_margin, 0) for a, p in kept_pos]) + mean_nonzero(
        [max(neg_margin - d[a, n], 0) for a, n in kept_neg]
    )


def ref_triplets_ms(labels, x, margin=0.2, metric="euclidean", eps=0.1):
    d = distances(x, metric)
    kept_pos, kept_neg = ms_kept(labels, d, eps)
    terms = [margin + d[a, p] - d[a, n] for a, p in kept_pos for a_, n in kept_neg if a_ == a]
    violating = [t for t in terms if t > 0]
    return sum(violating) / len(violating) if violating else 0.0


def ref_semi_hard_soft(labels, x, metric="euclidean"):
    d, terms = distances(x, metric), []
    for a, p in pairs(labels):
        neg = [d[a, n] for n in others(labels, a)]
        beyond = [v for v in neg if v > d[a, p]]
        chosen = min(beyond) if beyond else max(neg)
        terms.append(np.log1p(np.exp(d[a, p] - chosen)))
    return np.mean(terms)


COMPOSED = [
    (
        {"name": "contrastive", "miner": "multi_similarity", "epsilon": 0.5},
        partial(ref_contrastive_ms, eps=0.5),
    ),
    ({"name": "batch_all_triplet", "miner": "multi_similarity"}, ref_triplets_ms),
    (
        {"name": "batch_hard_triplet", "miner": "semi_hard", "soft_margin": True},
        ref_semi_hard_soft,
    ),
]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("params", "ref"), COMPOSED, ids=lambda p: str(p))
def test_composed_losses_match_numpy(params, ref, metric):
    loss = losses.get({**params, "metric": metric})
    for seed, (P, K, D) in enumerate([(2, 2, 3), (4, 3, 5), (3, 4, 2)]):
        labels, x = batch(P, K, D, seed + 300)
        np.testing.assert_allclose(
            loss(labels, x).numpy(), ref(labels, x, metric=metric), rtol=1e-9, atol=1e-12
        )
        np.testing.assert_allclose(
            loss(labels, x.astype(np.float32)).numpy(),
            ref(labels, x, metric=metric),
            rtol=1e-5,
            atol=1e-6,
        )
    labels, x = batch(3, 3, 2, 400)
    _, grad = value_and_gradient(loss, labels, x)
    expected = numeric_gradient(lambda e: ref(labels, e, metric=metric), x)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_multi_similarity_without_mining_is_the_formula_on_every_pair():
    # epsilon large enough keeps every pair: the "all" miner.
    loss = losses.get({"name": "multi_similarity", "miner": "all"})
    for seed, (P, K, D) in enumerate([(2, 2, 3), (4, 3, 5)]):
        labels, x = batch(P, K, D, seed)
        np.testing.assert_allclose(
            loss(labels, x).numpy(), ref_multi_similarity(labels, x, epsilon=10.0), rtol=1e-9
        )


# --- references other than the batch (a later cross-batch memory) ----------------------------


def test_references_other_than_the_batch():
    rng = np.random.default_rng(5)
    labels, x = np.array([0, 0, 1, 2]), rng.normal(size=(4, 3))
    ref_labels, refs = np.array([0, 1, 1, 3, 2]), rng.normal(size=(5, 3))
    d = np.sqrt(((x[:, None] - refs[None]) ** 2).sum(-1))
    same = labels[:, None] == ref_labels[None]
    # contrastive: every anchor-reference pair, the anchors' own pairs left out.
    pos, neg = d[same], np.maximum(1.0 - d[~same], 0)
    expected = pos[pos > 0].mean() + (neg[neg > 0].mean() if (neg > 0).any() else 0.0)
    loss = losses.get({"name": "contrastive"})
    value = loss(labels, x, ref_labels=ref_labels, ref_embeddings=refs)
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-9)
    # batch-all triplets: positives and negatives among the references.
    terms = [
        0.2 + d[a, p] - d[a, n]
        for a in range(4)
        for p in np.flatnonzero(same[a])
        for n in np.flatnonzero(~same[a])
    ]
    violating = [t for t in terms if t > 0]
    value = losses.get({"name": "batch_all_triplet"})(
        labels, x, ref_labels=ref_labels, ref_embeddings=refs
    )
    np.testing.assert_allclose(value.numpy(), sum(violating) / len(violating), rtol=1e-9)
    # The masks: same label is a positive (no diagonal to skip), another label a negative.
    table = PairwiseBatch.compare(EuclideanDistance(), labels, x, ref_labels, refs)
    np.testing.assert_array_equal(table.positives, same)
    np.testing.assert_array_equal(table.negatives, ~same)
    own, _ = class_masks(tf.constant(labels))
    assert not np.diag(own.numpy()).any()


def test_losses_on_the_batch_alone_refuse_references():
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    labels = np.array([0, 0, 1, 1])
    for name in ("ntxent", "lifted_structure"):
        with pytest.raises(ValueError, match="compares the batch with itself only"):
            losses.get({"name": name})(labels, x, ref_labels=labels, ref_embeddings=x)
    with pytest.raises(ValueError, match="both ref_labels and ref_embeddings"):
        losses.get({"name": "contrastive"})(labels, x, ref_embeddings=x)


# --- the catalog is the one place of names and defaults ---------------------------------------


@pytest.mark.parametrize("name", losses.LOSSES.names())
def test_classes_take_their_names_and_defaults_from_the_catalog(name):
    entry = losses.LOSSES.get(name)
    cls = entry.builder
    assert cls.registry_name == name
    args = (3,) if entry.meta["uses_proxies"] else ()
    loss = cls(*args)
    assert loss.name == name
    config = loss.get_config()
    for key, param in entry.params.items():
        if key != "image_loss":  # built by losses.get_dual, not by the class
            assert config[key] == param.default, key


def test_a_variant_of_a_preset_keeps_its_entry():
    class Variant(SemiHardTripletLoss):
        pass

    assert Variant.registry_name == "semi_hard_triplet"
    assert Variant(margin=0.5).get_config()["margin"] == 0.5


def test_positional_parameters_follow_the_catalog_order():
    loss = SemiHardTripletLoss(0.3, "cosine")
    assert (loss.margin, loss.metric, loss.miner) == (0.3, "cosine", "semi_hard")
    assert isinstance(loss.distance, CosineDistance) and isinstance(loss.mining, SemiHardMiner)
    with pytest.raises(TypeError, match="got margin twice"):
        SemiHardTripletLoss(0.3, margin=0.5)


@pytest.mark.parametrize(
    "params",
    [
        {"name": "contrastive", "miner": "multi_similarity", "epsilon": 0.3, "metric": "cosine"},
        {"name": "semi_hard_triplet", "miner": "batch_hard", "margin": 0.5},
        {"name": "multi_similarity", "miner": "batch_hard"},
    ],
)
def test_composed_losses_serialise(params):
    loss = losses.get(params)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(again) is type(loss) and again.get_config() == loss.get_config()
    assert type(again.mining) is type(loss.mining)
    assert again.get_config()["miner"] == params["miner"]
    labels, x = random_batch(4, 3, 5, 1)
    assert float(again(labels, x)) == pytest.approx(float(loss(labels, x)), rel=1e-6)


# --- the config -------------------------------------------------------------------------------

MINIMAL = {
    "data": {"root": "datasets/demo_shapes"},
    "model": {"backbone": "small_cnn", "weights": "none"},
}


def test_config_composes_a_loss():
    loss = {"name": "contrastive", "miner": "multi_similarity", "metric": "cosine"}
    resolved = resolve({**MINIMAL, "loss": loss})["loss"]
    assert resolved == {
        **loss,
        "pos_margin": 0.0,
        "neg_margin": 1.0,
        "epsilon": 0.1,
        "cutoff": 0.5,
        "nonzero_loss_cutoff": 1.4,
    }
    assert losses.geometry(resolved) == "cosine"
    # An old config resolves to the same loss, its preset's miner filled in.
    old = resolve({**MINIMAL, "loss": {"name": "batch_hard_triplet", "margin": 0.5}})["loss"]
    assert old["miner"] == "batch_hard" and old["metric"] == "euclidean"


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (
            {"name": "semi_hard_triplet", "miner": "semihard"},
            "loss.miner: 'semihard' is not one of semi_hard, batch_hard, all, multi_similarity, "
            "distance_weighted (did you mean 'semi_hard'?)",
        ),
        (
            {"name": "contrastive", "miner": "semi_hard"},
            "loss.miner: 'semi_hard' is not one of all, batch_hard, multi_similarity, "
            "distance_weighted",
        ),
        (
            {"name": "contrastive", "metric": "cosin"},
            "loss.metric: 'cosin' is not one of euclidean, squared_euclidean, cosine "
            "(did you mean 'cosine'?)",
        ),
        (
            {"name": "lifted_structure", "miner": "all"},
            "loss.miner: unknown key; allowed keys are margin, metric",
        ),
        (
            {"name": "ntxent", "minre": "all"},
            "loss.minre: unknown key; allowed keys are temperature",
        ),
        (
            {"name": "batch_hard_triplet", "soft_margin": True, "miner": "all"},
            "loss.soft_margin: true needs a miner that picks one negative per positive pair "
            "(semi_hard, batch_hard, distance_weighted); loss.miner is all",
        ),
        (
            {"name": "multi_similarity", "epsilon": -1},
            "loss.epsilon: -1 is below the minimum 0",
        ),
    ],
)
def test_config_errors_name_the_key(loss, message):
    with pytest.raises(UserError) as raised:
        resolve({**MINIMAL, "loss": loss})
    assert str(raised.value).startswith(message)
    with pytest.raises(UserError) as raised:
        losses.get(loss)
    assert str(raised.value).startswith(message)


def test_an_image_loss_is_checked_as_a_loss():
    image_loss = {"name": "batch_hard_triplet", "soft_margin": True, "miner": "multi_similarity"}
    with pytest.raises(UserError, match="loss.image_loss.soft_margin: true needs a miner"):
        losses.resolve_image_loss(image_loss)
