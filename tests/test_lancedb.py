"""The LanceDB backend (index.backend: lancedb): tables and records (retrieval.lance_store), the
engine's search and pushed-down filters against the exact ones, and a run embedded, updated,
sharded, evaluated, searched and served over it as over HDF5 (retrieval.lance_gallery, embed.py).
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.filters import Columns, filtered_topk, parse_filter
from retrieval.gallery import FileStats, GalleryIdentity, read_gallery, write_gallery
from retrieval.lance_store import (
    LanceStore,
    LazyVectors,
    Metadata,
    Rows,
    connect,
    engine_index,
    gallery_record,
    parse_parameters,
)
from retrieval.search import ExactIndex
from tests.conftest import tiny_config, write_config
from tfcbir import UserError

IDENTITY = GalleryIdentity("model-a", "config-a", "items-a", 7)


def make_gallery(folder: Path, n: int = 60, dim: int = 8, *, normalized=True, seed=0, name="g"):
    """An HDF5 gallery of random vectors in 4 classes, read back."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    if normalized:
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[5] = vectors[3]  # a tie: equal vectors
    paths = [f"c{i % 4}/{i:03d}.png" for i in range(n)]
    files = FileStats(np.arange(n, dtype=np.int64) + 100, np.arange(n, dtype=np.int64) * 10)
    out = write_gallery(
        folder / f"{name}.h5",
        vectors,
        np.arange(n) % 4,
        paths,
        ["c0", "c1", "c2", "c3"],
        normalized=normalized,
        identity=IDENTITY,
        data_root=str(folder),
        split="test",
        files=files,
    )
    return read_gallery(out)


def metadata_for(n: int, seed: int = 0) -> Metadata:
    """Columns of every kind, with missing values, and text that needs quoting."""
    rng = np.random.default_rng(seed)
    price = rng.choice([5.0, 50.0, 150.0, np.nan], n)
    colour = rng.choice(np.array(["red", "blue", "o'brien", None], dtype=object), n)
    stock = rng.choice(np.array([True, False, None], dtype=object), n)
    added = rng.choice(np.array(["2024-01-05", "2025-06-01", "NaT"], dtype="datetime64[D]"), n)
    return Metadata({"price": price, "colour": colour, "in stock": stock, "added": added}, "h")


def published(tmp_path: Path, gallery, metadata=None, index=("exact", {})) -> LanceStore:
    store = LanceStore(connect(str(tmp_path / "db")), str(tmp_path / "db"), "run-test")
    record = gallery_record(gallery, metadata=metadata, index=index)
    store.publish(gallery, record, Rows.of_gallery(gallery, metadata), index)
    return store


def test_a_published_gallery_reads_back_equal(tmp_path):
    gallery = make_gallery(tmp_path)
    store = published(tmp_path, gallery)
    found = store.read(expect=IDENTITY, advice="re-embed", missing="embed")
    assert found.paths == gallery.paths and found.classes == gallery.classes
    np.testing.assert_array_equal(found.labels, gallery.labels)
    assert isinstance(found.embeddings, LazyVectors)
    np.testing.assert_array_equal(found.embeddings[[7, 2]], gallery.embeddings[[7, 2]])  # fetched
    np.testing.assert_array_equal(found.embeddings[4], gallery.embeddings[4])
    np.testing.assert_array_equal(np.asarray(found.embeddings), gallery.embeddings)  # all
    assert found.identity == gallery.identity and found.dim == gallery.dim
    np.testing.assert_array_equal(found.files.sizes, gallery.files.sizes)
    np.testing.assert_array_equal(found.files.mtimes, gallery.files.mtimes)
    # in the order of a list given (the image list now), whatever the items' order was
    order = list(reversed(gallery.paths))
    again = store.read(order=order, advice="re-embed", missing="embed")
    assert again.paths == order
    np.testing.assert_array_equal(np.asarray(again.embeddings), gallery.embeddings[::-1])


def test_a_reader_sees_the_recorded_version_not_a_write_in_progress(tmp_path):
    gallery = make_gallery(tmp_path)
    store = published(tmp_path, gallery)
    store.table().delete("path = 'c1/001.png'")  # a write whose record is not written yet
    found = store.read(advice="re-embed", missing="embed")
    assert len(found) == len(gallery) and "c1/001.png" in found.paths
    assert len(np.asarray(found.embeddings)) == len(gallery)


