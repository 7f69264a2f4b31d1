"""Near-duplicate groups (retrieval/duplicates.py) against a brute-force comparison of every
pair, and ``analysis.py --duplicates`` on a trained run."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import config
from retrieval.duplicates import duplicate_groups, duplicate_pairs, groups_of_pairs
from retrieval.gallery import read_gallery
from retrieval.search import ExactIndex, similarity, unit_rows
from runs.folder import RunFolder
from tfcbir.cli import run

REPO = Path(__file__).resolve().parents[1]


def brute_force(embeddings: np.ndarray, threshold: float, normalized: bool):
    """Every pair (i < j) scoring >= threshold, and the components by a plain union-find."""
    scores = similarity(embeddings, embeddings, normalized=normalized)
    close = np.maximum(scores, scores.T) >= threshold
    np.fill_diagonal(close, False)
    pairs = np.argwhere(np.triu(close))
    parent = list(range(len(embeddings)))

    def root(item):
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    for i, j in pairs:
        parent[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for item in range(len(embeddings)):
        members.setdefault(root(item), []).append(item)
    groups = [group for group in members.values() if len(group) > 1]
    groups.sort(key=lambda group: (-len(group), group[0]))
    return pairs, groups


def planted(seed=0, n_random=300, dim=64, big=30):
    """Random unit vectors (far apart: cosine below about 0.6) with planted near-duplicates:
    groups of 2 to 5 copies plus 0.01 noise (cosine about 0.997), bitwise-equal copies, a chain
    of 5 items 20 degrees apart (neighbours 0.94, two steps 0.77) and one group of ``big``
    copies. Rows shuffled."""
    rng = np.random.default_rng(seed)
    rows = [rng.normal(size=(n_random, dim))]
    for size in (2, 3, 4, 5, 2, 3):
        base = rng.normal(size=dim)
        rows.append(base + 0.01 * np.linalg.norm(base) * rng.normal(size=(size, dim)) / 8)
    exact = rng.normal(size=dim)
    rows.append(np.stack([exact, exact, exact]))
    plane = np.linalg.qr(rng.normal(size=(dim, 2)))[0].T  # two orthonormal directions
    angles = np.radians(20 * np.arange(5))
    rows.append(np.cos(angles)[:, None] * plane[0] + np.sin(angles)[:, None] * plane[1])
    base = rng.normal(size=dim)
    rows.append(base + 0.01 * np.linalg.norm(base) * rng.normal(size=(big, dim)) / 8)
    embeddings = unit_rows(np.concatenate(rows))
    return embeddings[rng.permutation(len(embeddings))]


THRESHOLDS = {True: 0.9, False: -0.5}  # cosine; negative distance (unit rows: 0.5 ~ cos 0.875)


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("k", [1, 4, 10])
def test_groups_equal_a_brute_force_reference(normalized, k):
    embeddings = planted()
    threshold = THRESHOLDS[normalized]
    pairs, groups = brute_force(embeddings, threshold, normalized)
    index = ExactIndex(embeddings, normalized)
    found, scores, capped = duplicate_pairs(index, embeddings, threshold, k=k)
    assert capped == 0
    np.testing.assert_array_equal(found, pairs)
    assert (scores >= threshold).all()
    got = duplicate_groups(index, embeddings, threshold, k=k)
    assert [group.tolist() for group in got] == groups
    sizes = [len(group) for group in got]
    # 6 noisy groups, the equal copies, the chain and the big group: nothing else.
    assert sorted(sizes, reverse=True) == sizes == [30, 5, 5, 4, 3, 3, 3, 2, 2]


def test_a_chain_is_one_group():
    angles = np.radians(20 * np.arange(4))
    chain = np.stack([np.cos(angles), np.sin(angles), np.zeros(4)], axis=1).astype(np.float32)
    far = np.array([[0, 0, 1]], dtype=np.float32)
    embeddings = np.concatenate([chain, far])
    index = ExactIndex(embeddings, True)
    pairs, _, _ = duplicate_pairs(index, embeddings, 0.9, k=1)
    assert pairs.tolist() == [[0, 1], [1, 2], [2, 3]]  # 0 and 2 score cos 40 = 0.77: no pair
    assert [g.tolist() for g in duplicate_groups(index, embeddings, 0.9, k=1)] == [[0, 1, 2, 3]]


def test_k_grows_past_a_group_larger_than_k_up_to_the_cap(caplog):
    embeddings = planted(big=30)
    pairs, _ = brute_force(embeddings, 0.9, True)
    index = ExactIndex(embeddings, True)
    found, _, capped = duplicate_pairs(index, embeddings, 0.9, k=2)
    assert capped == 0 and len(found) == len(pairs) and len(found) >= 30 * 29 // 2
    # Capped at 8 neighbours: each of the 30 copies keeps its 8 best pairs, and says so.
    found, _, capped = duplicate_pairs(index, embeddings, 0.9, k=2, max_k=8)
    assert capped == 30 and len(found) < len(pairs)
    assert set(map(tuple, found.tolist())) <= set(map(tuple, pairs.tolist()))
    with caplog.at_level("WARNING", logger="tfcbir"):
        groups = duplicate_groups(index, embeddings, 0.9, k=2, max_k=8)
    assert "30 items have more than 8 neighbours" in caplog.text
    assert len(groups[0]) == 30  # still one group: the copies link through each other


def test_a_flat_faiss_index_finds_the_same_groups():
    pytest.importorskip("faiss")
    from retrieval.faiss_index import FaissIndex

    embeddings = planted()
    _, groups = brute_force(embeddings, 0.9, True)
    index = FaissIndex.build(embeddings, normalized=True, factory="Flat")
    assert [g.tolist() for g in duplicate_groups(index, embeddings, 0.9, k=4)] == groups


def test_no_pair_and_tiny_galleries():
    embeddings = unit_rows(np.eye(4, dtype=np.float32))
    index = ExactIndex(embeddings, True)
    assert duplicate_groups(index, embeddings, 0.5) == []
    one = embeddings[:1]
    assert duplicate_groups(ExactIndex(one, True), one, 0.5) == []
    assert groups_of_pairs(np.zeros((0, 2), np.int64), 3) == []


# --- analysis.py --duplicates --------------------------------------------------------------------


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


@pytest.fixture
def own_run(searchable_run, tmp_path, monkeypatch):
    """A copy of the searchable run (this test writes into its folder): (config path, config)."""
    path, root = searchable_run
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    monkeypatch.setenv("TFCBIR_DATA_DIR", str(copy))
    copied = copy / path.relative_to(root)
    return copied, config.load(copied)


def test_cli_writes_the_groups_csv_and_picture(own_run, capsys):
    path, cfg = own_run
    folder = RunFolder.of(cfg)
    gallery = read_gallery(folder.gallery("test"))
    index = ExactIndex(gallery.embeddings, gallery.normalized)
    nearest, _ = index.search(gallery.embeddings, 1, exclude=np.arange(len(gallery)))
    threshold = f"{float(np.quantile(nearest[:, 0], 0.5)):.6f}"
    code, out, _ = call("-c", path, "--duplicates", "--threshold", threshold, capsys=capsys)
    assert code == 0
    expected = duplicate_groups(index, gallery.embeddings, float(threshold))
    assert expected, "the median nearest-neighbour score makes some groups"
    assert f"{len(expected):,} groups of near-duplicates" in out
    with open(folder.analyses / "duplicates-test.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == [gallery.paths[i] for g in expected for i in g]
    assert [int(row["group"]) for row in rows] == [n for n, g in enumerate(expected, 1) for _ in g]
    assert [int(row["size"]) for row in rows] == [len(g) for g in expected for _ in g]
    assert [row["class"] for row in rows] == [
        gallery.classes[gallery.labels[i]] for g in expected for i in g
    ]
    first = [row for row in rows if row["group"] == "1"]
    assert float(first[0]["score"]) == pytest.approx(1.0, abs=1e-5)
    assert all(float(row["score"]) <= 1.0 + 1e-5 for row in first)
    picture = folder.analyses / "duplicates-test.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, out, _ = call("-c", path, "--duplicates", "--threshold", "1", "--json", capsys=capsys)
    result = json.loads(out)
    assert code == 0 and result["groups"] == 0 and result["picture"] is None
    assert not picture.exists()  # the earlier threshold's picture is gone with its groups
    with open(folder.analyses / "duplicates-test.csv", encoding="utf-8") as handle:
        assert handle.read().splitlines() == ["group,size,path,class,score"]


def test_cli_threshold_from_the_saved_verification_and_bad_thresholds(own_run, capsys):
    path, cfg = own_run
    folder = RunFolder.of(cfg)
    code, _, err = call("-c", path, "--duplicates", capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--threshold" in err and f"python evaluation.py -c {path} --verification" in err
    for bad, says in [("nan", "finite"), ("abc", "finite"), ("1.5", "[-1, 1]")]:
        code, _, err = call("-c", path, "--duplicates", "--threshold", bad, capsys=capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and says in err
    code, _, err = call("-c", path, "--threshold", "0.5", capsys=capsys)
    assert code == 2 and "--threshold goes with --duplicates" in err

    gallery = read_gallery(folder.gallery("test"))
    folder.evaluation.mkdir(parents=True, exist_ok=True)
    saved = folder.evaluation / "verification.json"
    saved.write_text(json.dumps({"model_id": gallery.model_id, "threshold": 1.0}))
    code, out, _ = call("-c", path, "--duplicates", capsys=capsys)
    assert code == 0 and "threshold 1.0000" in out and "no pair of images" in out
    saved.write_text(json.dumps({"model_id": "other weights", "threshold": 0.5}))
    code, _, err = call("-c", path, "--duplicates", capsys=capsys)
    assert code == 2 and "other weights" in err and len(err.strip().splitlines()) == 1


def test_threshold_is_checked_against_the_score_range():
    from report.duplicates import check_threshold
    from tfcbir import UserError

    assert check_threshold("0.9", True) == 0.9 and check_threshold("-0.5", False) == -0.5
    for text, normalized in [("0.1", False), ("-1.5", True), ("inf", False), ("", True)]:
        with pytest.raises(UserError, match="--threshold"):
            check_threshold(text, normalized)
