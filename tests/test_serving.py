"""serving.app and serve.py: the API in-process (FastAPI's TestClient), a live server under
concurrent load, and the page in a real browser (headless Chromium driven by playwright)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import config
from retrieval.searcher import Searcher
from tests.helpers_images import gradient, write_image, write_png_header
from tests.test_retrieval_cli import call

fastapi = pytest.importorskip("fastapi", reason="pip install -r requirements-serve.txt")
from fastapi.testclient import TestClient  # noqa: E402

from serving.app import FORM_OVERHEAD, MB, create_app  # noqa: E402

CHROMIUM = os.environ.get("TFCBIR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def searcher(searchable_run):
    path, root = searchable_run
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFCBIR_DATA_DIR", str(root))
        return Searcher.open(config.load(path), config_path=path)


@pytest.fixture(scope="module")
def client(searcher):
    with TestClient(create_app(searcher)) as test_client:
        yield test_client


def gallery_file(searcher, i: int) -> Path:
    return Path(searcher.gallery.data_root) / searcher.gallery.paths[i]


def upload(client, data: bytes, name: str = "query.png", k: int | str = 5, **extra):
    return client.post(f"/api/search?k={k}", files={"image": (name, data, "image/png")}, **extra)


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def test_health_info_and_the_page(client, searcher):
    assert client.get("/healthz").json() == {
        "status": "ok",
        "gallery_size": 72,
        "gallery_id": searcher.gallery.gallery_id,
        "gallery": searcher.gallery.path.name,
    }
    info = client.get("/api/info").json()
    assert info["gallery_size"] == 72 and info["classes"] == 6 and info["has_text"] is False
    assert info["run"] == "search" and info["default_k"] == 10
    assert info["max_upload_bytes"] == 20 * 1024 * 1024
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js"' in page.text and "http" not in page.text.lower().replace(
        "http-equiv", ""
    )  # nothing fetched from elsewhere
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and kind in asset.headers["content-type"]


def test_search_answers_as_cbir_json_does(client, searcher, searchable_run, tmp_path, capsys):
    path, root = searchable_run
    outside = write_image(tmp_path / "outside.png", gradient((40, 48)))
    for query in (gallery_file(searcher, 11), outside):
        answer = upload(client, query.read_bytes(), query.name, k=7)
        assert answer.status_code == 200, answer.text
        document = answer.json()
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TFCBIR_DATA_DIR", str(root))
            code, out, err = call("cbir", "-c", path, "-r", "7", "--json", query, capsys=capsys)
        assert code == 0, err
        expected = json.loads(out)["results"][0]["answers"]
        served = document["results"]
        # The same ranking with bitwise the same scores (one image, the same decoding and model).
        assert [(r["rank"], r["path"], r["class"], r["score"]) for r in served] == [
            (a["rank"], a["path"], a["class_name"], a["score"]) for a in expected
        ]
        assert [r["index"] for r in served] == [a["index"] for a in expected]
        assert document["query"] == query.name and document["kind"] == "image"
        assert document["query_class"] is None and all(r["match"] is None for r in served)
    assert served[0]["index"] != 11  # the outside image is not a gallery item


def test_more_like_this_by_gallery_index(client, searcher):
    gallery = searcher.gallery
    document = client.get("/api/similar/11?k=5").json()
    assert document["query_index"] == 11 and document["query"] == gallery.paths[11]
    assert document["query_class"] == gallery.classes[gallery.labels[11]]
    indices = [r["index"] for r in document["results"]]
    assert len(indices) == 5 and 11 not in indices
    assert [r["match"] for r in document["results"]] == [
        bool(gallery.labels[i] == gallery.labels[11]) for i in indices
    ]
    expected = searcher.search_gallery([11], 5)[0]
    assert [(r["index"], r["score"]) for r in document["results"]] == [
        (a.index, a.score) for a in expected.answers
    ]
    assert len(client.get("/api/similar/0?k=71").json()["results"]) == 71


def test_gallery_images_and_thumbnails_by_index_only(client, searcher):
    original = client.get("/api/gallery/3")
    assert original.status_code == 200
    assert original.content == gallery_file(searcher, 3).read_bytes()
    small = client.get("/api/gallery/3?size=20")
    assert small.status_code == 200 and small.headers["content-type"] == "image/jpeg"
    thumbnail = Image.open(io.BytesIO(small.content))
    assert max(thumbnail.size) == 20 and thumbnail.format == "JPEG"
    assert client.get("/api/gallery/3?size=20").content == small.content  # cached, stable
    # Cached by the browser while the gallery is the same one (revalidated: 304).
    tag = small.headers["etag"]
    assert searcher.gallery.gallery_id in tag and small.headers["cache-control"] == "no-cache"
    again = client.get("/api/gallery/3?size=20", headers={"If-None-Match": tag})
    assert again.status_code == 304 and again.content == b""
    assert client.get("/api/gallery/4?size=20", headers={"If-None-Match": tag}).status_code == 200
    for url, fragment in (
        ("/api/gallery/72", "there is no gallery item 72: the gallery has 72 items, 0 to 71"),
        ("/api/gallery/-1", "there is no gallery item -1"),
        ("/api/gallery/config.json", "index 'config.json': input should be a valid integer"),
        ("/api/gallery/3?size=5000", "size=5000: give a thumbnail size from 16 to 1024"),
        ("/api/gallery/3?size=big", "size 'big'"),
        ("/api/similar/99?k=3", "there is no gallery item 99"),
    ):
        answer = client.get(url)
        assert answer.status_code == 400, (url, answer.text)
        assert fragment in answer.json()["error"], (url, answer.json())
    for path in ("/api/gallery/..%2f..%2fsearch.json", "/api/../search.json", "/search.json"):
        assert client.get(path).status_code == 404
    assert client.get("/static/../app.py").status_code == 404


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def test_bad_input_is_a_one_line_4xx_and_the_server_stays_up(
    searcher, searchable_run, client, tmp_path
):
    _, root = searchable_run
    before = tree(root)
    good = png(gradient((30, 30)))
    bomb = write_png_header(tmp_path / "bomb.png", 60000, 60000).read_bytes()
    cases = [
        (upload(client, b"hello, not an image", "notes.png"), 400, "notes.png: not an image file"),
        (upload(client, bomb, "bomb.png"), 400, "pixels that can be decoded safely"),
        (upload(client, b"", "empty.png"), 400, "empty.png: the 'image' field is empty"),
        (upload(client, good, k=0), 400, "k=0: the gallery has 72 images to answer with"),
        (upload(client, good, k=73), 400, "give k from 1 to 72"),
        (upload(client, good, k="ten"), 400, "query k 'ten'"),
        (client.get("/api/similar/3?k=72"), 400, "give k from 1 to 71"),
        (client.post("/api/search"), 400, "no query: send a file field 'image'"),
        (client.post("/api/search", data={"other": "x"}), 400, "unknown form field 'other'"),
        (
            client.post("/api/search", files={"image": ("q.png", good)}, data={"text": "red"}),
            400,
            "both 'image' and 'text' were sent",
        ),
        (client.post("/api/search", data={"image": "q.png"}), 400, "must be a file upload"),
        (client.post("/api/search", data={"text": "a red square"}), 400, "no text tower"),
        (client.post("/api/search", data={"text": "   "}), 400, "'text' field is empty"),
        (client.get("/api/nothing"), 404, "Not Found"),
        (client.delete("/api/search"), 405, "Method Not Allowed"),
    ]
    for response, status, fragment in cases:
        assert response.status_code == status, (fragment, response.text)
        message = response.json()["error"]
        assert fragment in message and "\n" not in message, (fragment, message)
        assert "Traceback" not in message
    # Text queries to a model without a text tower: the server says what to send instead.
    assert "send an image instead" in cases[11][0].json()["error"]
    assert client.get("/healthz").status_code == 200
    assert upload(client, good).status_code == 200
    assert tree(root) == before  # nothing written: no upload kept, no gallery touched


def test_uploads_over_the_cap_are_413(searcher):
    with TestClient(create_app(searcher, max_upload_bytes=MB // 8)) as small:
        noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), np.uint8)
        data = png(noise)  # 270 KB of noise (it does not compress): refused by its length
        answer = upload(small, data, "noise.png")
        assert answer.status_code == 413
        assert answer.json()["error"] == (
            "the request is over the 0.125 MB upload limit; send a smaller image"
        )
        data = png(noise[:170])  # within the form's slack, over the image's limit
        assert MB // 8 < len(data) < MB // 8 + FORM_OVERHEAD
        answer = upload(small, data, "noise.png")
        assert answer.status_code == 413
        assert answer.json()["error"] == (
            "noise.png is over the 0.125 MB upload limit; send a smaller image"
        )

        def chunks():  # no Content-Length: refused once the bytes arrive
            body = b"--b\r\nContent-Disposition: form-data; name=image; filename=x.png\r\n\r\n"
            yield body
            for _ in range(20):
                yield b"\0" * 10_000

        streamed = small.post(
            "/api/search",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        assert streamed.status_code == 413 and "upload limit" in streamed.json()["error"]
        fits = upload(small, png(gradient((60, 60))), "fits.png")
        assert fits.status_code == 200 and len(fits.json()["results"]) == 5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def live(app, **options):
    """The app served by uvicorn on a free localhost port, in a thread, configured as serve.py
    does (``options``: :func:`serving.operations.uvicorn_config`'s): its base URL."""
    import uvicorn

    from serving.operations import uvicorn_config

    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", free_port(), **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(15)


def test_concurrent_requests_get_the_sequential_answers(searcher):
    import httpx

    images = [gallery_file(searcher, i).read_bytes() for i in (0, 20, 40, 60)]
    images.append(png(gradient((33, 47))))
    requests = [("image", n % len(images)) for n in range(20)]
    requests += [("similar", (7 * n) % 72) for n in range(20)]

    def ask(session, request):
        kind, which = request
        if kind == "image":
            files = {"image": (f"q{which}.png", images[which], "image/png")}
            answer = session.post("/api/search?k=6", files=files)
        else:
            answer = session.get(f"/api/similar/{which}?k=6")
        assert answer.status_code == 200, answer.text
        return [(r["index"], r["score"]) for r in answer.json()["results"]]

    with live(create_app(searcher)) as url, httpx.Client(base_url=url, timeout=60) as session:
        sequential = [ask(session, request) for request in requests]
        with ThreadPoolExecutor(8) as pool:
            clients = [httpx.Client(base_url=url, timeout=60) for _ in range(8)]
            futures = [
                pool.submit(ask, clients[n % 8], request) for n, request in enumerate(requests * 2)
            ]
            concurrent = [future.result() for future in futures]
            for each in clients:
                each.close()
    assert concurrent == sequential * 2


def test_the_pixel_limit_is_the_uploads_not_the_gallery_files(searcher):
    with TestClient(create_app(searcher, max_pixels=500)) as strict:
        answer = upload(strict, png(gradient((30, 30))), "q.png")  # 900 pixels
        assert answer.status_code == 400
        assert answer.json()["error"] == (
            "q.png: 30x30 pixels is more than the 500 pixels that can be decoded safely; "
            "send a smaller image"
        )
        thumbnail = strict.get("/api/gallery/0?size=20")  # a 32 x 32 gallery image
        assert thumbnail.status_code == 200, thumbnail.text
        assert max(Image.open(io.BytesIO(thumbnail.content)).size) == 20


def test_serve_cli_refuses_a_taken_port(searchable_run, capsys):
    path, _ = searchable_run
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = call("serve", "-c", path, "--port", port, capsys=capsys)
    assert code == 2 and err.strip().splitlines() == [err.strip()]
    assert f"--port {port}: cannot listen there" in err and "choose another --port" in err
    code, out, err = call("serve", "-c", path, "--port", "70000", capsys=capsys)
    assert code == 2 and "give a port from 1 to 65535" in err
    for limit in ("nan", "inf", "-1"):  # refused before the model is loaded
        code, out, err = call("serve", "-c", path, "--max-upload-mb", limit, capsys=capsys)
        assert code == 2 and "--max-upload-mb and --max-pixels must be positive" in err, err


# --- the page in a real browser -----------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's package) driven by playwright; skipped, saying why, without."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -r requirements-serve.txt)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or TFCBIR_CHROMIUM)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class EchoTextTower:
    """A stand-in text tower: the text 'gallery item <i>' is embedded as that item's vector."""

    def __init__(self, gallery):
        self.gallery = gallery

    def embed(self, texts):
        return self.gallery.embeddings[[int(t.split()[-1]) for t in texts]]

    def unknown_words(self, text):
        return [w for w in text.split() if w not in ("gallery", "item") and not w.isdigit()]


def results_shown(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#results .result",
        "nodes => nodes.map(n => ({index: +n.dataset.index, kind: n.className.split(' ')[1],"
        " loaded: n.querySelector('img').complete && n.querySelector('img').naturalWidth > 0,"
        " text: n.innerText}))",
    )


def test_the_page_in_a_browser(browser, searcher, tmp_path):
    query = write_image(tmp_path / "query.png", np.asarray(Image.open(gallery_file(searcher, 5))))
    with live(create_app(searcher)) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(url + "/")
        page.wait_for_function("document.querySelector('#about').innerText.includes('72 images')")
        assert page.is_hidden("#text-form")  # no text tower: no text box
        page.fill("#k", "8")
        page.set_input_files("#file", str(query))
        page.wait_for_function("document.querySelectorAll('#results .result').length === 8")
        page.wait_for_function(
            "[...document.querySelectorAll('#results img')].every(i => i.complete)"
        )
        shown = results_shown(page)
        assert all(r["loaded"] for r in shown)  # every thumbnail came back as an image
        assert {r["kind"] for r in shown} == {"unknown"}  # an upload: its class is unknown
        assert shown[0]["index"] == 5 and "#1" in shown[0]["text"]  # the same image, first
        assert page.inner_text("#query-name") == "query.png"
        uploaded = [r["index"] for r in shown]

        # "More like this": an answer searched by its gallery index; the one with the most
        # answers of its own class (but not only those), so that both frames show.
        def matches(index: int) -> int:
            return sum(a.match for a in searcher.search_gallery([index], 8)[0].answers)

        mixed = [r["index"] for r in shown[1:] if 0 < matches(r["index"]) < 8]
        clicked = max(mixed, key=matches) if mixed else shown[1]["index"]
        page.click(f"#results .result[data-index='{clicked}']")
        page.wait_for_function(
            f"document.querySelector('#query-name').innerText === "
            f"{json.dumps(searcher.gallery.paths[clicked])}"
        )
        page.wait_for_function(
            "[...document.querySelectorAll('#results img')].every(i => i.complete)"
        )
        again = results_shown(page)
        assert len(again) == 8 and clicked not in [r["index"] for r in again]
        assert [r["index"] for r in again] != uploaded
        label = searcher.gallery.labels[clicked]
        assert [r["kind"] for r in again] == [
            "match" if searcher.gallery.labels[r["index"]] == label else "miss" for r in again
        ]
        if mixed:
            assert {"match", "miss"} <= {r["kind"] for r in again}
        assert page.inner_text("#query-class") == f"class {searcher.class_of(clicked)}"
        assert page.is_visible("#legend")
        page.mouse.move(0, 0)  # no hover effect in the picture
        screenshot = tmp_path / "search-page.png"
        page.screenshot(path=str(screenshot), full_page=True)
        assert Image.open(screenshot).size[0] == 1100
        if os.environ.get("TFCBIR_SCREENSHOT"):  # the README's picture, as a small PNG
            picture = Image.open(screenshot).convert("RGB").quantize(256)
            picture.save(os.environ["TFCBIR_SCREENSHOT"], optimize=True)

        # A file that is not an image: the page shows the server's one-line error, and it
        # replaces the earlier answers and their legend; the query's preview, which the
        # browser cannot show either, is hidden rather than a broken-image icon.
        notes = tmp_path / "notes.png"
        notes.write_text("not an image")
        page.set_input_files("#file", str(notes))
        page.wait_for_selector("#status.error")
        assert "notes.png: not an image file" in page.inner_text("#status")
        assert results_shown(page) == [] and page.is_hidden("#legend")
        page.wait_for_selector("#query-image", state="hidden")
        assert page.inner_text("#query-name") == "notes.png"

        # The answers box: anything but a whole number from 1 to the gallery's size is
        # refused in the page, saying so, and nothing is searched.
        page.set_input_files("#file", str(query))
        page.wait_for_function("document.querySelectorAll('#results .result').length === 8")
        for typed in ("0", "abc", "73", "2.5", ""):
            page.fill("#k", typed)
            page.set_input_files("#file", str(query))
            page.wait_for_selector("#status.error")
            assert page.inner_text("#status") == (
                f'"answers" must be a whole number from 1 to 72, not "{typed}"'
            )
            assert results_shown(page) == []
            page.fill("#k", "3")
            page.set_input_files("#file", str(query))
            page.wait_for_function("document.querySelectorAll('#results .result').length === 3")
        page.close()


def test_the_page_asks_for_the_api_key_once(browser, searcher, tmp_path):
    query = write_image(tmp_path / "query.png", np.asarray(Image.open(gallery_file(searcher, 5))))
    with live(create_app(searcher, api_key="the-key-1234")) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("#key-form", state="visible")
        assert "API key" in page.inner_text("#status")
        page.fill("#key", "a-wrong-key")
        page.click("#key-form button")
        page.wait_for_function(
            "document.querySelector('#status').innerText.includes('not accepted')"
        )
        page.fill("#key", "the-key-1234")
        page.click("#key-form button")
        page.wait_for_function("document.querySelector('#about').innerText.includes('72 images')")
        assert page.is_hidden("#key-form")
        page.fill("#k", "4")
        page.set_input_files("#file", str(query))
        page.wait_for_function("document.querySelectorAll('#results .result').length === 4")
        page.wait_for_function(
            "[...document.querySelectorAll('#results img')].every(i => i.complete)"
        )
        assert all(r["loaded"] for r in results_shown(page))  # thumbnails sent the key too
        page.reload()  # kept for the session: not asked again
        page.wait_for_function("document.querySelector('#about').innerText.includes('72 images')")
        assert page.is_hidden("#key-form")
        page.close()


def test_the_page_searches_text_when_the_model_has_a_text_tower(browser, searcher):
    with_text = Searcher(
        searcher.config,
        searcher.embedder,
        searcher.gallery,
        searcher.index,
        protocol=searcher.protocol,
        text_encoder=EchoTextTower(searcher.gallery),
    )
    with live(create_app(with_text)) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("#text-form", state="visible")
        page.fill("#k", "4")
        page.fill("#text", "red gallery item 30")
        page.click("#text-form button")
        page.wait_for_function("document.querySelectorAll('#results .result').length === 4")
        shown = results_shown(page)
        assert shown[0]["index"] == 30
        assert page.inner_text("#query-text") == "“red gallery item 30”"
        assert "not in the text tower's vocabulary: red" in page.inner_text("#status")
        page.close()


def test_a_gallery_image_gone_from_disk_is_404(searcher, tmp_path):
    import dataclasses

    moved = dataclasses.replace(searcher.gallery, data_root=str(tmp_path))  # no images there
    elsewhere = Searcher(
        searcher.config, searcher.embedder, moved, searcher.index, protocol=searcher.protocol
    )
    with TestClient(create_app(elsewhere)) as client:
        thumbnail = client.get("/api/gallery/0?size=32")
        assert thumbnail.status_code == 404
        assert "gallery item 0's image cannot be read" in thumbnail.json()["error"]
        original = client.get("/api/gallery/0")
        assert original.status_code == 404
        assert original.json()["error"] == "gallery item 0's image is gone from the data set"
        assert client.get("/api/similar/0?k=3").status_code == 200  # searches need no files


@pytest.fixture(scope="module")
def dual_run(tmp_path_factory, tiny_demo):
    """A dual encoder (image and text towers) trained briefly on the tiny demo set, embedded:
    ``(config path, data_dir)``."""
    from embed import main as embed
    from tests.conftest import write_config
    from tests.test_training_dual import dual_config
    from training.trainer import train

    root = tmp_path_factory.mktemp("dual") / "data"
    shutil.copytree(tiny_demo, root / "datasets" / "shapes")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFCBIR_DATA_DIR", str(root))
        raw = dual_config(train__steps=12, train__validate_every=6, train__checkpoint_every=6)
        path = write_config(root, "dual", raw)
        train(config.load(path))
        assert embed(["-c", str(path)]) == 0
    return path, root


def test_text_queries_answer_as_cbir_text_json(dual_run, capsys):
    path, root = dual_run
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFCBIR_DATA_DIR", str(root))
        searcher = Searcher.open(config.load(path), config_path=path)  # both towers
        code, out, err = call(
            "cbir", "-c", path, "-r", "5", "--json", "--text", "a small red hat", capsys=capsys
        )
    assert code == 0, err
    expected = json.loads(out)["results"][0]
    assert searcher.has_text
    with TestClient(create_app(searcher)) as client:
        assert client.get("/api/info").json()["has_text"] is True
        document = client.post("/api/search?k=5", data={"text": "a small red hat"}).json()
        assert document["kind"] == "text" and document["query"] == "a small red hat"
        assert document["unknown_words"] == expected["unknown_words"] == ["hat"]
        assert [(r["rank"], r["path"], r["score"]) for r in document["results"]] == [
            (a["rank"], a["path"], a["score"]) for a in expected["answers"]
        ]
        image = gallery_file(searcher, 0).read_bytes()  # images work on the same gallery
        assert upload(client, image).json()["results"][0]["index"] == 0
        both = client.post("/api/search", files={"image": ("q.png", image)}, data={"text": "x"})
        assert both.status_code == 400


def test_where_filters_the_answers_of_the_api(client, searcher):
    name = searcher.gallery.classes[2]
    found = client.get("/api/similar/0", params={"k": 4, "where": f"class == '{name}'"}).json()
    assert len(found["results"]) == 4 and {r["class"] for r in found["results"]} == {name}
    image = gallery_file(searcher, 5).read_bytes()
    answer = client.post(
        "/api/search",
        params={"k": 3, "where": f"class != '{name}'"},
        files={"image": ("q.png", image, "image/png")},
    ).json()
    assert len(answer["results"]) == 3 and name not in {r["class"] for r in answer["results"]}
    bad = client.get("/api/similar/0", params={"k": 4, "where": "colour == 'red'"})
    assert bad.status_code == 400 and bad.json()["error"].startswith("where: no column 'colour'")
