"""retrieval.searcher: one loaded model, gallery and index answering every kind of query alike."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import config
from datasets.images import ImageError, ImageTooLarge, load_and_fit, load_image
from retrieval.answers import AnswerCountError
from retrieval.search import ExactIndex
from retrieval.searcher import GalleryIndexError, Searcher
from tests.helpers_images import gradient, write_image, write_png_header
from tfcbir import UserError


@pytest.fixture(scope="module")
def searcher(searchable_run):
    path, root = searchable_run
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFCBIR_DATA_DIR", str(root))
        return Searcher.open(config.load(path), config_path=path)


def gallery_files(searcher, indices) -> list[Path]:
    return [Path(searcher.gallery.data_root) / searcher.gallery.paths[i] for i in indices]


def ranking(result) -> list[tuple[int, float]]:
    return [(a.index, a.score) for a in result.answers]


def test_files_bytes_and_arrays_give_the_same_answers(searcher, tmp_path):
    files = gallery_files(searcher, [0, 17, 40])
    outside = write_image(tmp_path / "outside.png", gradient((50, 40)))
    paths = [*files, outside]
    from_files = list(searcher.search_files(paths, 5))
    from_bytes = searcher.search_bytes(
        [p.read_bytes() for p in paths], 5, names=["a", "b", "c", "d"]
    )
    from_arrays = searcher.search_images([load_image(p) for p in paths], 5)
    assert [r.position for r in from_files] == [0, 1, 2, 3]
    for by_file, by_bytes, by_array in zip(from_files, from_bytes, from_arrays):
        # One decoding of the same bytes, one model, one batch: bitwise the same scores.
        assert ranking(by_file) == ranking(by_bytes) == ranking(by_array)
        assert [a.rank for a in by_file.answers] == [1, 2, 3, 4, 5]
    assert [r.query for r in from_bytes] == ["a", "b", "c", "d"]
    # A gallery image finds itself first (cosine 1); its class is known from its folder.
    for n, i in enumerate([0, 17, 40]):
        assert from_files[n].answers[0].index == i
        assert from_files[n].answers[0].score == pytest.approx(1.0, abs=1e-4)
        assert from_files[n].query_class == searcher.class_of(i)
        label = searcher.gallery.labels[i]
        assert [a.match for a in from_files[n].answers] == [
            bool(searcher.gallery.labels[a.index] == label) for a in from_files[n].answers
        ]
    # Uploads and images outside the data set have no known class: no match flags.
    assert from_files[3].query_class is None and from_bytes[0].query_class is None
    assert all(a.match is None for r in from_bytes for a in r.answers)


def test_answers_are_the_index_search_of_the_embeddings(searcher):
    files = gallery_files(searcher, [3, 30])
    found = list(searcher.search_files(files, 4))
    embedder = searcher.embedder
    pixels = np.stack([load_and_fit(p, embedder.image_size, embedder.resize) for p in files])
    exact = ExactIndex(searcher.gallery.embeddings, searcher.gallery.normalized)
    scores, indices = exact.search(embedder.embed_pixels(pixels), 4)
    for result, row_scores, row_indices in zip(found, scores, indices):
        assert [a.index for a in result.answers] == row_indices.tolist()
        assert [a.score for a in result.answers] == row_scores.tolist()
        assert [a.path for a in result.answers] == [searcher.gallery.paths[j] for j in row_indices]
        assert [a.class_name for a in result.answers] == [
            searcher.gallery.classes[searcher.gallery.labels[j]] for j in row_indices
        ]


def test_more_like_this_leaves_the_item_out_as_leave_one_out(searcher):
    gallery = searcher.gallery
    picked = [0, 5, len(gallery) - 1]
    results = searcher.search_gallery(picked, 6)
    exact = ExactIndex(gallery.embeddings, gallery.normalized)
    scores, indices = exact.search(gallery.embeddings[picked], 6, exclude=np.array(picked))
    for result, i, row_scores, row_indices in zip(results, picked, scores, indices):
        assert result.query_index == i and result.query == gallery.paths[i]
        assert i not in [a.index for a in result.answers]
        assert [a.index for a in result.answers] == row_indices.tolist()
        assert [a.score for a in result.answers] == row_scores.tolist()
        assert result.query_class == gallery.classes[gallery.labels[i]]
        assert [a.match for a in result.answers] == [
            bool(gallery.labels[j] == gallery.labels[i]) for j in row_indices
        ]
    # Every other item can be asked for, not the item itself.
    assert len(searcher.search_gallery([0], len(gallery) - 1)[0].answers) == len(gallery) - 1
    with pytest.raises(AnswerCountError, match=f"has {len(gallery) - 1} images to answer"):
        searcher.search_gallery([0], len(gallery))


def test_leave_one_out_file_queries_exclude_themselves(searcher):
    path = gallery_files(searcher, [9])[0]
    kept = next(searcher.search_files([path], 3))
    left_out = next(searcher.search_files([path], 3, exclude=[9], labels=[None]))
    assert kept.answers[0].index == 9
    assert 9 not in [a.index for a in left_out.answers]
    assert [a.index for a in left_out.answers] == [a.index for a in kept.answers[1:]] + [
        left_out.answers[-1].index
    ]
    assert left_out.query_class is None


@pytest.mark.parametrize("k", [0, -1, 73])
def test_k_out_of_range_is_refused_before_any_work(searcher, k):
    with pytest.raises(AnswerCountError) as refused:
        searcher.search_bytes([b"not even looked at"], k)
    assert refused.value.k == k and refused.value.available == 72
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("index", [-1, 72, 10**9, "3", 2.0, True])
def test_gallery_positions_outside_the_gallery_are_refused(searcher, index):
    with pytest.raises(GalleryIndexError, match="there is no gallery item .*: the gallery has 72"):
        searcher.search_gallery([index], 3)
    with pytest.raises(GalleryIndexError):
        searcher.image_file(index)


def test_bad_image_bytes_are_image_errors_naming_the_upload(searcher, tmp_path):
    bomb = write_png_header(tmp_path / "bomb.png", 60000, 60000).read_bytes()
    cases = {
        "empty.png": (b"", "no image data"),
        "notes.txt": (b"hello, not an image", "not an image file"),
        "bomb.png": (bomb, "pixels that can be decoded safely"),
    }
    for name, (data, problem) in cases.items():
        with pytest.raises(ImageError) as refused:
            searcher.search_bytes([data], 3, names=[name], max_pixels=1_000_000)
        assert refused.value.path == name and problem in refused.value.problem
        # Too large is a type of its own (the server tells the sender to shrink it).
        assert isinstance(refused.value, ImageTooLarge) == (name == "bomb.png")
    small = io.BytesIO()
    Image.fromarray(gradient((2000, 600))).save(small, "PNG")  # 1.2 M pixels: over the limit
    with pytest.raises(ImageTooLarge, match="1,000,000 pixels"):
        searcher.search_bytes([small.getvalue()], 3, names=["big.png"], max_pixels=1_000_000)
    assert searcher.search_bytes([small.getvalue()], 3)[0].answers  # under the default limit


def test_text_queries_need_a_text_tower(searcher):
    assert searcher.has_text is False
    # The one message every command gives (retrieval.embedder.no_text_tower_error).
    with pytest.raises(UserError, match=r"run \S+ searches by image only: its model has no text"):
        searcher.search_text(["a small red triangle"], 3)


class EchoTextTower:
    """A stand-in text tower: each text is 'gallery item <i>', embedded as that item's vector."""

    def __init__(self, gallery):
        self.gallery = gallery

    def embed(self, texts):
        return self.gallery.embeddings[[int(t.split()[-1]) for t in texts]]

    def unknown_words(self, text):
        return [w for w in text.split() if w not in ("gallery", "item") and not w.isdigit()]


