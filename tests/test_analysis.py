"""The analysis report: clustering scores, per-class retrieval, maps, the page, analysis.py."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shutil

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

import config
import retrieval.clustering
from report import clustering, maps
from report.build import Limits, analyze
from report.clustering import Clustering, purity
from report.per_class import class_retrieval
from retrieval import sets
from retrieval.gallery import GalleryIdentity, items_hash, read_gallery, write_gallery
from runs.folder import CSV_FIELDS, RunFolder
from tests.conftest import REPO, tiny_config, write_config
from tfcbir.cli import run
from tfcbir.files import hash_file


def blobs(n_per_class=60, n_classes=4, dim=16, spread=0.3, seed=0):
    """Well-separated Gaussian blobs: points (n, dim) float32 and their labels (n,)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 10
    labels = np.repeat(np.arange(n_classes), n_per_class)
    points = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    return points.astype(np.float32), labels


# --- clustering scores -------------------------------------------------------------------------


def test_purity_of_a_hand_worked_example():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    clusters = np.array([5, 5, 7, 7, 7, 9, 9, 9, -1])
    # cluster 5: {0, 0} -> 2; cluster 7: {0, 1, 1} -> 2; cluster 9: {2, 2, 2} -> 3; noise {2} -> 1
    assert purity(labels, clusters) == pytest.approx(8 / 9)
    assert purity(labels, np.zeros(9, int)) == pytest.approx(4 / 9)  # one cluster: largest class
    assert purity(labels, np.arange(9)) == 1.0  # singletons are pure (why purity is not enough)
    assert purity(labels + 10, clusters * 3) == pytest.approx(8 / 9)  # names do not matter


def test_scores_equal_scikit_learns_on_a_clustering_with_noise():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(300, 8)).astype(np.float32)
    labels = rng.integers(0, 5, size=300)
    clusters = np.where(rng.random(300) < 0.2, -1, labels + (rng.random(300) < 0.3))
    sample = np.sort(rng.choice(300, 120, replace=False))
    found = Clustering("k-means", np.arange(300), clusters)  # every point clustered
    scores = clustering.score(found, labels, points, sample, seed=0)
    assert scores["NMI"] == pytest.approx(normalized_mutual_info_score(labels, clusters))
    assert scores["ARI"] == pytest.approx(adjusted_rand_score(labels, clusters))
    kept = sample[clusters[sample] >= 0]  # the silhouette: the sample, noise left out
    assert scores["silhouette"] == pytest.approx(silhouette_score(points[kept], clusters[kept]))
    table = {}
    for label, cluster in zip(labels, clusters):
        table.setdefault(cluster, []).append(label)
    by_hand = sum(np.bincount(members).max() for members in table.values()) / 300
    assert scores["purity"] == pytest.approx(by_hand)
    assert scores["noise"] == pytest.approx(np.mean(clusters == -1))
    assert scores["clusters"] == len(set(clusters[clusters >= 0]))
    assert scores["points"] == 300

    # A method run on the sample only is scored on the sample's labels.
    subset = Clustering("HDBSCAN", sample, clusters[sample])
    scores = clustering.score(subset, labels, points, sample, seed=0)
    assert scores["NMI"] == pytest.approx(
        normalized_mutual_info_score(labels[sample], clusters[sample])
    )
    assert scores["points"] == 120


