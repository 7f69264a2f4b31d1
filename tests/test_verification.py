"""retrieval.verification: pairs against brute force, AUC / EER / thresholds against scikit-learn
and by hand, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from retrieval.search import similarity
from retrieval.verification import (
    PairScores,
    equal_error_rate,
    pair_scores,
    roc_auc,
    roc_points,
    threshold_at,
    verification_metrics,
    verify,
)
from tfcbir import UserError

# --- the metrics ----------------------------------------------------------------------------------


def test_a_hand_worked_case():
    same = np.array([0.9, 0.8, 0.4], dtype=np.float32)
    different = np.array([0.7, 0.3, 0.2, 0.1], dtype=np.float32)
    # 0.9 and 0.8 beat all four, 0.4 beats three: 11 of 12.
    assert roc_auc(same, different) == pytest.approx(11 / 12)
    thresholds, false_match, true_match = roc_points(same, different)
    np.testing.assert_allclose(thresholds[1:], [0.9, 0.8, 0.7, 0.4, 0.3, 0.2, 0.1])
    assert thresholds[0] > 0.9
    np.testing.assert_allclose(false_match, [0, 0, 0, 1 / 4, 1 / 4, 2 / 4, 3 / 4, 1])
    np.testing.assert_allclose(true_match, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1, 1])
    # FNMR - FMR: 1/12 at 0.7, -1/4 at 0.4; on that segment FMR stays 1/4 while FNMR falls
    # from 1/3 to 0, so they meet at 1/4.
    eer, eer_threshold = equal_error_rate(thresholds, false_match, true_match)
    assert eer == pytest.approx(0.25) and eer_threshold == pytest.approx(0.4)
    assert threshold_at(thresholds, false_match, true_match, 1e-3) == pytest.approx(
        (0.8, 0.0, 2 / 3)
    )
    assert threshold_at(thresholds, false_match, true_match, 0.3) == pytest.approx((0.4, 0.25, 1.0))


def test_ties_count_one_half_and_a_crossing_between_points():
    same, different = np.array([1.0, 1.0]), np.array([1.0, 0.0])
    assert roc_auc(same, different) == 0.75  # two ties (1/2 each) and two wins, of four
    # Points (FMR, FNMR): (0, 1) above all, (1/2, 0) at 1: they meet at 1/3.
    eer, threshold = equal_error_rate(*roc_points(same, different))
    assert eer == pytest.approx(1 / 3) and threshold == 1.0


def test_perfect_and_useless_scores():
    metrics = verification_metrics(PairScores(np.array([3.0, 2.0]), np.array([1.0, 0.0]), 2, 2))
    assert metrics["roc_auc"] == 1.0 and metrics["eer"] == 0.0
    assert metrics["threshold"] == 2.0 and metrics["true_match_rate"] == 1.0
    assert metrics["false_match_rate"] == 0.0 and metrics["false_matches"] == 0
    flat = verification_metrics(PairScores(np.array([1.0]), np.array([1.0, 1.0]), 1, 2))
    assert flat["roc_auc"] == 0.5 and flat["eer"] == pytest.approx(0.5)
    # Every different-class pair ties the top score: only the point above them all has FMR 0.
    assert flat["threshold"] > 1.0 and flat["true_match_rate"] == 0.0


def sklearn_reference(same, different, rate):
    """AUC, the ROC points, the EER (the same interpolation on scikit-learn's points) and the
    threshold at ``rate``, all from scikit-learn's roc_curve / roc_auc_score."""
    truth = np.concatenate([np.ones(len(same)), np.zeros(len(different))])
    scores = np.concatenate([same, different])
    fpr, tpr, thresholds = roc_curve(truth, scores, drop_intermediate=False)
    gap = (1 - tpr) - fpr
    after = np.flatnonzero(gap <= 0)[0]
    share = gap[after - 1] / (gap[after - 1] - gap[after])
    eer = fpr[after - 1] + share * (fpr[after] - fpr[after - 1])
    point = np.flatnonzero(fpr <= rate)[-1]
    return {
        "auc": roc_auc_score(truth, scores),
        "curve": (thresholds, fpr, tpr),
        "eer": (eer, thresholds[after]),
        "at_rate": (thresholds[point], fpr[point], tpr[point]),
    }


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rate", [1e-3, 0.05, 0.5])
def test_metrics_equal_scikit_learn_on_the_same_pairs(seed, rate):
    rng = np.random.default_rng(seed)
    n_same, n_different = rng.integers(1, 300), rng.integers(1, 3000)
    # Rounded scores: plenty of ties, within and across the two kinds.
    same = np.round(rng.normal(1.0, 1.0, n_same), 1).astype(np.float32)
    different = np.round(rng.normal(0.0, 1.0, n_different), 1).astype(np.float32)
    expected = sklearn_reference(same, different, rate)
    assert roc_auc(same, different) == pytest.approx(expected["auc"], abs=1e-12)
    thresholds, false_match, true_match = roc_points(same, different)
    sk_thresholds, fpr, tpr = expected["curve"]
    np.testing.assert_array_equal(thresholds[1:], sk_thresholds[1:])  # [0] is inf there
    np.testing.assert_allclose(false_match, fpr, atol=1e-15)
    np.testing.assert_allclose(true_match, tpr, atol=1e-15)
    eer = equal_error_rate(thresholds, false_match, true_match)
    assert eer == pytest.approx(expected["eer"], abs=1e-12)
    threshold, reached, true_at = threshold_at(thresholds, false_match, true_match, rate)
    sk_threshold, sk_reached, sk_true = expected["at_rate"]
    assert (reached, true_at) == pytest.approx((sk_reached, sk_true), abs=1e-15)
    if np.isinf(sk_threshold):
        assert threshold > max(same.max(), different.max())
    else:
        assert threshold == sk_threshold
    assert reached <= rate


# --- the pairs ------------------------------------------------------------------------------------


def integer_set(seed, n=40, dim=6, classes=5):
    """Small integer vectors: every score is exact, whatever the block, so s(i, j) == s(j, i)."""
    rng = np.random.default_rng(seed)
    embeddings = rng.integers(-3, 4, size=(n, dim)).astype(np.float32)
    return rng, embeddings, rng.integers(0, classes, size=n)


def brute_pairs(scores, query_labels, gallery_labels, pairs):
    """Sorted same-class and different-class scores of the (query, gallery item) ``pairs``."""
    same = sorted(scores[q, j] for q, j in pairs if query_labels[q] == gallery_labels[j])
    different = sorted(scores[q, j] for q, j in pairs if query_labels[q] != gallery_labels[j])
    return np.array(same), np.array(different)


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("memory_mb", [256, 1e-6])  # one block, or one query a block
def test_all_pairs_of_separate_queries_and_gallery(normalized, memory_mb):
    rng, gallery, gallery_labels = integer_set(1)
    queries, query_labels = gallery[:15] + 1, rng.integers(0, 5, size=15)
    pairs = pair_scores(
        queries, query_labels, gallery, gallery_labels, normalized=normalized, memory_mb=memory_mb
    )
    scores = similarity(queries, gallery, normalized=normalized)
    all_pairs = [(q, j) for q in range(15) for j in range(len(gallery))]
    same, different = brute_pairs(scores, query_labels, gallery_labels, all_pairs)
    np.testing.assert_array_equal(np.sort(pairs.same), same)
    np.testing.assert_array_equal(np.sort(pairs.different), different)
    assert (pairs.same_total, pairs.different_total) == (len(same), len(different))
    assert not pairs.sampled
    if not normalized:  # the negative Euclidean distance
        distances = np.linalg.norm(queries[:, None] - gallery[None], axis=2)
        np.testing.assert_allclose(scores, -distances, rtol=1e-6)


@pytest.mark.parametrize("picked", [None, [3, 17, 0, 25, 9]])
def test_leave_one_out_counts_each_pair_of_items_once(picked):
    _, embeddings, labels = integer_set(2)
    n = len(embeddings)
    picked = np.arange(n) if picked is None else np.array(picked)
    pairs = pair_scores(
        embeddings[picked], labels[picked], embeddings, labels, normalized=False, exclude=picked
    )
    scores = similarity(embeddings, embeddings, normalized=False)
    unordered = {frozenset((int(i), j)) for i in picked for j in range(n) if j != i}
    same, different = brute_pairs(scores, labels, labels, [tuple(p) for p in unordered])
    np.testing.assert_array_equal(np.sort(pairs.same), same)
    np.testing.assert_array_equal(np.sort(pairs.different), different)
    if len(picked) == n:
        assert pairs.same_total + pairs.different_total == n * (n - 1) // 2
    # Without exclude, each query also meets itself (score 0) and pairs of queries count twice.
    twice = pair_scores(embeddings[picked], labels[picked], embeddings, labels, normalized=False)
    pairs_twice = len(picked) * n
    assert twice.same_total + twice.different_total == pairs_twice


def test_a_large_kind_is_a_seeded_uniform_sample_of_exactly_max_pairs():
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(300, 8)).astype(np.float32)
    labels = rng.integers(0, 30, size=300)
    exclude = np.arange(300)
    full = pair_scores(embeddings, labels, embeddings, labels, normalized=True, exclude=exclude)
    assert full.different_total == len(full.different) > 40_000
    options = {"normalized": True, "exclude": exclude, "max_pairs": 5000}
    sample = pair_scores(embeddings, labels, embeddings, labels, seed=1, **options)
    assert sample.sampled and len(sample.different) == 5000 and len(sample.same) == len(full.same)
    assert sample.different_total == full.different_total
    assert np.isin(sample.different, full.different).all()
    assert len(np.unique(sample.different)) == 5000  # without replacement (scores differ)
    # Independent of the block size; another seed, another sample.
    small_blocks = pair_scores(
        embeddings, labels, embeddings, labels, seed=1, memory_mb=0.01, **options
    )
    # (the same pairs; a score may differ in its last bit between BLAS block shapes)
    np.testing.assert_allclose(
        np.sort(small_blocks.different), np.sort(sample.different), rtol=1e-6, atol=1e-6
    )
    other = pair_scores(embeddings, labels, embeddings, labels, seed=2, **options)
    assert not np.array_equal(np.sort(other.different), np.sort(sample.different))
    # Uniform: the sample's mean within 5 standard errors of the population's.
    error = full.different.std() / np.sqrt(5000)
    assert abs(sample.different.mean() - full.different.mean()) < 5 * error


