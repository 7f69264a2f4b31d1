"""serving.live: a gallery rewritten while the service runs is served without a restart (checked
between requests, or on POST /api/reload); one that cannot be opened leaves the old one served."""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import config
from retrieval.searcher import Searcher

fastapi = pytest.importorskip("fastapi", reason="pip install -r requirements-serve.txt")
from fastapi.testclient import TestClient  # noqa: E402

from serving.app import create_app  # noqa: E402


@pytest.fixture
def own_config(searchable_run, tmp_path, monkeypatch) -> Path:
    """A copy of the searchable run (its gallery is rewritten here): its config's path."""
    path, root = searchable_run
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    monkeypatch.setenv("TFCBIR_DATA_DIR", str(copy))  # also while the service reopens it
    return copy / Path(path).name


@pytest.fixture
def own_run(own_config) -> Searcher:
    """A Searcher opened on :func:`own_config`."""
    return Searcher.open(config.load(own_config), config_path=own_config)


def rewrite_gallery(path: Path, shift: int) -> str:
    """Replace the gallery file (atomically, as embed.py does) by one whose embeddings are
    rolled by ``shift`` items: a different, valid gallery of the same items. Its new id."""
    new = path.with_name("rewritten.h5")
    shutil.copy(path, new)
    gallery_id = uuid.uuid4().hex
    with h5py.File(new, "r+") as file:
        file["embeddings"][...] = np.roll(file["embeddings"][...], shift, axis=0)
        file.attrs["gallery_id"] = gallery_id
    os.replace(new, path)
    return gallery_id


def answers(document: dict) -> list[tuple[int, float]]:
    return [(r["index"], r["score"]) for r in document["results"]]


def test_a_rewritten_gallery_is_served_without_a_restart(own_run):
    old = own_run
    with TestClient(create_app(old, reload_every=0.05)) as client:
        before = answers(client.get("/api/similar/0?k=5").json())
        assert client.get("/healthz").json()["gallery_id"] == old.gallery.gallery_id
        new_id = rewrite_gallery(old.gallery.path, shift=5)
        time.sleep(0.1)
        after = client.get("/api/similar/0?k=5").json()  # the next request: the new gallery
        expected = old.reopen().search_gallery([0], 5)[0]
        assert answers(after) == [(a.index, a.score) for a in expected.answers] != before
        health = client.get("/healthz").json()
        assert health["gallery_id"] == new_id and health["gallery_size"] == 72
        assert client.get("/api/info").json()["gallery_id"] == new_id
        metrics = client.get("/metrics").text
        assert "tfcbir_gallery_reloads_total 1.0" in metrics
    # The old Searcher is untouched: a request in flight on it finishes with the old answers.
    assert [(a.index, a.score) for a in old.search_gallery([0], 5)[0].answers] == before


def test_post_reload_swaps_at_once(own_run):
    with TestClient(create_app(own_run)) as client:  # no checks between requests
        assert client.post("/api/reload").json() == {
            "reloaded": False,  # the same gallery
            "gallery_id": own_run.gallery.gallery_id,
            "gallery_size": 72,
        }
        new_id = rewrite_gallery(own_run.gallery.path, shift=3)
        assert client.get("/healthz").json()["gallery_id"] == own_run.gallery.gallery_id
        reloaded = client.post("/api/reload").json()
        assert reloaded["reloaded"] is True and reloaded["gallery_id"] == new_id
        assert client.get("/healthz").json()["gallery_id"] == new_id


def test_a_gallery_that_cannot_be_opened_leaves_the_old_one_served(own_run, caplog):
    path = own_run.gallery.path
    with TestClient(create_app(own_run, reload_every=0.05)) as client:
        before = answers(client.get("/api/similar/0?k=5").json())
        broken = path.with_name("broken.h5")
        broken.write_bytes(b"half a gallery")
        os.replace(broken, path)
        with caplog.at_level(logging.WARNING, logger="tfcbir"):
            for _ in range(3):
                time.sleep(0.06)
                answer = client.get("/api/similar/0?k=5")
                assert answer.status_code == 200 and answers(answer.json()) == before
        warnings = [r.getMessage() for r in caplog.records if "not served yet" in r.getMessage()]
        assert len(warnings) == 1, warnings  # once, not once per check
        refused = client.post("/api/reload")
        assert refused.status_code == 409
        assert refused.json()["error"].startswith("the gallery cannot be reloaded: ")
        assert client.get("/healthz").json()["gallery_id"] == own_run.gallery.gallery_id


def test_a_searcher_not_opened_from_a_run_does_not_reload(own_run):
    made = Searcher(own_run.config, own_run.embedder, own_run.gallery, own_run.index)
    assert own_run.can_reopen and not made.can_reopen
    with TestClient(create_app(made, reload_every=0.01)) as client:
        time.sleep(0.02)
        assert client.get("/healthz").status_code == 200
        refused = client.post("/api/reload")
        assert refused.status_code == 409 and "cannot reload" in refused.json()["error"]


def test_a_retrained_run_re_embedded_is_served_with_its_new_weights(own_config, own_run):
    import nets
    from embed import main as embed
    from runs.folder import RunFolder
    from tests.test_serving import gallery_file, png, upload

    cfg = own_run.config
    other = nets.build_embedding_model(
        cfg["model"], tuple(cfg["data"]["image_size"]), pretrained=False
    )
    with TestClient(create_app(own_run, reload_every=0.05)) as client:
        before = answers(client.get("/api/similar/0?k=5").json())
        other.save_weights(RunFolder.of(cfg).best_weights)  # "retrained"
        assert embed(["-c", str(own_config)]) == 0  # and re-embedded
        time.sleep(0.1)
        after = answers(client.get("/api/similar/0?k=5").json())
        query = png(np.asarray(Image.open(gallery_file(own_run, 9)).convert("RGB")))
        uploaded = answers(upload(client, query, k=5).json())
        fresh = Searcher.open(config.load(own_config), config_path=own_config)
        assert client.get("/healthz").json()["gallery_id"] == fresh.gallery.gallery_id
    assert fresh.embedder.model_id != own_run.embedder.model_id
    assert after == [(a.index, a.score) for a in fresh.search_gallery([0], 5)[0].answers] != before
    expected = fresh.search_bytes([query], 5)[0]  # the new weights embed the upload
    assert uploaded == [(a.index, a.score) for a in expected.answers]