def test_every_method_finds_well_separated_blobs():
    points, labels = blobs()
    sample = clustering.sample_indices(len(points), 10_000, seed=0)
    for method in ("k-means", "agglomerative", "HDBSCAN"):
        found = clustering.run_method(method, points, 4, sample, seed=0)
        scores = clustering.score(found, labels, points, sample, seed=0)
        assert scores["NMI"] > 0.95, (method, scores)
        assert scores["ARI"] > 0.95, (method, scores)
        assert scores["purity"] > 0.95, (method, scores)
        assert scores["silhouette"] > 0.8, (method, scores)
        assert scores["clusters"] == 4, (method, scores)
    assert clustering.silhouette(points, labels) > 0.8  # the classes themselves
    # DBSCAN: the default eps makes half the points core points; the rest that no core point
    # reaches is noise (one more cluster for NMI), so the four blobs are found, not every point.
    found = clustering.run_method("DBSCAN", points, 4, sample, seed=0)
    scores = clustering.score(found, labels, points, sample, seed=0)
    assert scores["clusters"] == 4 and 0.05 < scores["noise"] < 0.35
    clustered = found.clusters >= 0
    assert purity(labels[clustered], found.clusters[clustered]) == 1.0
    # eps at the k-distance's 0.9 quantile (about the curve's knee here) leaves little noise.
    found = clustering.run_method("DBSCAN", points, 4, sample, seed=0, eps_quantile=0.9)
    scores = clustering.score(found, labels, points, sample, seed=0)
    assert scores["NMI"] > 0.95 and scores["ARI"] > 0.95 and scores["noise"] < 0.05


def test_random_labels_score_near_zero():
    points, _ = blobs()
    labels = np.random.default_rng(5).integers(0, 4, size=len(points))
    sample = np.arange(len(points))
    found = clustering.run_method("k-means", points, 4, sample, seed=0)
    scores = clustering.score(found, labels, points, sample, seed=0)
    assert scores["NMI"] < 0.05 and abs(scores["ARI"]) < 0.05
    assert scores["purity"] < 0.45  # 0.25 + sampling noise; well-found blobs would give 1
    assert clustering.silhouette(points, labels) < 0.05


def test_kmeans_clusters_every_point_and_is_seeded():
    points, labels = blobs(n_per_class=200)
    sample = clustering.sample_indices(len(points), 100, seed=3)
    assert len(sample) == 100 and np.all(np.diff(sample) > 0)
    first = clustering.kmeans(points, 4, sample, seed=3)
    again = clustering.kmeans(points, 4, sample, seed=3)
    assert len(first.clusters) == len(points) and np.array_equal(first.indices, np.arange(800))
    assert np.array_equal(first.clusters, again.clusters)
    assert first.parameters["init_points"] == 100  # k-means++ started from the sample
    assert first.parameters["init"] == "k-means++"
    assert normalized_mutual_info_score(labels, first.clusters) > 0.99


def test_kmeans_of_very_many_clusters_starts_from_random_points(monkeypatch):
    points, labels = blobs(n_per_class=100)
    monkeypatch.setattr(retrieval.clustering, "KMEANS_PLUSPLUS_MAX_PAIRS", 100)
    found = clustering.kmeans(points, 4, np.arange(400), seed=0)
    assert found.parameters["init"] == "random points"
    assert found.parameters["iterations"] <= clustering.KMEANS_MAX_ITER
    assert len(np.unique(found.clusters)) == 4


