"""retrieval.rerank: alpha-QE, DBA and k-reciprocal re-ranking against dense NumPy references of
the papers' formulas, a hand-worked k-reciprocal case, bounded memory, determinism, metrics of
re-ranked answers, and the spec's errors."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from retrieval.metrics import evaluate, ranked_metrics
from retrieval.rerank import (
    METHODS,
    KReciprocalIndex,
    RerankSpec,
    augmented_gallery,
    evaluate_reranked,
    rerank,
)
from retrieval.search import ExactIndex
from tfcbir import UserError

# --- references: the formulas, dense, float64, one query at a time -----------------------------


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def dense_ranking(distances: np.ndarray, excluded=()) -> np.ndarray:
    """Gallery indices by ascending distance (N,), ties to the lower index, excluded dropped."""
    order = np.lexsort((np.arange(len(distances)), distances))
    return np.array([i for i in order if i not in set(excluded)])


def reference_expansion(vector, pool, alpha, n, excluded=()):
    """``v + sum_{i<=n} max(s_i, 0)^alpha p_i`` over the n best pool rows by cosine, unit."""
    vector, pool = vector.astype(np.float64), pool.astype(np.float64)
    scores = pool @ vector
    best = dense_ranking(-scores, excluded)[:n]
    total = vector + sum(max(scores[i], 0.0) ** alpha * pool[i] for i in best)
    return total / np.linalg.norm(total)


def reference_k_reciprocal(queries, gallery, normalized, k1, k2, lam, query_items=None):
    """Final distances d* (Q, G) by the paper's formulas with the conventions of
    retrieval.rerank's docstring, over one dense pool: the gallery, then the new queries."""
    n_gallery = len(gallery)
    items = np.full(len(queries), -1) if query_items is None else np.asarray(query_items)
    new = items < 0
    pool = np.concatenate([gallery, queries[new]]).astype(np.float64)
    positions = items.copy()
    positions[new] = n_gallery + np.arange(new.sum())
    squared = ((pool[:, None, :] - pool[None, :, :]) ** 2).sum(axis=2)
    d = squared / squared.max(axis=1, keepdims=True)
    rank = np.array([dense_ranking(row) for row in d])  # each item first (distance 0)

    def reciprocal(p, k):
        return [x for x in rank[p, : k + 1] if p in rank[x, : k + 1]]

    half = int(np.around(k1 / 2))
    v = np.zeros_like(d)
    for p in range(len(pool)):
        base = reciprocal(p, k1)
        grown = set(base)
        for c in base:
            around = reciprocal(c, half)
            if 3 * len(set(around) & set(base)) >= 2 * len(around):
                grown |= set(around)
        members = sorted(grown)
        weights = np.exp(-d[p, members])
        v[p, members] = weights / weights.sum()
    v = np.stack([v[rank[p, :k2]].mean(axis=0) for p in range(len(pool))])
    final = np.empty((len(queries), n_gallery))
    for i, p in enumerate(positions):
        smaller = np.minimum(v[p], v[:n_gallery]).sum(axis=1)
        larger = np.maximum(v[p], v[:n_gallery]).sum(axis=1)
        final[i] = (1 - lam) * (1 - smaller / larger) + lam * d[p, :n_gallery]
    return final