def test_a_text_tower_plugs_in(searcher):
    with_text = Searcher(
        searcher.config,
        searcher.embedder,
        searcher.gallery,
        searcher.index,
        protocol=searcher.protocol,
        text_encoder=EchoTextTower(searcher.gallery),
    )
    assert with_text.has_text
    results = with_text.search_text(["  gallery   item 4 ", "red gallery item 60"], 3)
    assert [r.query for r in results] == ["gallery item 4", "red gallery item 60"]
    assert [r.answers[0].index for r in results] == [4, 60]
    assert all(a.match is None for r in results for a in r.answers)
    assert [r.unknown_words for r in results] == [[], ["red"]]
    assert results[1].as_json()["unknown_words"] == ["red"] and results[1].kind == "text"
    assert results[1].as_json()["query_text"] == "red gallery item 60"
    # A text whose class is known (an image's caption): its answers are marked.
    known = with_text.search_text(["gallery item 4"], 3, labels=[int(with_text.gallery.labels[4])])
    assert known[0].query_class == with_text.class_of(4) and known[0].answers[0].match is True
    with pytest.raises(UserError, match="empty text query"):
        with_text.search_text(["   "], 3)


def test_opened_without_the_image_model_it_still_searches_the_gallery(searcher, searchable_run):
    path, root = searchable_run
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFCBIR_DATA_DIR", str(root))
        cfg = config.load(path)
        gallery_only = Searcher.open(cfg, images=False)
        with pytest.raises(UserError, match="has no text tower"):
            Searcher.open(cfg, text=True)
    assert gallery_only.embedder is None and gallery_only.gallery.path == searcher.gallery.path
    assert [a.index for a in gallery_only.search_gallery([8], 4)[0].answers] == [
        a.index for a in searcher.search_gallery([8], 4)[0].answers
    ]
    assert searcher.search_gallery([8], 4)[0].kind == "gallery"
    with pytest.raises(ValueError, match="without its image model"):
        gallery_only.search_bytes([b"x"], 3)


