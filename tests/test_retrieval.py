"""Tests of retrieval/: metrics (by hand and against brute force), exact search, the HDF5 gallery
and its resumable writer, and the result grid picture."""

from __future__ import annotations

import logging
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

from retrieval import metrics as metrics_module
from retrieval.faiss_index import open_index
from retrieval.gallery import (
    FORMAT_VERSION,
    GalleryIdentity,
    GalleryWriter,
    items_hash,
    partial_path,
    read_gallery,
    write_gallery,
)
from retrieval.metrics import (
    evaluate,
    evaluate_leave_one_out,
    query_results,
)
from retrieval.search import ExactIndex, equal_rows, order_keys
from retrieval.visualize import (
    MATCH,
    MISS,
    MOUNT,
    QUERY,
    UNKNOWN,
    GridLayout,
    result_grid,
    save_grid,
)
from tfcbir import UserError

# --- brute force: a plain per-query loop, written independently of retrieval/ -------------------


def brute_ranking(query, gallery, normalized, excluded=()):
    """Gallery indices best first: float64 scores, ties to the lower index."""
    scores = []
    for j, item in enumerate(gallery):
        if j in excluded:
            continue
        q, g = query.astype(np.float64), item.astype(np.float64)
        score = float(q @ g) if normalized else -float(np.sqrt(np.sum((q - g) ** 2)))
        scores.append((-score, j))
    return [j for _, j in sorted(scores)], {j: -s for s, j in scores}


def brute_metrics(queries, query_labels, gallery, gallery_labels, normalized, exclude, r, found):
    """Per query: (G, first relevant rank, AP@r, MAP@R, R-precision), or None when G == 0."""
    out = []
    for i, query in enumerate(queries):
        excluded = () if exclude is None else (int(exclude[i]),)
        ranking, _ = brute_ranking(query, gallery, normalized, excluded)
        relevant = [gallery_labels[j] == query_labels[i] for j in ranking]
        g = sum(relevant)
        if g == 0:
            out.append(None)
            continue
        cutoff = len(ranking) if r is None else r
        hits, ap_sum, ap_found, map_sum, in_r_top = 0, 0.0, 0, 0.0, 0
        first = None
        for position, is_relevant in enumerate(relevant, start=1):
            if not is_relevant:
                continue
            hits += 1
            first = first or position
            if position <= cutoff:
                ap_sum += hits / position
                ap_found += 1
            if position <= g:
                map_sum += hits / position
                in_r_top += 1
        ap = ap_sum / max(ap_found, 1) if found else ap_sum / min(cutoff, g)
        out.append((g, first, ap, map_sum / g, in_r_top / g))
    return out


def assert_matches_brute(results, expected):
    for i, row in enumerate(expected):
        if row is None:
            assert results.n_relevant[i] == 0 and np.isnan(results.average_precision[i])
            continue
        g, first, ap, map_r, r_precision = row
        assert results.n_relevant[i] == g, i
        assert results.first_rank[i] == first, i
        assert results.average_precision[i] == pytest.approx(ap, abs=1e-12), i
        assert results.map_at_r[i] == pytest.approx(map_r, abs=1e-12), i
        assert results.r_precision[i] == pytest.approx(r_precision, abs=1e-12), i


def scores_as_embeddings(scores):
    """Gallery rows whose dot product with the query [1, 0] is exactly the given score."""
    return np.array([[s, 0.0] for s in scores], dtype=np.float32), np.array([[1, 0]], np.float32)


# --- metrics by hand ----------------------------------------------------------------------------