def test_cosine_runs_cluster_directions_not_lengths():
    # Two classes by direction, 23 degrees apart; within each, lengths from 1 to 20, so by
    # Euclidean distance the short ones of both classes are closer than the long ones.
    rng = np.random.default_rng(0)
    directions = np.array([[1.0, 0.2, 0.0], [1.0, -0.2, 0.0]]) / np.hypot(1.0, 0.2)
    labels = np.repeat([0, 1], 50)
    lengths = np.tile(np.linspace(1, 20, 50), 2)
    points = directions[labels] * lengths[:, None] + 0.01 * rng.normal(size=(100, 3))
    unit = clustering.clustering_points(points, normalized=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    sample = np.arange(100)
    cosine = clustering.run_method("k-means", unit, 2, sample, seed=0)
    euclidean = clustering.run_method(
        "k-means", clustering.clustering_points(points, normalized=False), 2, sample, seed=0
    )
    assert normalized_mutual_info_score(labels, cosine.clusters) == pytest.approx(1.0)
    assert normalized_mutual_info_score(labels, euclidean.clusters) < 0.5


def test_dbscan_eps_is_the_quantile_of_the_k_distance():
    points, _ = blobs(n_per_class=30)
    distances = np.linalg.norm(points[:, None] - points[None], axis=2)
    fourth_other = np.sort(distances, axis=1)[:, 4]  # column 0: the point itself
    eps = clustering.dbscan_eps(points, min_samples=5, quantile=0.5)
    assert eps == pytest.approx(np.quantile(fourth_other, 0.5), rel=1e-4)
    found = clustering.run_method("DBSCAN", points, 4, np.arange(len(points)), seed=0)
    assert found.parameters["eps"] == pytest.approx(eps, rel=1e-4)
    assert found.parameters["min_samples"] == 5


# --- per-class retrieval -----------------------------------------------------------------------


def brute_force(embeddings, labels, queries):
    """Reference: each query's nearest other item and MAP@R by sorting cosine scores."""
    nearest, map_at_r = [], []
    for q in queries:
        scores = embeddings @ embeddings[q]
        others = [i for i in np.argsort(-scores, kind="stable") if i != q]
        relevant = np.array([labels[i] == labels[q] for i in others])
        r = relevant.sum()
        precision = np.cumsum(relevant) / np.arange(1, len(others) + 1)
        nearest.append(others[0])
        map_at_r.append(np.sum(precision[:r] * relevant[:r]) / r if r else np.nan)
    return np.array(nearest), np.array(map_at_r)


def test_class_retrieval_against_a_brute_force_reference():
    rng = np.random.default_rng(2)
    labels = np.array([0] * 8 + [1] * 6 + [2] * 5 + [3])  # class 3: a single image
    centres = rng.normal(size=(4, 6))
    points = centres[labels] + 0.9 * rng.normal(size=(len(labels), 6))
    embeddings = clustering.clustering_points(points, normalized=True)
    queries = np.arange(len(labels))
    stats = class_retrieval(
        embeddings, labels, ["a", "b", "c", "d"], normalized=True, queries=queries
    )
    nearest, map_at_r = brute_force(embeddings, labels, queries)
    hits = labels[nearest] == labels
    for c in range(3):
        mine = labels == c
        assert stats.recall_at_1[c] == pytest.approx(hits[mine].mean())
        assert stats.map_at_r[c] == pytest.approx(np.nanmean(map_at_r[mine]))
        assert stats.confusion[c].sum() == mine.sum()
        assert stats.confusion[c, c] == hits[mine].sum()
    # The single image's class has no defined score and no row.
    assert np.isnan(stats.recall_at_1[3]) and stats.queries[3] == 0
    assert stats.confusion[3].sum() == 0 and stats.n_excluded == 1
    assert stats.recall_at_1_overall == pytest.approx(hits[:-1].mean())
    assert 0 < stats.recall_at_1_overall < 1  # a test with both hits and misses
    order = stats.worst_first()
    assert list(order) == sorted(range(3), key=lambda c: (stats.recall_at_1[c], stats.map_at_r[c]))
    confused = stats.most_confused(2)
    off = stats.confusion.copy()
    np.fill_diagonal(off, 0)
    assert confused[0]["count"] == off.max()
    rows = stats.as_rows()
    assert rows[3] == {"class": "d", "images": 1, "queries": 0, "recall@1": None, "MAP@R": None}


def test_class_retrieval_of_a_query_sample_searches_the_whole_set():
    points, labels = blobs(n_per_class=20, spread=4.0)
    embeddings = clustering.clustering_points(points, normalized=False)
    queries = np.array([0, 5, 25, 61, 79])
    stats = class_retrieval(embeddings, labels, list("wxyz"), normalized=False, queries=queries)
    distances = np.linalg.norm(embeddings[queries, None] - embeddings[None], axis=2)
    distances[np.arange(5), queries] = np.inf
    nearest = np.argmin(distances, axis=1)
    assert stats.n_queries == 5 and stats.queries.sum() == 5
    assert stats.recall_at_1_overall == pytest.approx(np.mean(labels[nearest] == labels[queries]))


# --- maps and the run's metrics ---------------------------------------------------------------


def test_tsne_map_is_seeded_and_two_dimensional():
    points, labels = blobs(n_per_class=15)
    first = maps.embed_2d("t-SNE", points, seed=4)
    assert first.shape == (60, 2) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, maps.embed_2d("t-SNE", points, seed=4))
    # Blobs stay apart on the map: each point's nearest map neighbour is of its class.
    distances = np.linalg.norm(first[:, None] - first[None], axis=2)
    np.fill_diagonal(distances, np.inf)
    assert np.mean(labels[np.argmin(distances, axis=1)] == labels) > 0.95
    assert maps.embed_2d("t-SNE", points[:3], seed=0).shape == (3, 2)
    assert maps.methods()[0] == "t-SNE"