def test_refusals_are_one_line(tmp_path):
    gallery = make_gallery(tmp_path)
    empty = LanceStore(connect(str(tmp_path / "db")), str(tmp_path / "db"), "run-test")
    with pytest.raises(UserError, match=r"#run-test: no gallery there; embed it now$"):
        empty.read(advice="x", missing="embed it now")
    store = published(tmp_path, gallery)
    other = GalleryIdentity("model-b", "config-a", "items-a", 7)
    with pytest.raises(UserError) as error:
        store.read(expect=other, advice="re-embed it: python embed.py -c c.json", missing="")
    assert "\n" not in str(error.value) and "re-embed it" in str(error.value)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"^index\.uri .*a-file/db: cannot open the LanceDB"):
        connect(str(blocker / "db"))
    with pytest.raises(UserError) as error:
        connect("s3://tfcbir-no-such-bucket-for-tests/galleries")
    message = str(error.value)
    assert message.startswith("index.uri s3://tfcbir-no-such-bucket-for-tests/galleries: cannot")
    assert "\n" not in message and ".rs:" not in message
    with pytest.raises(UserError, match=r"index.build_parameters: 'nlist=4' is not one of"):
        parse_parameters("nlist=4", ("num_partitions",), "index.build_parameters")
    with pytest.raises(UserError, match=r"nprobes must be an integer; got 'many'"):
        parse_parameters("nprobes=many", ("nprobes",), "index.search_parameters")


@pytest.mark.parametrize("normalized", [True, False])
def test_the_engines_exact_search_equals_ours(tmp_path, normalized):
    gallery = make_gallery(tmp_path, normalized=normalized)
    store = published(tmp_path, gallery)
    index = engine_index(store.read(advice="", missing=""), {})
    exact = ExactIndex(gallery.embeddings, normalized)
    queries = np.random.default_rng(1).normal(size=(9, gallery.dim)).astype(np.float32)
    queries[0] = gallery.embeddings[3]  # its tie (rows 3 and 5) goes to the lower position
    if normalized:
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exclude = np.array([[3], [-1], [10], [-1], [0], [1], [2], [-1], [59]])
    for k, left_out in [(5, None), (5, exclude), (70, None)]:
        scores, indices = index.search(queries, k, left_out)
        want_scores, want = exact.search(queries, k, left_out)
        np.testing.assert_array_equal(indices, want)
        np.testing.assert_allclose(scores, want_scores, atol=2e-5)
    assert index.search(queries[:1], 5)[1][0, :2].tolist() == [3, 5]


EXPRESSIONS = [
    "price < 100",
    "not (price < 100)",
    "price != 50",
    "colour == 'o\\'brien' or colour in ['red']",
    "colour not in ['red', 'blue']",
    "colour in []",
    "colour not in []",
    "`in stock` == true and added >= '2025-01-01'",
    "not (`in stock` == false) and (price >= 50 or class == 'c2')",
    "added < '2025-01-01' or price > 10",
    "class in ['c0', 'c3'] and not colour == 'blue'",
]


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_a_pushed_filter_keeps_what_the_mask_keeps(tmp_path, expression):
    """The SQL the engine runs gives the answers of the exact filtered search, missing values
    (SQL NULL) included."""
    gallery = make_gallery(tmp_path, n=80)
    metadata = metadata_for(80)
    store = published(tmp_path, gallery, metadata)
    index = engine_index(store.read(advice="", missing=""), {})
    columns = dict(metadata.columns)
    columns["class"] = np.array(gallery.classes, dtype=object)[gallery.labels]
    expression_ = parse_filter(expression)
    mask = expression_.mask(Columns(columns))
    queries = gallery.embeddings[[0, 11, 42]]
    exclude = np.array([[0], [11], [42]])
    want_scores, want = filtered_topk(
        ExactIndex(gallery.embeddings, True), queries, 6, mask, exclude
    )
    scores, found = index.search_where(queries, 6, index.pushed_filter(expression_), exclude)
    np.testing.assert_array_equal(found, want)
    np.testing.assert_allclose(scores, want_scores, atol=2e-5)


def test_a_bad_filter_is_refused_as_over_the_metadata(tmp_path):
    gallery = make_gallery(tmp_path)
    store = published(tmp_path, gallery, metadata_for(len(gallery)))
    index = engine_index(store.read(advice="", missing=""), {})
    with pytest.raises(UserError, match=r"^--where: no column 'prise'; did you mean 'price'\?"):
        index.pushed_filter(parse_filter("prise < 3"))
    with pytest.raises(UserError, match=r"price is a number column; compare it with a number"):
        index.pushed_filter(parse_filter("price == 'cheap'"))
    with pytest.raises(UserError, match=r"'2025-13-01' is not a date"):
        index.pushed_filter(parse_filter("added > '2025-13-01'"))