def test_a_command_lists_the_data_set_once(searchable_run, monkeypatch):
    """Opening the protocol's galleries reads the data set's split once, not once per gallery
    and once more for the protocol."""
    from retrieval import sets
    from retrieval.evaluate import evaluate_run

    path, root = searchable_run
    monkeypatch.setenv("TFCBIR_DATA_DIR", str(root))
    cfg = config.load(path)
    listed = []
    read = sets.load_splits
    monkeypatch.setattr(sets, "load_splits", lambda *a, **k: listed.append(1) or read(*a, **k))
    opened = Searcher.open(cfg, config_path=path)
    assert len(listed) == 1 and len(opened.gallery) == 72
    listed.clear()
    result = evaluate_run(cfg, queries=0, r=3, config_path=path, nmi=False)
    assert len(listed) == 1 and result["queries"] == 24 and result["gallery_size"] == 72


@pytest.fixture
def with_metadata(searcher, tmp_path):
    """A Searcher over the same gallery whose data root holds a metadata.csv: price = the item's
    position, in_stock for even positions, and no row for the last item."""
    import dataclasses

    root = tmp_path / "root"
    root.mkdir()
    rows = ["path,price,in_stock"]
    rows += [
        f"{p},{i},{'true' if i % 2 == 0 else 'false'}"
        for i, p in enumerate(searcher.gallery.paths[:-1])
    ]
    (root / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    gallery = dataclasses.replace(searcher.gallery, data_root=str(root))
    return Searcher(
        searcher.config, searcher.embedder, gallery, searcher.index, protocol=searcher.protocol
    )


def test_a_filter_answers_the_best_of_the_matching_items(with_metadata):
    gallery = with_metadata.gallery
    everything = with_metadata.search_gallery([3], len(gallery) - 1)[0].answers
    for where, keep in [
        ("price < 30", lambda i: i < 30),
        ("in_stock == true and price >= 10", lambda i: i % 2 == 0 and i >= 10),
        ("not (price < 60)", lambda i: 60 <= i < len(gallery) - 1),  # no row: never matches
        (f"class == '{gallery.classes[0]}'", lambda i: gallery.labels[i] == 0),
    ]:
        found = with_metadata.search_gallery([3], 5, where=where)[0].answers
        expected = [a for a in everything if keep(a.index)][:5]
        assert [(a.index, a.score) for a in found] == [(a.index, a.score) for a in expected]
        assert len(found) == 5


def test_a_filter_matching_fewer_than_k_answers_those(with_metadata):
    found = with_metadata.search_gallery([3], 10, where="price <= 4")[0].answers
    assert sorted(a.index for a in found) == [0, 1, 2, 4]  # 3 is the query, left out
    assert with_metadata.search_gallery([3], 10, where="price > 1000")[0].answers == []


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("price < ", "--where: "),
        ("prise < 10", "no column 'prise'; did you mean 'price'?"),
        ("price < 'cheap'", "price is a number column"),
        ("price = 3", "use == to compare"),
    ],
)
def test_bad_filters_are_one_line(with_metadata, where, message):
    with pytest.raises(UserError) as error:
        with_metadata.search_gallery([0], 3, where=where)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_without_metadata_the_class_can_be_filtered(searcher):
    name = searcher.gallery.classes[1]
    found = searcher.search_gallery([0], 5, where=f"class == '{name}'")[0].answers
    assert found and all(a.class_name == name for a in found)