def test_umap_is_used_where_installed(monkeypatch):
    calls = {}

    class FakeUMAP:
        def __init__(self, **options):
            calls.update(options)

        def fit_transform(self, points):
            return points[:, :2] * 2

    fake = type(shutil)("umap")
    fake.UMAP = FakeUMAP
    monkeypatch.setitem(__import__("sys").modules, "umap", fake)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert maps.methods() == ["t-SNE", "UMAP"]
    points = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.testing.assert_array_equal(maps.embed_2d("UMAP", points, seed=7), points[:, :2] * 2)
    assert calls["random_state"] == 7 and calls["n_components"] == 2


def test_run_folder_reads_metrics_with_gaps(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.read_metrics() is None
    with open(folder.metrics, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerow({"step": 1, "loss": 0.5, "lr": 0.01, "val_recall@1": ""})
        writer.writerow({"step": 2, "loss": 0.4, "lr": 0.01, "val_recall@1": 0.75})
    columns = folder.read_metrics()
    np.testing.assert_array_equal(columns["step"], [1, 2])
    np.testing.assert_array_equal(columns["loss"], [0.5, 0.4])
    assert np.isnan(columns["val_recall@1"][0]) and columns["val_recall@1"][1] == 0.75
    assert np.isnan(columns["elapsed_s"]).all()


# --- the report from galleries on disk ---------------------------------------------------------


def cli_main():
    spec = importlib.util.spec_from_file_location("cli_analysis", REPO / "analysis.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def call(*argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        run(cli_main(), [str(a) for a in argv])
    out, err = capsys.readouterr()
    return done.value.code, out, err


def fake_run(root, name, raw, spread, seed=0, split="test", checkpoint=None):
    """A run with a weights file (its identity) and a gallery of the data set's real ``split``
    images whose embeddings are class centres plus ``spread`` noise; returns the config path.
    checkpoint: a file whose hash the gallery records instead (as ``embed.py --checkpoint``)."""
    path = write_config(root, name, raw)
    resolved = config.load(path)
    folder = RunFolder(config.run_dir(resolved))
    folder.path.mkdir(parents=True)
    folder.best_weights.write_bytes(f"weights of {name}".encode())
    with open(folder.metrics, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for step in range(1, 31):
            recall = f"{0.3 + step / 100:.3f}" if step % 10 == 0 else ""
            writer.writerow({"step": step, "loss": 1 / step, "lr": 0.01, "val_recall@1": recall})
    images = sets.images(resolved, split)
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(images.classes), 16))
    embeddings = centres[images.labels] + spread * rng.normal(size=(len(images), 16))
    write_gallery(
        RunFolder.of(resolved).gallery(split),
        embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True),
        images.labels,
        images.paths,
        images.classes,
        normalized=config.normalized_embeddings(resolved),
        identity=GalleryIdentity(
            model_id=hash_file(checkpoint or folder.best_weights),
            config_hash=config.model_hash(resolved),
            items_hash=items_hash(images.paths, images.labels, images.classes),
            model_step=30,
        ),
        data_root=str(images.root),
        split=split,
    )
    return path


def referenced(page: str) -> set[str]:
    return set(re.findall(r'(?:src|href)="([^"]+)"', page))


def test_report_files_page_and_json(data_dir, capsys):
    path = fake_run(data_dir, "sharp", tiny_config(), spread=0.05)
    code, out, err = call("-c", path, "--json", capsys=capsys)
    assert code == 0, err
    result = json.loads(out)
    for key in ("run", "split", "items", "dim", "classes", "seed", "notes", "models", "page"):
        assert key in result
    assert result["split"] == "test" and result["items"] == 24 and result["classes"] == 6
    (model,) = result["models"]
    assert model["geometry"] == "cosine" and model["kind"] == "trained"
    assert set(model["clustering"]) == set(clustering.METHODS)
    for scores in model["clustering"].values():
        assert set(scores) >= {"NMI", "ARI", "purity", "silhouette", "clusters", "noise"}
    # Tight clusters: every score says so.
    assert model["clustering"]["k-means"]["NMI"] == pytest.approx(1.0)
    assert model["retrieval"]["recall@1"] == 1.0 and model["retrieval"]["MAP@R"] == 1.0
    assert model["class_silhouette"] > 0.9
    assert [row["recall@1"] for row in model["per_class"]] == [1.0] * 6
    assert model["most_confused"] == []
    assert model["maps"]["t-SNE"]["points"] == 24
    folder = data_dir / "trainings" / "sharp" / "analysis" / "test"
    assert result["page"] == str(folder / "index.html")
    assert (
        json.loads((folder / "report.json").read_text())["models"][0]["clustering"]
        == (model["clustering"])
    )
    files = set(model["files"].values()) | {model["maps"]["t-SNE"]["file"]}
    assert {"sharp-curves.png", "sharp-thumbnails.png", "sharp-per-class.png"} <= files
    page = (folder / "index.html").read_text()
    assert files | {"report.json"} <= referenced(page)
    for name in referenced(page):
        assert (folder / name).is_file(), name  # relative, in the report's folder
    assert all(not name.startswith(("/", "http")) for name in referenced(page))
    with open(folder / "sharp-confusion.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert [int(v) for v in rows[1][1:]] == [4, 0, 0, 0, 0, 0]  # 4 test images per class
    assert not any(folder.glob(".tmp-*"))  # atomic writes leave nothing behind


def test_compare_puts_two_runs_side_by_side(data_dir, capsys):
    sharp = fake_run(data_dir, "sharp", tiny_config(), spread=0.05)
    vague = fake_run(data_dir, "vague", tiny_config(), spread=3.0, seed=1)
    code, out, err = call(
        "-c", sharp, "--compare", vague, "--json", "--thumbnails", "0", capsys=capsys
    )
    assert code == 0, err
    result = json.loads(out)
    first, second = result["models"]
    assert (first["name"], second["name"]) == ("sharp", "vague")
    assert second["kind"] == "compared"
    assert first["retrieval"]["recall@1"] > second["retrieval"]["recall@1"]
    assert first["clustering"]["k-means"]["NMI"] > second["clustering"]["k-means"]["NMI"]
    assert "thumbnails" not in first["files"]
    folder = data_dir / "trainings" / "sharp" / "analysis" / "test-vs-vague"
    page = (folder / "index.html").read_text()
    assert {"sharp-t-sne.png", "vague-t-sne.png", "vague-curves.png"} <= referenced(page)
    assert "sharp - vague" in page  # the difference column


def test_a_class_disjoint_test_set_reports_its_own_classes(data_dir):
    raw = tiny_config(data__split={"by": "classes", "train_classes": 0.5})
    path = fake_run(data_dir, "disjoint", raw, spread=0.05)
    cfg = config.load(path)
    gallery = read_gallery(RunFolder.of(cfg).gallery("test"))
    assert len(gallery.classes) == 6 and len(np.unique(gallery.labels)) == 3
    result = analyze(cfg, limits=Limits(thumbnails=0), show_progress=False)
    (model,) = result["models"]
    assert result["classes"] == 3 and model["clustering"]["k-means"]["clusters"] == 3
    present = [gallery.classes[c] for c in np.unique(gallery.labels)]
    assert [row["class"] for row in model["per_class"]] == present
    assert [row["images"] for row in model["per_class"]] == [16, 16, 16]
    folder = data_dir / "trainings" / "disjoint" / "analysis" / "test"
    with open(folder / "disjoint-confusion.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:] == present and len(rows) == 4
    assert [int(v) for v in rows[1][1:]] == [16, 0, 0]


def test_large_sets_are_sampled_and_the_report_says_so(data_dir):
    path = fake_run(data_dir, "sampled", tiny_config(), spread=0.5)
    cfg = config.load(path)
    result = analyze(
        cfg,
        limits=Limits(map_points=10, cluster_points=12, queries=8, thumbnails=5),
        seed=3,
        show_progress=False,
        config_path=str(path),
    )
    (model,) = result["models"]
    assert model["maps"]["t-SNE"]["points"] == 10
    assert model["clustering"]["k-means"]["points"] == 24  # k-means: every image
    assert model["clustering"]["HDBSCAN"]["points"] == 12
    assert model["retrieval"]["queries"] == 8
    notes = " ".join(result["notes"])
    assert "sample of 12 of the 24" in notes and "sample of 10 of the 24" in notes
    assert "8 of the 24" in notes and "draws 5" in notes
    page = (data_dir / "trainings" / "sampled" / "analysis" / "test" / "index.html").read_text()
    assert "sample of 10 of the 24" in page
    again = analyze(
        cfg,
        limits=Limits(map_points=10, cluster_points=12, queries=8, thumbnails=5),
        seed=3,
        show_progress=False,
    )
    assert again["models"][0]["clustering"] == model["clustering"]  # seeded


def test_a_gallery_of_a_checkpoint_is_analysed_with_that_checkpoint(data_dir, capsys):
    checkpoint = data_dir / "ckpt-000010.h5"
    checkpoint.write_bytes(b"weights at step 10")
    path = fake_run(data_dir, "early", tiny_config(), spread=0.05, checkpoint=checkpoint)
    code, _, err = call("-c", path, "--thumbnails", "0", capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "another model checkpoint" in err
    code, out, err = call(
        "-c", path, "--checkpoint", checkpoint, "--json", "--thumbnails", "0", capsys=capsys
    )
    assert code == 0, err
    (model,) = json.loads(out)["models"]
    assert model["model_id"] == hash_file(checkpoint) and model["retrieval"]["recall@1"] == 1.0


def test_bad_input_is_one_line_with_exit_code_2(data_dir, capsys):
    path = fake_run(data_dir, "only_test", tiny_config(), spread=0.5)
    code, _, err = call("-c", path, "--split", "train", capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"python embed.py -c {path} --split train" in err  # the missing gallery
    code, _, err = call("-c", path, "--split", "validation", capsys=capsys)
    assert code == 2 and "unknown set" in err and len(err.strip().splitlines()) == 1
    code, _, err = call("-c", path, "--compare", path, "--baseline", capsys=capsys)
    assert code == 2 and "give one of them" in err
    code, _, err = call("-c", path, "--map-points", "1", capsys=capsys)
    assert code == 2 and "--map-points 1" in err
    code, _, err = call("-c", path, "--dbscan-quantile", "0", capsys=capsys)
    assert code == 2 and "--dbscan-quantile 0" in err
    code, _, err = call("-c", path, "--compare", data_dir / "nothing.json", capsys=capsys)
    assert code == 2 and "nothing.json" in err

    # Another data set: five of the six classes.
    other_root = data_dir / "datasets" / "five"
    shutil.copytree(data_dir / "datasets" / "shapes", other_root)
    shutil.rmtree(sorted(p for p in other_root.iterdir() if p.is_dir())[0])
    other = fake_run(data_dir, "five", tiny_config(data__root="datasets/five"), spread=0.5)
    code, _, err = call("-c", path, "--compare", other, capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds other images" in err and "same data set" in err
    assert not (data_dir / "trainings" / "only_test" / "analysis" / "test-vs-five").exists()


# --- end to end on a trained run ----------------------------------------------------------------


@pytest.mark.slow
def test_trained_demo_run_with_baseline_and_compare(data_dir, capsys):
    from retrieval.embedder import embed_images, load_embedder
    from retrieval.metrics import evaluate_leave_one_out
    from training.trainer import train

    path = write_config(data_dir, "tiny", tiny_config(train__steps=20, train__validate_every=10))
    cfg = config.load(path)
    train(cfg)
    embedder = load_embedder(cfg)
    gallery_file = embed_images(
        embedder, sets.images(cfg, "test"), RunFolder.of(cfg).gallery("test"), split="test"
    )
    gallery = read_gallery(gallery_file)
    embeddings_folder = gallery_file.parent
    before = sorted(p.name for p in embeddings_folder.iterdir())

    code, out, err = call("-c", path, "--baseline", "--json", capsys=capsys)
    assert code == 0, err
    result = json.loads(out)
    trained, untrained = result["models"]
    assert untrained["kind"] == "baseline" and untrained["model_step"] == 0
    assert "random init, seed 0" in untrained["title"]
    # The report's Recall@1 is the metrics module's, on the same leave-one-out queries.
    reference = evaluate_leave_one_out(
        gallery.embeddings, gallery.labels, normalized=True, nmi=False
    )
    assert trained["retrieval"]["recall@1"] == pytest.approx(reference.recall_at_k[1])
    assert trained["model_step"] == gallery.model_step and trained["files"]["curves"]
    folder = data_dir / "trainings" / "tiny" / "analysis" / "test-vs-baseline"
    assert (folder / "baseline.h5").is_file() and (folder / "baseline-t-sne.png").is_file()
    # The baseline column is another model's embeddings of the same images, scored the same way
    # (not "its Recall@1 differs": on 12 queries two models can tie).
    baseline = read_gallery(folder / "baseline.h5")
    assert list(baseline.paths) == list(gallery.paths)
    assert np.abs(baseline.embeddings - gallery.embeddings).max() > 1e-3
    reference = evaluate_leave_one_out(
        baseline.embeddings, baseline.labels, normalized=True, nmi=False
    )
    assert untrained["retrieval"]["recall@1"] == pytest.approx(reference.recall_at_k[1])
    assert sorted(p.name for p in embeddings_folder.iterdir()) == before  # no run gallery added
    assert "images/s" in err and "parts/s" in err  # progress on stderr

    # The baseline's embeddings are kept and reused: the same numbers, no model built again.
    code, out, err = call("-c", path, "--baseline", "--json", "--thumbnails", "0", capsys=capsys)
    assert code == 0, err
    assert json.loads(out)["models"][1]["clustering"] == untrained["clustering"]
    assert "images/s" not in err

    # --compare with a copy of the run under another name: the same images, equal numbers.
    copy = write_config(
        data_dir, "tiny_copy", tiny_config(train__steps=20, train__validate_every=10)
    )
    shutil.copytree(data_dir / "trainings" / "tiny", data_dir / "trainings" / "tiny_copy")
    code, out, err = call(
        "-c", path, "--compare", copy, "--json", "--thumbnails", "0", capsys=capsys
    )
    assert code == 0, err
    first, second = json.loads(out)["models"]
    assert second["name"] == "tiny_copy"
    assert first["clustering"] == second["clustering"]
    assert first["retrieval"] == second["retrieval"]


def test_class_colours_are_distinct_and_the_thumbnail_map_has_a_legend():
    from PIL import ImageColor

    from report import figures

    rgb = np.array([ImageColor.getrgb(c) for c in figures.PALETTE], float)
    gaps = np.linalg.norm(rgb[:, None] - rgb[None], axis=2)[np.triu_indices(len(rgb), 1)]
    assert len(set(figures.PALETTE)) == 20 and gaps.min() > 40  # no two near-identical colours
    coords = np.random.default_rng(0).normal(size=(30, 2))
    labels = np.arange(30) % 25  # 25 classes: 20 listed, the rest counted
    images = [np.zeros((8, 8, 3), np.uint8)] * 30
    plain = figures.thumbnail_map(coords, images, labels, side=400)
    legend = figures.thumbnail_map(
        coords, images, labels, side=400, classes=[f"c{i}" for i in range(25)]
    )
    assert plain.size == (400, 400) and legend.size[1] > 400
    assert figures._legend_labels(np.array([3, 1, 1, 2, 2, 2]), 2) == [2, 1]