def clustered(seed: int, n_gallery: int, n_queries: int, dim: int, n_classes: int):
    """Gallery and queries around shared class centres, with their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim))
    gallery_labels = np.arange(n_gallery) % n_classes
    query_labels = rng.integers(0, n_classes, n_queries)
    gallery = centres[gallery_labels] + 0.8 * rng.standard_normal((n_gallery, dim))
    queries = centres[query_labels] + 0.8 * rng.standard_normal((n_queries, dim))
    return (
        queries.astype(np.float32),
        query_labels,
        gallery.astype(np.float32),
        gallery_labels,
    )


# --- alpha-QE and DBA ----------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_alpha_qe_matches_the_formula(alpha):
    queries, _, gallery, _ = clustered(0, 40, 7, 6, 5)
    queries, gallery = unit(queries), unit(gallery)
    spec = RerankSpec.parse({"method": "alpha_qe", "alpha": alpha, "neighbours": 3})
    scores, indices = rerank(spec, queries, gallery, normalized=True, k=40)
    for q in range(len(queries)):
        new_query = reference_expansion(queries[q], gallery, alpha, 3)
        expected_scores = gallery.astype(np.float64) @ new_query
        np.testing.assert_array_equal(indices[q], dense_ranking(-expected_scores))
        np.testing.assert_allclose(scores[q], expected_scores[indices[q]], atol=1e-6)


def test_alpha_qe_leaves_the_excluded_item_out_of_the_expansion_too():
    _, _, gallery, _ = clustered(1, 30, 0, 5, 4)
    gallery = unit(gallery)
    spec = RerankSpec.parse({"method": "alpha_qe", "neighbours": 2})
    picked = np.array([3, 17, 29])
    scores, indices = rerank(spec, gallery[picked], gallery, normalized=True, k=29, exclude=picked)
    for row, item in enumerate(picked):
        new_query = reference_expansion(gallery[item], gallery, 3.0, 2, excluded=[item])
        expected = gallery.astype(np.float64) @ new_query
        np.testing.assert_array_equal(indices[row], dense_ranking(-expected, excluded=[item]))
        assert item not in indices[row]


def test_dba_matches_the_formula():
    queries, _, gallery, _ = clustered(2, 36, 6, 6, 4)
    queries, gallery = unit(queries), unit(gallery)
    augmented = augmented_gallery(gallery, alpha=3.0, neighbours=2)
    expected_gallery = np.stack(
        [reference_expansion(gallery[i], gallery, 3.0, 2, excluded=[i]) for i in range(36)]
    )
    np.testing.assert_allclose(augmented, expected_gallery, atol=1e-6)
    spec = RerankSpec.parse({"method": "dba", "neighbours": 2})
    _, indices = rerank(spec, queries, gallery, normalized=True, k=36)
    for q in range(len(queries)):
        expected = expected_gallery @ queries[q].astype(np.float64)
        np.testing.assert_array_equal(indices[q], dense_ranking(-expected))


def test_dba_with_alpha_qe_expands_against_the_augmented_gallery():
    queries, _, gallery, _ = clustered(3, 30, 5, 6, 4)
    queries, gallery = unit(queries), unit(gallery)
    expected_gallery = np.stack(
        [reference_expansion(gallery[i], gallery, 2.0, 3, excluded=[i]) for i in range(30)]
    )
    spec = RerankSpec.parse({"method": "dba_alpha_qe", "alpha": 2, "neighbours": 3})
    _, indices = rerank(spec, queries, gallery, normalized=True, k=30)
    for q in range(len(queries)):
        new_query = reference_expansion(queries[q], expected_gallery, 2.0, 3)
        np.testing.assert_array_equal(indices[q], dense_ranking(-(expected_gallery @ new_query)))


# --- k-reciprocal ----------------------------------------------------------------------------------


def expected_answers(final: np.ndarray, exclude=None):
    """(indices, scores) of each query from dense final distances (Q, G)."""
    rows = []
    for q, row in enumerate(final):
        excluded = [] if exclude is None else [exclude[q]]
        rows.append(dense_ranking(row, excluded))
    indices = np.stack(rows)
    return indices, -np.take_along_axis(final, indices, axis=1)


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("k1, k2", [(6, 3), (4, 1), (5, 7)])
def test_k_reciprocal_equals_the_dense_reference_when_candidates_cover_the_gallery(
    normalized, k1, k2
):
    queries, _, gallery, _ = clustered(4, 48, 9, 5, 6)
    if normalized:
        queries, gallery = unit(queries), unit(gallery)
    spec = RerankSpec.parse(
        {"method": "k_reciprocal", "k1": k1, "k2": k2, "lambda": 0.3, "candidates": 48}
    )
    scores, indices = rerank(spec, queries, gallery, normalized=normalized, k=48)
    final = reference_k_reciprocal(queries, gallery, normalized, k1, k2, 0.3)
    expected_indices, expected_scores = expected_answers(final)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-6)


def test_k_reciprocal_leave_one_out_takes_each_query_as_its_gallery_item():
    _, _, gallery, _ = clustered(5, 40, 0, 4, 5)
    gallery = unit(gallery)
    picked = np.array([0, 7, 8, 33])
    spec = RerankSpec.parse({"method": "k_reciprocal", "k1": 6, "k2": 3, "candidates": 40})
    scores, indices = rerank(
        spec, gallery[picked], gallery, normalized=True, k=39, exclude=picked, query_items=picked
    )
    final = reference_k_reciprocal(gallery[picked], gallery, True, 6, 3, 0.3, query_items=picked)
    expected_indices, expected_scores = expected_answers(final, exclude=picked)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-6)


def test_k_reciprocal_reranks_only_the_candidates_and_keeps_the_rest_in_order():
    queries, _, gallery, _ = clustered(6, 60, 5, 5, 6)
    queries, gallery = unit(queries), unit(gallery)
    spec = RerankSpec.parse({"method": "k_reciprocal", "k1": 6, "k2": 3, "candidates": 10})
    scores, indices = rerank(spec, queries, gallery, normalized=True, k=60)
    _, original = ExactIndex(gallery, True).search(queries, 60)
    final = reference_k_reciprocal(queries, gallery, True, 6, 3, 0.3)
    for q in range(len(queries)):
        head = original[q, :10]
        # The first ten: the original ten, ranked by the exact d*; then the original order.
        np.testing.assert_array_equal(indices[q, :10], head[dense_ranking(final[q, head])])
        np.testing.assert_array_equal(indices[q, 10:], original[q, 10:])
        assert np.all(np.diff(scores[q]) <= 0)


def test_k_reciprocal_by_hand_a_false_nearest_neighbour_drops_behind_reciprocal_ones():
    # q's nearest item is f, but f's own 3 nearest are its cluster b1-b3, so f is not a
    # 3-reciprocal neighbour of q; a1 is (a1's nearest: a2, a3, then q). The paper's idea:
    # an image and its true matches are in each other's neighbourhoods, a false match is not.
    gallery = np.array(
        [
            [0.9, 0.0],  # 0: f, the false match, q's nearest (distance 0.9)
            [-1.0, 0.0],  # 1: a1, q's class (distance 1.0)
            [-1.1, 0.2],  # 2: a2
            [-1.1, -0.2],  # 3: a3
            [1.5, 0.0],  # 4: b1, f's class
            [1.5, 0.3],  # 5: b2
            [1.5, -0.3],  # 6: b3
        ],
        dtype=np.float32,
    )
    query = np.zeros((1, 2), dtype=np.float32)
    spec = RerankSpec.parse({"method": "k_reciprocal", "k1": 3, "k2": 1, "candidates": 7})
    index = KReciprocalIndex(gallery, normalized=False, k1=3, k2=1, candidates=7)
    pool = index.pool(query, np.array([-1]))
    assert list(pool.lists[7, :4]) == [7, 0, 1, 2]  # q, f, a1, a2 (pool index 7 is q)
    assert list(pool.lists[0, :4]) == [0, 4, 5, 6]  # f, b1, b2, b3: q is not there
    assert list(pool.lists[1, :4]) == [1, 2, 3, 7]  # a1, a2, a3, q
    _, plain = ExactIndex(gallery, False).search(query, 7)
    assert list(plain[0, :2]) == [0, 1]  # by distance alone f comes first
    _, indices = rerank(spec, query, gallery, normalized=False, k=7)
    assert list(indices[0, :4]) == [1, 2, 3, 0]  # re-ranked: q's class first, then f
    final = reference_k_reciprocal(query, gallery, False, 3, 1, 0.3)
    np.testing.assert_array_equal(indices, expected_answers(final)[0])


def test_k_reciprocal_is_deterministic_and_independent_of_the_memory_budget():
    queries, _, gallery, _ = clustered(7, 300, 40, 8, 20)
    queries, gallery = unit(queries), unit(gallery)
    spec = RerankSpec.parse({"method": "k_reciprocal", "candidates": 50})
    first = rerank(spec, queries, gallery, normalized=True, k=20)
    again = rerank(spec, queries, gallery, normalized=True, k=20)
    small = rerank(spec, queries, gallery, normalized=True, k=20, memory_mb=0.05)
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_array_equal(first[0], again[0])
    # Other blocks: BLAS may round a score's last bit otherwise (retrieval.search's docstring).
    np.testing.assert_array_equal(first[1], small[1])
    np.testing.assert_allclose(first[0], small[0], rtol=1e-6)
    # The queries form one pool together: their order does not matter.
    order = np.random.default_rng(0).permutation(len(queries))
    shuffled = rerank(spec, queries[order], gallery, normalized=True, k=20)
    np.testing.assert_array_equal(shuffled[1], first[1][order])
    np.testing.assert_allclose(shuffled[0], first[0][order], rtol=1e-6)


@pytest.mark.parametrize("n_gallery, n_queries", [(1, 1), (2, 3), (3, 0), (5, 2)])
def test_k_reciprocal_on_tiny_galleries(n_gallery, n_queries):
    queries, _, gallery, _ = clustered(13, n_gallery, n_queries, 3, 2)
    spec = RerankSpec.parse({"method": "k_reciprocal", "k1": 20, "k2": 6})
    scores, indices = rerank(spec, queries, gallery, normalized=False, k=n_gallery + 1)
    assert indices.shape == (n_queries, n_gallery + 1)
    if n_queries:
        final = reference_k_reciprocal(queries, gallery, False, 20, 6, 0.3)
        np.testing.assert_array_equal(indices[:, :n_gallery], expected_answers(final)[0])
        assert np.all(indices[:, -1] == -1) and np.all(scores[:, -1] == -np.inf)


def test_k_reciprocal_memory_is_bounded_far_below_a_dense_matrix():
    rng = np.random.default_rng(8)
    n_gallery, dim = 20_000, 32
    centres = rng.standard_normal((2_000, dim)).astype(np.float32)
    labels = rng.integers(0, len(centres), n_gallery)
    gallery = unit(centres[labels] + rng.standard_normal((n_gallery, dim)).astype(np.float32))
    queries = unit(centres[labels[:300]] + rng.standard_normal((300, dim)).astype(np.float32))
    dense_bytes = n_gallery * n_gallery * 4  # one (G x G) float32 matrix: 1.6 GB
    spec = RerankSpec.parse({"method": "k_reciprocal", "candidates": 100})
    tracemalloc.start()
    try:
        scores, indices = rerank(spec, queries, gallery, normalized=True, k=10, memory_mb=16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert indices.shape == (300, 10) and np.all(indices >= 0)
    assert peak < dense_bytes / 16, f"peak {peak / 2**20:.0f} MiB"


# --- metrics of re-ranked answers ------------------------------------------------------------------


def test_ranked_metrics_of_the_plain_search_equal_the_evaluation():
    queries, query_labels, gallery, gallery_labels = clustered(9, 80, 30, 5, 16)
    queries, gallery = unit(queries), unit(gallery)
    for r, denominator in ((3, "min_r_g"), (10, "found"), (None, "min_r_g")):
        expected = evaluate(
            queries,
            query_labels,
            gallery,
            gallery_labels,
            normalized=True,
            r=r,
            nmi=False,
            ap_denominator=denominator,
        ).as_dict()
        _, indices = ExactIndex(gallery, True).search(queries, 80 if r is None else 10)
        found = ranked_metrics(
            indices, query_labels, gallery_labels, r=r, ap_denominator=denominator
        ).as_dict()
        assert found == expected


def test_ranked_metrics_leave_one_out_and_too_short_lists():
    _, _, gallery, labels = clustered(10, 50, 0, 4, 12)
    gallery = unit(gallery)
    picked = np.arange(50)
    expected = evaluate_reranked(
        RerankSpec(), gallery, labels, gallery, labels, normalized=True, exclude=picked, r=4
    ).as_dict()
    _, indices = ExactIndex(gallery, True).search(gallery, 8, exclude=picked)
    found = ranked_metrics(indices, labels, labels, exclude=picked, r=4)
    assert found.as_dict() == expected
    with pytest.raises(ValueError, match="too short"):
        ranked_metrics(indices[:, :2], labels, labels, exclude=picked, r=4)
    with pytest.raises(ValueError, match="leaves out"):
        ranked_metrics(np.roll(indices, 1, axis=0), labels, labels, exclude=picked, r=4)


def test_evaluate_reranked_k_reciprocal_scores_its_ranking():
    queries, query_labels, gallery, gallery_labels = clustered(11, 90, 25, 6, 10)
    queries, gallery = unit(queries), unit(gallery)
    spec = RerankSpec.parse({"method": "k_reciprocal", "k1": 6, "k2": 3, "candidates": 90})
    metrics = evaluate_reranked(
        spec, queries, query_labels, gallery, gallery_labels, normalized=True, r=5
    )
    final = reference_k_reciprocal(queries, gallery, True, 6, 3, 0.3)
    ranking = expected_answers(final)[0]
    relevant = gallery_labels[ranking] == query_labels[:, None]
    first = np.argmax(relevant, axis=1) + 1
    assert metrics.recall_at_k[1] == pytest.approx(np.mean(first == 1))
    assert metrics.recall_at_k[8] == pytest.approx(np.mean(first <= 8))
    precision = np.cumsum(relevant, axis=1) / np.arange(1, 91)
    ap = (precision[:, :5] * relevant[:, :5]).sum(axis=1) / np.minimum(5, relevant.sum(axis=1))
    assert metrics.mean_average_precision == pytest.approx(ap.mean())
    with pytest.raises(UserError, match="needs a cut-off r"):
        evaluate_reranked(spec, queries, query_labels, gallery, gallery_labels, normalized=True)


def test_evaluate_reranked_alpha_qe_is_the_evaluation_of_the_expanded_queries():
    queries, query_labels, gallery, gallery_labels = clustered(12, 60, 20, 5, 8)
    queries, gallery = unit(queries), unit(gallery)
    spec = RerankSpec.parse("alpha_qe")
    expanded = np.stack(
        [reference_expansion(q, gallery, 3.0, 2).astype(np.float32) for q in queries]
    )
    expected = evaluate(
        expanded, query_labels, gallery, gallery_labels, normalized=True, r=None, nmi=False
    )
    found = evaluate_reranked(spec, queries, query_labels, gallery, gallery_labels, normalized=True)
    assert found.mean_average_precision == pytest.approx(expected.mean_average_precision)
    assert found.recall_at_k == expected.recall_at_k


# --- the spec --------------------------------------------------------------------------------------


def test_spec_from_config_and_flag():
    assert not RerankSpec.parse(None).active
    assert RerankSpec.parse("none") == RerankSpec()
    spec = RerankSpec.parse({"method": "k_reciprocal", "k1": 10, "lambda": 0.5})
    assert (spec.k1, spec.k2, spec.lambda_value, spec.candidates) == (10, 6, 0.5, 100)
    assert spec.as_config() == {
        "method": "k_reciprocal",
        "k1": 10,
        "k2": 6,
        "lambda": 0.5,
        "candidates": 100,
    }
    flag = RerankSpec.parse_flag("k_reciprocal:k1=10, lambda=0.5")
    assert flag.as_config() == spec.as_config() and flag.path == "--rerank"
    assert RerankSpec.parse_flag("alpha_qe").as_config() == {
        "method": "alpha_qe",
        "alpha": 3.0,
        "neighbours": 2,
    }
    assert set(METHODS) >= {"alpha_qe", "dba", "k_reciprocal"}


@pytest.mark.parametrize(
    "value, message",
    [
        ({"method": "k_reciprocal", "k1": 0}, "eval.rerank.k1: 0 is below the minimum 1"),
        ({"method": "k_reciprocal", "lambda": 1.5}, "eval.rerank.lambda: 1.5 is above"),
        ({"method": "k_reciprocal", "k2": 2.5}, "eval.rerank.k2: 2.5 is not an integer"),
        ({"method": "alpha_qe", "k1": 20}, "eval.rerank.k1: not a parameter of alpha_qe"),
        ({"method": "alpha_qe", "alpha": -1}, "eval.rerank.alpha: -1 is below the minimum 0"),
        ({"method": "k_recip"}, "eval.rerank.method: 'k_recip' is not one of"),
        ({"k1": 20}, "eval.rerank.method: missing"),
        (3, "eval.rerank: 3 is neither a method nor a mapping"),
    ],
)
def test_bad_parameters_give_one_line_user_errors(value, message):
    with pytest.raises(UserError) as error:
        RerankSpec.parse(value)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_flags_and_euclidean_expansion_give_user_errors():
    with pytest.raises(UserError, match="--rerank.candidates: 0 is below"):
        RerankSpec.parse_flag("k_reciprocal:candidates=0")
    with pytest.raises(UserError, match="is not METHOD or METHOD:KEY=VALUE"):
        RerankSpec.parse_flag("k_reciprocal:k1")
    gallery = np.eye(4, dtype=np.float32)
    with pytest.raises(UserError, match="eval.rerank.method: dba weighs neighbours"):
        rerank(RerankSpec.parse("dba"), gallery, gallery, normalized=False, k=2)