def test_metrics_by_hand_ranking():
    # Ranking 0 (rel), 1, 2 (rel), 3, 4 (rel): relevant ranks 1, 3, 5; G = 3.
    gallery, query = scores_as_embeddings([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([1, 0, 1, 0, 1])
    kw = {"normalized": True, "nmi": False}
    full = evaluate(query, [1], gallery, labels, **kw)
    assert full.mean_average_precision == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert full.precision_at_1 == 1.0 and full.recall_at_k == {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0}
    assert full.map_at_r == pytest.approx((1 + 2 / 3) / 3)
    assert full.r_precision == pytest.approx(2 / 3)
    # AP@2: only rank 1 counts, divided by min(2, G) = 2; the original system divided by 1.
    assert evaluate(query, [1], gallery, labels, r=2, **kw).mean_average_precision == 0.5
    found = evaluate(query, [1], gallery, labels, r=2, ap_denominator="found", **kw)
    assert found.mean_average_precision == 1.0
    # r larger than G: min(r, G) = G, the full AP.
    at_10 = evaluate(query, [1], gallery, labels, r=10, **kw)
    assert at_10.mean_average_precision == pytest.approx(full.mean_average_precision)


def test_metrics_ties_go_to_the_lower_gallery_index():
    # Scores 0.5, 0.9, 0.5, 0.5, 0.5: ranking 1, 0, 2, 3, 4 (the tied 0.5s in index order).
    gallery, query = scores_as_embeddings([0.5, 0.9, 0.5, 0.5, 0.5])
    labels = np.array([0, 1, 1, 1, 1])
    queries = np.repeat(query, 2, axis=0)
    results = query_results(queries, [0, 1], gallery, labels, normalized=True)
    # Query of class 0: its only relevant item (index 0) is 2nd; (higher index first: 5th).
    assert results.first_rank.tolist() == [2, 1]
    assert results.average_precision[0] == 0.5
    assert results.map_at_r[0] == 0.0 and results.r_precision[0] == 0.0
    # Query of class 1: relevant ranks 1, 3, 4, 5.
    assert results.average_precision[1] == pytest.approx((1 + 2 / 3 + 3 / 4 + 4 / 5) / 4)
    assert results.map_at_r[1] == pytest.approx((1 + 2 / 3 + 3 / 4) / 4)
    assert results.r_precision[1] == 0.75
    scores, indices = ExactIndex(gallery, normalized=True).search(query, 3)
    assert indices.tolist() == [[1, 0, 2]]
    np.testing.assert_allclose(scores, [[0.9, 0.5, 0.5]])


def test_leave_one_out_by_hand_with_a_single_image_class():
    # Points on a line, Euclidean; class 1 has one image, so its query has no relevant item.
    embeddings = np.array([[0], [3], [2], [6], [5]], dtype=np.float32)
    labels = np.array([0, 0, 1, 2, 2])
    result = evaluate_leave_one_out(embeddings, labels, normalized=False, nmi=False)
    # Query 0 ranks 2, 1, 4, 3: its match is 2nd. Query 1 ranks 2, 4, then 0 and 3 tie at
    # distance 3 and go in index order: its match is 3rd. Queries 3 and 4 hit at rank 1.
    assert result.per_query.first_rank.tolist() == [2, 3, 0, 1, 1]
    assert result.n_queries == 5 and result.n_excluded == 1 and result.n_evaluated == 4
    assert result.mean_average_precision == pytest.approx((1 / 2 + 1 / 3 + 1 + 1) / 4)
    assert result.precision_at_1 == 0.5
    assert result.recall_at_k == {1: 0.5, 2: 0.75, 4: 1.0, 8: 1.0}
    assert result.map_at_r == 0.5 and result.r_precision == 0.5
    values = result.as_dict()
    assert values["excluded_queries"] == 1 and values["recall@2"] == 0.75 and "NMI" not in values


def test_query_without_relevant_item_is_excluded_and_all_excluded_is_refused():
    gallery, query = scores_as_embeddings([0.9, 0.8])
    queries = np.repeat(query, 2, axis=0)
    result = evaluate(queries, [0, 7], gallery, [0, 1], normalized=True, nmi=False)
    assert result.n_excluded == 1 and result.mean_average_precision == 1.0
    found = evaluate(
        queries, [1, 7], gallery, [0, 1], r=1, ap_denominator="found", nmi=False, normalized=True
    )
    assert found.mean_average_precision == 0.0  # nothing in the top 1: AP 0, not excluded
    with pytest.raises(UserError, match="leave_one_out"):
        evaluate(queries, [5, 7], gallery, [0, 1], normalized=True, nmi=False)


# --- metrics against brute force ----------------------------------------------------------------


def tie_rich_data(seed, n_gallery=60, n_queries=40, dim=3, n_classes=6):
    """Small integer vectors: exact float arithmetic and many exactly tied scores."""
    rng = np.random.default_rng(seed)
    gallery = rng.integers(-2, 3, size=(n_gallery, dim)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(n_queries, dim)).astype(np.float32)
    # Classes of very different sizes, one class missing from the gallery.
    gallery_labels = rng.choice(n_classes - 1, size=n_gallery, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    query_labels = rng.integers(0, n_classes, size=n_queries)
    return queries, query_labels, gallery, gallery_labels


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("r", [None, 1, 5])
@pytest.mark.parametrize("found", [False, True])
def test_metrics_match_brute_force_query_gallery(normalized, r, found):
    queries, query_labels, gallery, gallery_labels = tie_rich_data(seed=1)
    denominator = "found" if found else "min_r_g"
    results = query_results(
        queries,
        query_labels,
        gallery,
        gallery_labels,
        normalized=normalized,
        r=r,
        ap_denominator=denominator,
    )
    expected = brute_metrics(
        queries, query_labels, gallery, gallery_labels, normalized, None, r, found
    )
    assert sum(e is None for e in expected) > 0  # the missing class is exercised
    assert_matches_brute(results, expected)


@pytest.mark.parametrize("path", ["count", "sort"])
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("memory_mb", [1e-4, 0.007])
def test_metrics_match_brute_force_leave_one_out(path, normalized, memory_mb, monkeypatch):
    # "sort": force ranking by sorted rows. Tiny memory budgets force one-row blocks (1e-4 MiB)
    # or blocks of a few rows of growing class sizes (0.007 MiB).
    if path == "sort":
        monkeypatch.setattr(metrics_module, "COUNT_MAX_RELEVANT", 0)
    _, _, embeddings, labels = tie_rich_data(seed=2, n_gallery=70)
    exclude = np.arange(len(embeddings))
    results = query_results(
        embeddings,
        labels,
        embeddings,
        labels,
        normalized=normalized,
        exclude=exclude,
        r=7,
        memory_mb=memory_mb,
    )
    expected = brute_metrics(embeddings, labels, embeddings, labels, normalized, exclude, 7, False)
    assert_matches_brute(results, expected)


def test_metrics_match_brute_force_on_normalised_random_data():
    rng = np.random.default_rng(3)
    embeddings = rng.standard_normal((120, 16)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = rng.integers(0, 12, size=120)
    exclude = np.arange(120)
    results = query_results(
        embeddings, labels, embeddings, labels, normalized=True, exclude=exclude
    )
    expected = brute_metrics(embeddings, labels, embeddings, labels, True, exclude, None, False)
    assert_matches_brute(results, expected)
    # The averages are the means of the per-query values over evaluated queries.
    metrics = evaluate_leave_one_out(embeddings, labels, normalized=True, nmi=False)
    first = np.array([row[1] for row in expected if row is not None])
    assert metrics.recall_at_k[4] == pytest.approx(np.mean(first <= 4))
    assert metrics.mean_average_precision == pytest.approx(
        np.mean([row[2] for row in expected if row is not None])
    )


def varied_classes_data(seed: int, dim: int = 4):
    """Leave-one-out data with classes of 1 to 50 images and many exact ties: coarse integer
    vectors (a few values per coordinate, so many scores are exactly equal), some rows equal."""
    rng = np.random.default_rng(seed)
    sizes = np.r_[1, 2, 50, 33, 32, rng.integers(1, 51, size=8)]
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    embeddings = rng.integers(-2, 3, size=(len(labels), dim)).astype(np.float32)
    embeddings[rng.choice(len(labels), 20)] = embeddings[0]  # equal vectors at many places
    return embeddings, labels


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("r", [None, 1, 10])
@pytest.mark.parametrize(("tile", "threads"), [(None, 1), (7, 1), (None, 3)])
def test_counted_and_sorted_ranks_match_brute_force_on_varied_classes(
    normalized, r, tile, threads, monkeypatch
):
    # Classes of 1..50 images: rows with G <= 32 are counted, larger ones sorted, in blocks of
    # a few queries (a small budget). tile=7: the counts compare the gallery in tiles of 7, so
    # many relevant items lie in a tile with exactly tied scores before and after them.
    if tile is not None:
        monkeypatch.setattr(metrics_module, "_count_tile", lambda n: tile)
    embeddings, labels = varied_classes_data(seed=11)
    exclude = np.arange(len(labels))
    rng = np.random.default_rng(0)
    picked = rng.choice(len(labels), 120, replace=False)  # a sample, as evaluation.py's -t
    picked = np.unique(np.r_[picked, np.flatnonzero(labels == 0)])  # with the one-image class
    results = query_results(
        embeddings[picked],
        labels[picked],
        embeddings,
        labels,
        normalized=normalized,
        exclude=exclude[picked],
        r=r,
        memory_mb=0.02,
        threads=threads,  # 3: blocks ranked by three threads at once, each with its buffer
    )
    expected = brute_metrics(
        embeddings[picked], labels[picked], embeddings, labels, normalized, picked, r, False
    )
    assert any(row is None for row in expected)  # a class of one image: excluded
    assert max(row[0] for row in expected if row) == 49  # the sorted path is exercised
    assert_matches_brute(results, expected)


# --- exact search -------------------------------------------------------------------------------


@pytest.mark.parametrize("normalized", [True, False])
def test_exact_index_matches_brute_force_with_ties_and_exclusion(normalized):
    queries, _, gallery, _ = tie_rich_data(seed=4, n_gallery=50, n_queries=30)
    index = ExactIndex(gallery, normalized=normalized, memory_mb=1e-3)  # several blocks
    exclude = np.random.default_rng(0).integers(-1, 50, size=30)  # -1: nothing excluded
    for k in (1, 7, 50, 53):
        scores, indices = index.search(queries, k, exclude=exclude)
        assert scores.shape == indices.shape == (30, k)
        for i, query in enumerate(queries):
            excluded = () if exclude[i] < 0 else (int(exclude[i]),)
            ranking, brute_scores = brute_ranking(query, gallery, normalized, excluded)
            expected = (ranking + [-1] * k)[:k]
            assert indices[i].tolist() == expected, (k, i)
            kept = [j for j in expected if j >= 0]
            np.testing.assert_allclose(
                scores[i, : len(kept)], [brute_scores[j] for j in kept], rtol=1e-5, atol=1e-5
            )
            assert np.all(np.isneginf(scores[i, len(kept) :]))


class SmallBlocks(ExactIndex):
    """Blocks of 120 (query, item) pairs (but at least 16 k items) screened in runs of 4: many
    blocks, a short last block and a short last run even for a gallery of a few hundred items."""

    BLOCK_PAIRS = 120
    CHUNK = 4


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("order", ["as drawn", "worst first", "all equal"])
def test_exact_index_screened_blocks_match_brute_force(normalized, order):
    queries, _, gallery, _ = tie_rich_data(seed=7, n_gallery=203, n_queries=12)
    if order == "worst first":  # every block beats the last: the screen lets everything through
        gallery = gallery[np.argsort(gallery @ queries[0], kind="stable")]
    elif order == "all equal":  # one big tie: the whole-block fallback and the index rule
        gallery = np.ones_like(gallery)
    rng = np.random.default_rng(3)
    exclude = rng.integers(-1, len(gallery), size=(len(queries), 3))
    for k in (1, 3, 10):
        for memory_mb in (1e-3, 256):  # one query a block; all in one
            index = SmallBlocks(gallery, normalized=normalized, memory_mb=memory_mb)
            scores, indices = index.search(queries, k, exclude=exclude)
            for i, query in enumerate(queries):
                excluded = {int(j) for j in exclude[i] if j >= 0}
                ranking, brute_scores = brute_ranking(query, gallery, normalized, excluded)
                assert indices[i].tolist() == ranking[:k], (k, memory_mb, i)
                np.testing.assert_allclose(
                    scores[i], [brute_scores[j] for j in ranking[:k]], rtol=1e-5, atol=1e-5
                )
    # Scores come out as ExactIndex.scores has them, bit for bit.
    full = index.scores(queries)
    assert np.array_equal(scores, np.take_along_axis(full, indices, axis=1))


def equal_vectors_data(n_gallery: int, dim: int, seed: int = 0):
    """A gallery of random vectors with one vector ``v`` (and ``-0.0`` variants of it) at many
    positions, the first and last included; queries near ``v``, so its copies are every query's
    best items, ahead of all others by far. Returns gallery (N, D), the copies' positions
    (ascending) and queries (17, D)."""
    rng = np.random.default_rng(seed)
    gallery = rng.standard_normal((n_gallery, dim)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    v = gallery[0].copy()
    v[0] = 0.0
    copies = np.unique(
        np.r_[0, n_gallery - 1, rng.choice(n_gallery, n_gallery // 3, replace=False)]
    )
    gallery[copies] = v
    gallery[copies[1::2], 0] = -0.0  # the same number: these tie as well
    queries = v + 0.01 * rng.standard_normal((17, dim)).astype(np.float32)
    return gallery, copies, queries


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("dim", [16, 100, 128])
@pytest.mark.parametrize("n_gallery", [7, 33, 1000])
def test_equal_gallery_vectors_tie_at_every_position_and_block_size(normalized, dim, n_gallery):
    # BLAS kernels sum a dot product in an order that depends on the item's position in the
    # block (edge kernels) and on the block's shape (one query: a matrix-vector product), so
    # equal vectors can score a bit apart; they must tie, and rank by gallery index.
    gallery, copies, queries = equal_vectors_data(n_gallery, dim)
    k = len(copies)
    for index_type in (ExactIndex, SmallBlocks):
        for memory_mb in (1e-4, 1e-2, 256):
            index = index_type(gallery, normalized=normalized, memory_mb=memory_mb)
            for block in (queries, queries[:1], queries[5:8]):
                scores, indices = index.search(block, k)
                assert (indices == copies).all(), (index_type, memory_mb, len(block))
                assert (scores == scores[:, :1]).all()
                full = index.scores(block)
                assert (full[:, copies] == full[:, copies[:1]]).all()
    # The metrics: the copies alternate between the query's class (0) and another (1), so a
    # copy that jumped ahead of a lower-indexed one would change the ranks of the relevant ones.
    labels = np.full(n_gallery, 2)
    labels[copies] = np.arange(len(copies)) % 2
    relevant = copies[labels[copies] == 0]
    for memory_mb in (1e-4, 1e-2, 256):
        for rows in (slice(None), slice(0, 1), slice(3, 6)):
            results = query_results(
                queries[rows],
                np.zeros(len(queries[rows]), int),
                gallery,
                labels,
                normalized=normalized,
                memory_mb=memory_mb,
            )
            expected_ranks = np.flatnonzero(labels[copies] == 0) + 1  # 1, 3, 5, ...
            assert (results.first_rank == 1).all()
            g = len(relevant)
            ap = np.mean(np.arange(1, g + 1) / expected_ranks)
            np.testing.assert_allclose(results.average_precision, ap, rtol=1e-12)


def test_equal_rows_groups_equal_vectors_exactly():
    rng = np.random.default_rng(5)
    rows = rng.integers(-1, 2, size=(300, 3)).astype(np.float32)  # many equal rows
    rows[rows == 0] = np.where(rng.random(np.count_nonzero(rows == 0)) < 0.5, -0.0, 0.0)
    found, heads = equal_rows(rows)
    expected_rows, expected_heads = [], []
    for i, row in enumerate(rows):
        equal = np.flatnonzero((rows == row).all(axis=1))  # -0.0 == 0.0
        if len(equal) > 1:
            expected_rows.append(i)
            expected_heads.append(equal[0])
    assert found.tolist() == expected_rows and heads.tolist() == expected_heads
    distinct = rng.standard_normal((50, 4)).astype(np.float32)
    assert [len(a) for a in equal_rows(distinct)] == [0, 0]


def test_exact_index_refuses_nan():
    gallery = np.zeros((3, 2), dtype=np.float32)
    gallery[2, 1] = np.nan
    with pytest.raises(ValueError, match="gallery embeddings contain NaN"):
        ExactIndex(gallery, normalized=True)
    with pytest.raises(ValueError, match="queries contain NaN"):
        ExactIndex(gallery[:2], normalized=True).search(gallery[1:], 1)


def test_order_keys_order_like_scores_then_index():
    scores = np.array([[0.5, -0.0, 0.0, -1.5, 0.5, -np.inf, 2.0]], dtype=np.float32)
    keys = order_keys(scores.copy())
    expected = [6, 0, 4, 1, 2, 3, 5]  # -0.0 and 0.0 are equal: index order
    assert np.argsort(-keys[0].astype(np.float64)).tolist() == expected
    assert len(np.unique(keys)) == scores.shape[1]


# --- the HDF5 gallery ---------------------------------------------------------------------------


def identity(items: dict, **changes) -> GalleryIdentity:
    """The identity of a gallery of ``items`` (paths, labels, classes) by model abc123, step 500,
    config cfg1; ``changes`` replace fields."""
    fields = {
        "model_id": "abc123",
        "config_hash": "cfg1",
        "items_hash": items_hash(items["paths"], items["labels"], items["classes"]),
        "model_step": 500,
    }
    return GalleryIdentity(**{**fields, **changes})


def gallery_items(n=10, dim=4):
    rng = np.random.default_rng(6)
    return {
        "embeddings": rng.standard_normal((n, dim)).astype(np.float32),
        "labels": np.arange(n) % 3,
        "paths": [f"bags/é_{i}.jpg" for i in range(n)],
        "classes": ["red", "grün", "blue"],
    }


def test_gallery_round_trip(tmp_path):
    items = gallery_items()
    path = write_gallery(
        tmp_path / "emb" / "test.h5",
        **items,
        normalized=True,
        identity=identity(items),
        data_root="/data",
        split="test",
        extra={"image_size": [56, 56]},
    )
    assert [p.name for p in path.parent.iterdir()] == ["test.h5"]  # no temporary left
    gallery = read_gallery(path, expect=identity(items, model_step=None))
    assert gallery.identity == identity(items)
    np.testing.assert_array_equal(gallery.embeddings, items["embeddings"])
    assert gallery.embeddings.dtype == np.float32 and gallery.dim == 4 and len(gallery) == 10
    assert gallery.labels.tolist() == items["labels"].tolist()
    assert gallery.paths == items["paths"] and gallery.classes == items["classes"]
    assert gallery.class_names([1]) == ["grün"]
    assert (gallery.normalized, gallery.model_id, gallery.model_step, gallery.config_hash) == (
        True,
        "abc123",
        500,
        "cfg1",
    )
    assert gallery.split == "test" and gallery.data_root == "/data"
    assert gallery.extra == {"image_size": [56, 56]} and gallery.created and gallery.version
    with h5py.File(path, "r") as f:
        assert f.attrs["dim"] == 4 and f["embeddings"].dtype == np.float32
    index = open_index(gallery)  # "exact": needs neither an index file nor faiss
    assert isinstance(index, ExactIndex) and index.search(items["embeddings"][:1], 1)[1] == [[0]]


def test_gallery_refusals(tmp_path):
    items = gallery_items()
    path = write_gallery(
        tmp_path / "test.h5", **items, normalized=True, identity=identity(items), split="test"
    )
    with pytest.raises(
        UserError,
        match=r"another model checkpoint.*embed.py -c run.yaml "
        r"--split test",
    ):
        read_gallery(path, expect=identity(items, model_id="other"), config_path="run.yaml")
    with pytest.raises(UserError, match="another config"):
        read_gallery(path, expect=identity(items, config_hash="cfg2"))
    with pytest.raises(UserError, match="another training step"):
        read_gallery(path, expect=identity(items, model_step=600))
    # One image more, or one relabelled: another item list.
    for changed in (
        {**items, "paths": items["paths"] + ["new.jpg"], "labels": np.arange(11) % 3},
        {**items, "labels": np.roll(items["labels"], 1)},
    ):
        with pytest.raises(
            UserError,
            match=r"another list of test images \(10 then.*embed.py -c r.json --split test",
        ) as caught:
            read_gallery(path, expect=identity(changed), config_path="r.json")
        assert "\n" not in str(caught.value)
    # A gallery of the format before items_hash is refused with the command that re-embeds.
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION - 1
        del f.attrs["items_hash"]
    with pytest.raises(UserError, match=r"gallery format 1, this tfcbir reads format 2; re-embed"):
        read_gallery(path, config_path="r.json")
    with pytest.raises(UserError, match="no gallery there"):
        read_gallery(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="not a readable tfcbir gallery") as caught:
        read_gallery(tmp_path / "junk.h5")
    assert "\n" not in str(caught.value)  # one line


def test_interrupted_partial_write_resumes(tmp_path, caplog):
    items = gallery_items(n=10)
    out = tmp_path / "test.h5"
    spec = {k: items[k] for k in ("paths", "labels", "classes")}
    writer = GalleryWriter(
        out, **spec, dim=4, normalized=True, identity=identity(items), split="test"
    )
    assert writer.remaining().tolist() == list(range(10))
    writer.write(range(0, 4), items["embeddings"][0:4])
    writer.write([8, 6], items["embeddings"][[8, 6]])
    writer.close()  # the run is interrupted here
    assert not out.exists() and partial_path(out).exists()

    resumed = GalleryWriter(
        out, **spec, dim=4, normalized=True, identity=identity(items), split="test"
    )
    assert resumed.remaining().tolist() == [4, 5, 7, 9]  # finished chunks are not redone
    with pytest.raises(ValueError, match="not embedded yet"):
        resumed.finalize()
    todo = resumed.remaining()
    resumed.write(todo, items["embeddings"][todo])
    assert resumed.finalize() == out
    assert not partial_path(out).exists()
    gallery = read_gallery(out, expect=identity(items))
    np.testing.assert_array_equal(gallery.embeddings, items["embeddings"])
    assert gallery.paths == items["paths"] and gallery.split == "test"

    # A partial file from another model is started over, with a warning.
    writer = GalleryWriter(out, **spec, dim=4, normalized=True, identity=identity(items))
    writer.write([0], items["embeddings"][:1])
    writer.close()
    with caplog.at_level(logging.WARNING, logger="tfcbir"):
        other = GalleryWriter(
            out, **spec, dim=4, normalized=True, identity=identity(items, model_id="new")
        )
    assert "model_id differs" in caplog.text
    assert len(other.remaining()) == 10
    other.close()


# --- the result grid ----------------------------------------------------------------------------


def test_result_grid_layout_and_frame_colours(tmp_path):
    rng = np.random.default_rng(7)
    query = np.zeros((60, 40, 3), dtype=np.uint8) + np.array([10, 20, 30], dtype=np.uint8)
    matches = [True, False, None, True, False, None, True]
    results = [
        (rng.integers(0, 255, size=(30, 50, 3), dtype=np.uint8), f"class {i}", 0.9 - i / 10, match)
        for i, match in enumerate(matches)
    ]
    picture = result_grid(
        query, results, query_label="class 0", title="query 1 of 3", columns=5, thumb=64
    )
    layout = GridLayout(n_results=7, columns=5, thumb=64, title=True)
    assert picture.mode == "RGB" and picture.size == layout.size
    assert layout.rows == 2  # 7 results wrap after 5
    colours = {True: MATCH, False: MISS, None: UNKNOWN}
    for i, match in enumerate(matches):
        x0, y0, x1, y1 = layout.result_box(i)
        assert picture.getpixel((x0 + 1, y0 + 1)) == colours[match], i  # on the frame
        assert picture.getpixel((x1 - 2, (y0 + y1) // 2)) == colours[match], i
    # The second row starts under the first, at the first column.
    assert layout.result_box(5)[0] == layout.result_box(0)[0]
    assert layout.result_box(5)[1] > layout.result_box(0)[3]
    # The 60x40 query is shrunk to 64x43 and centred in its frame, mounted on light grey.
    x0, y0, x1, y1 = layout.query_box()
    assert picture.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == (10, 20, 30)
    assert picture.getpixel((x0 + layout.frame + 2, (y0 + y1) // 2)) == MOUNT
    assert picture.getpixel((x0 + 1, y0 + 1)) == QUERY

    path = save_grid(tmp_path / "grids" / "q1.png", picture)
    assert [p.name for p in path.parent.iterdir()] == ["q1.png"]
    with Image.open(path) as reread:
        assert reread.size == picture.size
        assert reread.convert("RGB").getpixel(layout.result_box(1)[:2]) == MISS


# --- the FAISS index (skipped without faiss-cpu) ------------------------------------------------


def test_faiss_missing_says_how_to_install(monkeypatch):
    from retrieval import faiss_index

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now fails
    with pytest.raises(UserError, match="pip install -r requirements-faiss.txt"):
        faiss_index.FaissIndex.build(np.eye(3, dtype=np.float32), normalized=True, factory="Flat")


def blobs(n=1000, dim=16, n_classes=20, seed=8):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, size=n)
    points = rng.standard_normal((n_classes, dim))[labels] + 0.3 * rng.standard_normal((n, dim))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32), labels


@pytest.mark.parametrize("normalized", [True, False])
def test_faiss_flat_equals_exact_and_ivf_recall(normalized):
    pytest.importorskip("faiss")
    from retrieval.faiss_index import FaissIndex

    points, _ = blobs()
    queries, exclude = points[:100], np.arange(100)
    exact_scores, exact = ExactIndex(points, normalized).search(queries, 10, exclude=exclude)
    flat = FaissIndex.build(points, normalized=normalized, factory="Flat")
    flat_scores, flat_indices = flat.search(queries, 10, exclude=exclude)
    assert np.array_equal(flat_indices, exact)
    np.testing.assert_allclose(flat_scores, exact_scores, atol=1e-4)
    assert not (flat_indices == exclude[:, None]).any()
    ivf = FaissIndex.build(
        points, normalized=normalized, factory="IVF16,Flat", search_parameters="nprobe=4"
    )
    _, approximate = ivf.search(queries, 10, exclude=exclude)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact)])
    assert recall > 0.9
    _, padded = flat.search(queries[:2], len(points) + 2, exclude=exclude[:2])
    assert (padded[:, -3:] == -1).all() and (padded[:, :-3] >= 0).all()


def test_faiss_default_and_given_search_parameters():
    faiss = pytest.importorskip("faiss")
    from retrieval.faiss_index import FaissIndex

    points, _ = blobs(n=2000)
    ivf = FaissIndex.build(points, normalized=True, factory="IVF64,Flat")
    assert ivf.parameters == "nprobe=8"  # 64 / 64 lists, but at least 8
    assert faiss.extract_index_ivf(ivf.index).nprobe == 8
    given = FaissIndex(
        ivf.index, normalized=True, factory="IVF64,Flat", search_parameters="nprobe=3"
    )
    assert given.parameters == "nprobe=3" and faiss.extract_index_ivf(ivf.index).nprobe == 3
    hnsw = FaissIndex.build(points, normalized=True, factory="HNSW16")
    assert hnsw.parameters == "efSearch=256" and hnsw.index.hnsw.efSearch == 256
    assert FaissIndex.build(points, normalized=True, factory="Flat").parameters == ""
    with pytest.raises(UserError, match="'nprobe=4' do not fit HNSW16"):
        FaissIndex(hnsw.index, normalized=True, factory="HNSW16", search_parameters="nprobe=4")


@pytest.mark.parametrize("normalized", [True, False])
def test_faiss_ties_go_to_the_lower_index(normalized):
    pytest.importorskip("faiss")
    from retrieval.faiss_index import FaissIndex

    # Small integers: exact arithmetic (BLAS and FAISS sum in different orders), many ties.
    queries, _, points, _ = tie_rich_data(seed=2, n_gallery=200, n_queries=20)
    exclude = np.random.default_rng(2).integers(-1, 200, size=(20, 2))
    flat = FaissIndex.build(points, normalized=normalized, factory="Flat")
    for k in (1, 12, 199):
        # FAISS keeps the higher indices of a tie at the k-th score: the wrapper asks for more.
        exact_scores, exact = ExactIndex(points, normalized).search(queries, k, exclude=exclude)
        scores, indices = flat.search(queries, k, exclude=exclude)
        assert np.array_equal(indices, exact)
        np.testing.assert_allclose(scores, exact_scores, atol=1e-5)


def test_faiss_index_save_load_and_refusals(tmp_path):
    pytest.importorskip("faiss")
    from retrieval.faiss_index import FaissIndex, build_index, index_path

    points, labels = blobs(n=300)
    items = {
        "paths": [f"{i}.jpg" for i in range(300)],
        "labels": labels,
        "classes": [str(c) for c in range(20)],
    }
    spec = {"normalized": True, "identity": identity(items), "split": "train"}
    path = write_gallery(tmp_path / "train.h5", points, **items, **spec)
    gallery = read_gallery(path)
    saved = build_index(gallery, "HNSW16")
    assert saved == index_path(path) == tmp_path / "train.faiss"
    index = FaissIndex.load(saved, gallery)
    loaded = open_index(gallery, "HNSW16", search_parameters="efSearch=64")
    assert loaded.factory == "HNSW16" and len(loaded) == 300
    assert np.array_equal(loaded.search(points[:5], 3)[1], index.search(points[:5], 3)[1])
    with pytest.raises(UserError, match="built as HNSW16, the config asks for Flat"):
        FaissIndex.load(saved, gallery, factory="Flat")
    with pytest.raises(UserError, match="IVF64,Flat on 40 gallery items.*fewer lists"):
        FaissIndex.build(points[:40], normalized=True, factory="IVF64,Flat")
    with pytest.raises(UserError, match="not a FAISS factory string"):
        FaissIndex.build(points, normalized=True, factory="Bogus12")
    # Re-embedding the gallery makes the index stale.
    write_gallery(path, points, **items, **spec)
    with pytest.raises(UserError, match=r"stale.*embed.py -c <config> --split train"):
        FaissIndex.load(saved, read_gallery(path))
    with pytest.raises(UserError, match="no FAISS index there"):
        FaissIndex.load(tmp_path / "test.faiss", gallery)
