"""The metrics' candidate counting (retrieval.metrics) against a plain dense NumPy reference, on
quantised vectors with many exactly tied scores: every metric, leave-one-out and query/gallery,
with every row ranked over its candidates, every row counted over its whole row, and a mix."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval import metrics as metrics_module
from retrieval.metrics import evaluate

KS = (1, 2, 3, 5, 8)


def reference_metrics(queries, query_labels, gallery, gallery_labels, normalized, exclude, r, ap):
    """A dense float64 score matrix and one stable sort per query (ties to the lower gallery
    index); every metric from the ranked relevance flags. Returns the averages and (Q,) first
    relevant ranks (0 where the query has no relevant item)."""
    q, g = queries.astype(np.float64), gallery.astype(np.float64)
    if normalized:
        scores = q @ g.T
    else:
        scores = -np.sqrt(np.maximum(((q[:, None, :] - g[None, :, :]) ** 2).sum(axis=2), 0))
    first, ap_values, map_r, r_precision = [], [], [], []
    for i in range(len(q)):
        kept = np.ones(len(g), dtype=bool)
        if exclude is not None:
            kept[exclude[i]] = False
        order = np.flatnonzero(kept)[np.argsort(-scores[i, kept], kind="stable")]
        relevant = gallery_labels[order] == query_labels[i]
        n_relevant = int(relevant.sum())
        if n_relevant == 0:
            first.append(0)
            continue
        ranks = np.flatnonzero(relevant) + 1
        precision = np.arange(1, n_relevant + 1) / ranks
        cutoff = len(order) if r is None else r
        in_r = ranks <= cutoff
        denominator = min(cutoff, n_relevant) if ap == "min_r_g" else max(int(in_r.sum()), 1)
        ap_values.append(precision[in_r].sum() / denominator)
        in_g = ranks <= n_relevant
        map_r.append(precision[in_g].sum() / n_relevant)
        r_precision.append(in_g.sum() / n_relevant)
        first.append(int(ranks[0]))
    first = np.array(first)
    hits = first[first > 0]
    values = {
        "mAP": np.mean(ap_values),
        "precision@1": np.mean(hits == 1),
        "MAP@R": np.mean(map_r),
        "R-precision": np.mean(r_precision),
        "excluded_queries": int((first == 0).sum()),
    }
    values.update({f"recall@{k}": np.mean(hits <= k) for k in KS})
    return values, first


def quantised_data(seed, n_gallery, n_queries, dim=4, levels=2, big_class=40):
    """Integer vectors in [-levels, levels] (exact float32 products: many exact ties), some
    gallery rows equal, classes of 1 to ~12 items plus one of ``big_class`` (ranked by sorting
    when over 32), one query class missing from the gallery."""
    rng = np.random.default_rng(seed)
    gallery = rng.integers(-levels, levels + 1, size=(n_gallery, dim)).astype(np.float32)
    gallery[rng.choice(n_gallery, 10)] = gallery[1]
    sizes = rng.integers(1, 13, size=n_gallery)
    labels = np.repeat(np.arange(len(sizes)), sizes)[: n_gallery - big_class]
    gallery_labels = rng.permutation(np.r_[labels, np.full(big_class, -1)])
    queries = rng.integers(-levels, levels + 1, size=(n_queries, dim)).astype(np.float32)
    query_labels = rng.choice(gallery_labels, size=n_queries)
    query_labels[0] = gallery_labels.max() + 1  # no relevant item: excluded
    return queries, query_labels, gallery, gallery_labels


def assert_agree(metrics, expected, first):
    values = metrics.as_dict()
    for name, value in expected.items():
        assert values[name] == pytest.approx(value, abs=1e-12), name
    np.testing.assert_array_equal(metrics.per_query.first_rank, first)


# share: candidates ranked for every row (1.0), no row (0.0: every relevant item counted over
# its row), or the default mix; chunk: rows compared one at a time, or a few at once; passes:
# candidate passes before the rest of a crowded row is counted over the row.
PATHS = [(None, None, None), (0.0, None, None), (1.0, None, None), (None, 1, None)]
PATHS += [(0.02, 300, None), (0.02, None, 1), (0.01, None, 5)]


def use_path(monkeypatch, share, chunk, passes):
    for name, value in (
        ("CANDIDATE_SHARE", share),
        ("CANDIDATE_CHUNK_PAIRS", chunk),
        ("CANDIDATE_PASSES", passes),
    ):
        if value is not None:
            monkeypatch.setattr(metrics_module, name, value)


@pytest.mark.parametrize(("share", "chunk", "passes"), PATHS)
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("r", [None, 1, 6])
@pytest.mark.parametrize("ap", ["min_r_g", "found"])
def test_leave_one_out_matches_dense_reference(
    share, chunk, passes, normalized, r, ap, monkeypatch
):
    use_path(monkeypatch, share, chunk, passes)
    _, _, embeddings, labels = quantised_data(seed=5, n_gallery=260, n_queries=1)
    exclude = np.arange(len(labels))
    metrics = evaluate(
        embeddings,
        labels,
        embeddings,
        labels,
        normalized=normalized,
        exclude=exclude,
        r=r,
        ks=KS,
        ap_denominator=ap,
        nmi=False,
        memory_mb=0.05,  # blocks of a few dozen queries
    )
    expected, first = reference_metrics(
        embeddings, labels, embeddings, labels, normalized, exclude, r, ap
    )
    assert expected["excluded_queries"] > 0  # classes of one image
    assert_agree(metrics, expected, first)


@pytest.mark.parametrize(("share", "chunk", "passes"), PATHS)
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("r", [None, 4])
@pytest.mark.parametrize("ap", ["min_r_g", "found"])
@pytest.mark.parametrize("threads", [1, 3])
def test_query_gallery_matches_dense_reference(
    share, chunk, passes, normalized, r, ap, threads, monkeypatch
):
    use_path(monkeypatch, share, chunk, passes)
    queries, query_labels, gallery, gallery_labels = quantised_data(
        seed=6, n_gallery=300, n_queries=150, levels=1
    )
    metrics = evaluate(
        queries,
        query_labels,
        gallery,
        gallery_labels,
        normalized=normalized,
        r=r,
        ks=KS,
        ap_denominator=ap,
        nmi=False,
        memory_mb=0.05,
        threads=threads,
    )
    expected, first = reference_metrics(
        queries, query_labels, gallery, gallery_labels, normalized, None, r, ap
    )
    assert_agree(metrics, expected, first)


def test_mixed_rows_match_dense_reference_on_noisy_unit_vectors():
    # Unit vectors round class centres (as benchmarks/evaluation.py): most queries have few
    # candidates, some many (counted over their rows from the last relevant item back).
    rng = np.random.default_rng(7)
    labels = rng.permutation(np.arange(1500) % 250)
    centres = rng.standard_normal((250, 16)).astype(np.float32)
    embeddings = centres[labels] + 1.5 * rng.standard_normal((1500, 16)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    embeddings = np.round(embeddings * 16) / 16  # coarse: exact ties among the scores
    exclude = np.arange(len(labels))
    for r in (None, 10):
        metrics = evaluate(
            embeddings,
            labels,
            embeddings,
            labels,
            normalized=True,
            exclude=exclude,
            r=r,
            ks=KS,
            nmi=False,
        )
        expected, first = reference_metrics(
            embeddings, labels, embeddings, labels, True, exclude, r, "min_r_g"
        )
        assert_agree(metrics, expected, first)


@pytest.mark.parametrize("normalized", [True, False])
def test_all_tied_scores_match_dense_reference(normalized):
    # Two distinct vectors only: every query's candidates are most of the gallery (crowded rows,
    # counted over the row after the candidate passes), ranks decided by gallery index alone.
    rng = np.random.default_rng(8)
    embeddings = np.zeros((400, 3), dtype=np.float32)
    embeddings[rng.random(400) < 0.3] = [1.0, 0.0, 0.0]
    labels = rng.integers(0, 20, size=400)  # about 20 relevant items: counted, not sorted
    exclude = np.arange(400)
    for r in (None, 3):
        metrics = evaluate(
            embeddings,
            labels,
            embeddings,
            labels,
            normalized=normalized,
            exclude=exclude,
            r=r,
            ks=KS,
            nmi=False,
        )
        expected, first = reference_metrics(
            embeddings, labels, embeddings, labels, normalized, exclude, r, "min_r_g"
        )
        assert_agree(metrics, expected, first)
