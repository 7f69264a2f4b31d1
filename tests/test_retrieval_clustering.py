"""retrieval.clustering: the k-means and NMI behind the evaluation's NMI and the report."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval import clustering
from retrieval.clustering import kmeans, normalized_mutual_information
from retrieval.metrics import evaluate_leave_one_out


def test_nmi_by_hand():
    assert normalized_mutual_information([0, 0, 1, 1], [5, 5, 3, 3]) == pytest.approx(1.0)
    assert normalized_mutual_information([0, 0, 1, 1], [0, 1, 0, 1]) == 0.0
    # MI = ln 2, H(true) = ln 2, H(pred) = 1.5 ln 2: NMI = ln 2 / (1.25 ln 2) = 0.8.
    assert normalized_mutual_information([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(0.8)
    assert normalized_mutual_information([1, 1, 1], [0, 0, 0]) == 1.0


@pytest.mark.parametrize("plusplus", [True, False])
def test_kmeans_separates_blobs(plusplus, monkeypatch):
    if not plusplus:
        monkeypatch.setattr(clustering, "KMEANS_PLUSPLUS_MAX_PAIRS", 0)
    rng = np.random.default_rng(5)
    centers = np.eye(4, 8, dtype=np.float32) * 20
    labels = np.repeat(np.arange(4), 30)
    points = centers[labels] + rng.standard_normal((120, 8)).astype(np.float32)
    clusters = kmeans(points, 4, seed=0).clusters
    assert np.array_equal(clusters, kmeans(points, 4, seed=0).clusters)  # seeded: deterministic
    if plusplus:
        assert normalized_mutual_information(labels, clusters) == pytest.approx(1.0)
    else:
        assert normalized_mutual_information(labels, clusters) > 0.7
    metrics = evaluate_leave_one_out(points, labels, normalized=False)
    assert metrics.nmi == normalized_mutual_information(labels, clusters)  # same seed
    assert metrics.precision_at_1 == 1.0