def test_an_ivf_pq_index_finds_most_of_the_exact_answers(tmp_path):
    gallery = make_gallery(tmp_path, n=2000, dim=16)
    spec = ("IVF_PQ", {"num_partitions": 8, "num_sub_vectors": 4})
    store = published(tmp_path, gallery, index=spec)
    assert any(i.columns == ["vector"] for i in store.table().list_indices())
    found = store.read(advice="", missing="")
    queries = gallery.embeddings[:50]
    exact = ExactIndex(gallery.embeddings, True).search(queries, 10)[1]
    for parameters, floor in [({"nprobes": 8, "refine_factor": 5}, 0.95), ({"nprobes": 2}, 0.3)]:
        approximate = engine_index(found, parameters).search(queries, 10)[1]
        recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact)])
        assert recall >= floor
    bad = ("IVF_PQ", {"num_partitions": 8, "num_sub_vectors": 5})  # 5 does not divide 16
    with pytest.raises(UserError, match=r"^cannot build the LanceDB index IVF_PQ .* on 2000 rows"):
        published(tmp_path, gallery, index=bad)


def _upsert_part(uri: str, folder: str, part: int) -> None:
    """A worker: upsert its half of a gallery's rows into the shared table."""
    gallery = read_gallery(Path(folder) / "g.h5")
    rows = Rows.of_gallery(gallery, None).subset(np.arange(part, len(gallery), 2))
    LanceStore(connect(uri), uri, "run-test").upsert(rows)


def test_workers_write_their_parts_into_one_table_at_once(tmp_path):
    gallery = make_gallery(tmp_path, n=400)
    uri = str(tmp_path / "db")
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_upsert_part, args=(uri, str(tmp_path), part)) for part in (0, 1)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    table = LanceStore(connect(uri), uri, "run-test").table()
    paths = table.search().select(["path"]).limit(None).to_arrow()["path"].to_pylist()
    assert sorted(paths) == sorted(gallery.paths)


# --- a run over LanceDB ------------------------------------------------------------------------