def test_verify_returns_json_ready_metrics():
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(8, 16))
    labels = np.repeat(np.arange(8), 10)
    embeddings = centres[labels] + 0.3 * rng.normal(size=(80, 16))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    result = verify(embeddings, labels, embeddings, labels, normalized=True, exclude=np.arange(80))
    assert json.loads(json.dumps(result)) == result
    assert result["score"] == "cosine" and result["seed"] == 0 and not result["sampled"]
    assert result["same_class_pairs"] == 8 * 45 and result["different_class_pairs"] == 2800
    assert result["roc_auc"] > 0.95 and 0 <= result["eer"] < 0.1
    assert result["false_match_rate"] <= 1e-3 and result["false_match_rate_target"] == 1e-3
    pairs = pair_scores(
        embeddings, labels, embeddings, labels, normalized=True, exclude=np.arange(80)
    )
    expected = sklearn_reference(pairs.same, pairs.different, 1e-3)
    assert result["roc_auc"] == pytest.approx(expected["auc"], abs=1e-12)
    assert result["eer"] == pytest.approx(expected["eer"][0], abs=1e-12)
    assert result["false_matches"] == np.count_nonzero(pairs.different >= result["threshold"])


# --- bad input ------------------------------------------------------------------------------------


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_bad_input_gets_one_line():
    _, embeddings, labels = integer_set(5, n=10)
    with pytest.raises(UserError, match="verification needs pairs of different classes") as e:
        verify(embeddings, np.zeros(10), embeddings, np.zeros(10), normalized=False)
    one_line(e)
    with pytest.raises(UserError, match="verification needs same-class pairs") as e:
        verify(embeddings, np.arange(10), embeddings, np.arange(10), normalized=False,
               exclude=np.arange(10))  # fmt: skip
    one_line(e)
    for rate in (0.0, 1.0, -1e-3, 2):
        with pytest.raises(UserError, match="give a rate between 0 and 1") as e:
            verify(embeddings, labels, embeddings, labels, normalized=False, false_match_rate=rate)
        one_line(e)
    with pytest.raises(UserError, match="max pairs 0: give at least 1") as e:
        verify(embeddings, labels, embeddings, labels, normalized=False, max_pairs=0)
    one_line(e)
    broken = embeddings.copy()
    broken[2, 1] = np.nan
    with pytest.raises(ValueError, match="contain NaN") as e:
        verify(broken, labels, embeddings, labels, normalized=False)
    one_line(e)
    with pytest.raises(ValueError, match="dimension") as e:
        verify(embeddings[:, :3], labels, embeddings, labels, normalized=False)
    one_line(e)
    with pytest.raises(ValueError, match="labels of shapes") as e:
        verify(embeddings, labels[:5], embeddings, labels, normalized=False)
    one_line(e)
    with pytest.raises(ValueError, match="exclude") as e:
        verify(embeddings, labels, embeddings, labels, normalized=False, exclude=np.eye(10))
    one_line(e)


def test_no_query_leaves_both_kinds_empty():
    _, embeddings, labels = integer_set(6, n=10)
    pairs = pair_scores(embeddings[:0], labels[:0], embeddings, labels, normalized=True)
    assert len(pairs.same) == len(pairs.different) == pairs.same_total == 0


def test_the_sample_is_the_same_pairs_at_any_block_size():
    _, embeddings, labels = integer_set(7, n=120)  # exact scores: the multisets must be equal
    samples = [
        pair_scores(
            embeddings, labels, embeddings, labels, normalized=False, max_pairs=500,
            exclude=np.arange(120), seed=5, memory_mb=memory_mb,
        )
        for memory_mb in (256, 0.02, 1e-6)
    ]  # fmt: skip
    for sample in samples[1:]:
        np.testing.assert_array_equal(np.sort(sample.different), np.sort(samples[0].different))
        np.testing.assert_array_equal(np.sort(sample.same), np.sort(samples[0].same))
    assert len(samples[0].same) == 500 < samples[0].same_total