def draw(path: Path, colour: int, size: int = 32) -> None:
    Image.new("RGB", (size, size), (colour, 255 - colour, colour // 2)).save(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_demo):
    """A data_dir with the tiny demo set (and a metadata.csv), a briefly trained run and a twin
    of it (same weights) whose galleries live in LanceDB; neither embedded yet."""
    import config
    from training.trainer import train

    root = tmp_path_factory.mktemp("lance") / "data"
    shapes = root / "datasets" / "shapes"
    shutil.copytree(tiny_demo, shapes)
    rows = ["path,price,colour"]
    for i, file in enumerate(sorted(shapes.glob("*/*.png"))):
        price = "" if i % 7 == 0 else str(10 * (i % 13))
        rows.append(f"{file.parent.name}/{file.name},{price},{['red', 'blue'][i % 2]}")
    (shapes / "metadata.csv").write_text("\n".join(rows) + "\n")
    raw = tiny_config(train__steps=10, train__validate_every=5)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFCBIR_DATA_DIR", str(root))
        train(config.load(write_config(root, "files", raw)))
    twin = root / "trainings" / "lance"
    shutil.copytree(root / "trainings" / "files", twin)
    saved = json.loads((twin / "config.json").read_text())
    saved["name"], saved["index"]["backend"] = "lance", "lancedb"
    (twin / "config.json").write_text(json.dumps(saved))
    write_config(root, "lance", raw | {"index": {"backend": "lancedb"}})
    return root


@pytest.fixture
def data(runs, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    shutil.copytree(runs, root)
    monkeypatch.setenv("TFCBIR_DATA_DIR", str(root))
    return root


def evaluated(root: Path, name: str) -> dict:
    import config
    from retrieval.evaluate import evaluate_run

    result = evaluate_run(config.load(root / f"{name}.json"), queries=0, r=5)
    return {k: v for k, v in result.items() if isinstance(v, float) and k != "NMI"} | {
        "size": result["gallery_size"]
    }


def searched(root: Path, name: str, where: str | None = None) -> list:
    import config
    from retrieval.searcher import Searcher

    searcher = Searcher.open(config.load(root / f"{name}.json"))
    shapes = root / "datasets" / "shapes"
    queries = [shapes / "star" / "003.png", shapes / "circle" / "001.png"]
    return [
        [(a.path, round(a.score, 5)) for a in result.answers]
        for result in searcher.search_files(queries, 6, where=where)
    ]


def test_a_lancedb_run_embeds_evaluates_and_searches_as_an_hdf5_run(data, capsys):
    from embed import main as embed

    assert embed(["-c", str(data / "files.json")]) == 0
    assert embed(["-c", str(data / "lance.json")]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[-1].endswith("lancedb#lance-test")
    assert "rows -> " in out.err and "no ANN index (exact search)" in out.err
    assert not list((data / "trainings" / "lance" / "embeddings").glob("*.h5"))  # staging gone
    assert evaluated(data, "lance") == pytest.approx(evaluated(data, "files"), abs=1e-6)
    for where in (None, "price < 60 and colour == 'red'", "not (price < 60)"):
        assert searched(data, "lance", where) == searched(data, "files", where)
    assert embed(["-c", str(data / "lance.json")]) == 0
    assert "is up to date: nothing to embed" in capsys.readouterr().err
    # another index asked for: built on the table as it is, nothing embedded
    argv = ["-c", str(data / "lance.json"), "--index", "IVF_FLAT", "--split", "train"]
    assert embed(argv) == 0
    err = capsys.readouterr().err
    assert (
        "nothing to embed" in err and "IVF_FLAT index (num_partitions=8), in place of exact" in err
    )


def test_an_update_equals_a_full_embedding(data, capsys):
    from embed import main as embed

    assert embed(["-c", str(data / "lance.json")]) == 0
    shapes = data / "datasets" / "shapes"
    (shapes / "star" / "004.png").unlink()
    draw(shapes / "circle" / "100.png", 30)
    capsys.readouterr()
    assert embed(["-c", str(data / "lance.json"), "--update"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("updated ")]
    assert len(lines) == 2, lines
    # (the split by images is drawn again: images move between the sets, one more, one fewer)
    counts = [line.rsplit(": ", 1)[1].split(", ") for line in lines]
    added = sum(int(c[0].split()[0]) for c in counts)
    removed = sum(int(c[2].split()[0]) for c in counts)
    assert added == removed >= 1, lines
    updated = evaluated(data, "lance")
    assert embed(["-c", str(data / "files.json")]) == 0  # the twin, from scratch
    assert updated == pytest.approx(evaluated(data, "files"), abs=1e-6)
    assert searched(data, "lance", "price >= 0") == searched(data, "files", "price >= 0")


def test_a_changed_metadata_file_is_taken_by_an_update(data, capsys):
    from embed import main as embed

    assert embed(["-c", str(data / "lance.json")]) == 0
    metadata = data / "datasets" / "shapes" / "metadata.csv"
    metadata.write_text(metadata.read_text().replace(",red", ",green"))
    assert embed(["-c", str(data / "lance.json"), "--update"]) == 0
    assert embed(["-c", str(data / "files.json")]) == 0
    found = searched(data, "lance", "colour == 'green'")
    assert found == searched(data, "files", "colour == 'green'") and found[0]


def test_shards_written_by_workers_make_the_gallery_with_no_merge(data, capsys):
    from embed import main as embed
    from tfcbir.cli import run

    path = str(data / "lance.json")
    assert embed(["-c", path, "--split", "train", "--shard", "1/3"]) == 0
    assert "1 of 3 parts written" in capsys.readouterr().err
    assert embed(["-c", path, "--split", "train", "--shard", "0/3"]) == 0
    assert embed(["-c", path, "--split", "train", "--shard", "0/3"]) == 0  # again: kept
    assert "part 0/3 is in the table already" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(embed, ["-c", path, "--split", "train", "--merge"])
    assert "there is nothing to merge" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"lance-train: no gallery there; embed it: python embed"):
        evaluated(data, "lance")  # not finished: no reader sees a part
    assert embed(["-c", path, "--split", "train", "--shard", "2/3"]) == 0
    assert "all 3 parts in: 72 rows" in capsys.readouterr().err
    assert embed(["-c", path, "--split", "test"]) == 0
    assert embed(["-c", str(data / "files.json")]) == 0
    assert evaluated(data, "lance") == pytest.approx(evaluated(data, "files"), abs=1e-6)


def test_a_lancedb_gallery_is_served_and_reloaded_after_an_update(data):
    from fastapi.testclient import TestClient

    import config
    from embed import main as embed
    from retrieval.searcher import Searcher
    from serving.app import create_app

    path = data / "lance.json"
    assert embed(["-c", str(path)]) == 0
    searcher = Searcher.open(config.load(path))
    client = TestClient(create_app(searcher))
    png = (data / "datasets" / "shapes" / "star" / "003.png").read_bytes()
    upload = {"image": ("q.png", png, "image/png")}
    response = client.post(
        "/api/search", params={"k": 5, "where": "colour == 'blue'"}, files=upload
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 5
    bad = client.post("/api/search", params={"where": "prise < 3"}, files=upload)
    assert bad.status_code == 400 and "no column 'prise'" in bad.text
    stamp = searcher.table_stamp()  # what a live service watches
    draw(data / "datasets" / "shapes" / "circle" / "100.png", 30)
    assert embed(["-c", str(path), "--update"]) == 0
    assert searcher.table_stamp() != stamp and stamp is not None
    assert client.post("/api/reload").status_code == 200
    assert client.get("/api/info").json()["gallery_size"] == len(searcher) + 1
