"""serving: HEAD and OPTIONS on every route, the favicon, the API key, CORS, serve.py's
refusals (a network address without a key, --workers), the JSON access log and /metrics."""

from __future__ import annotations

import json

import pytest

import config
from retrieval.searcher import Searcher
from tests.helpers_images import gradient
from tests.test_retrieval_cli import call
from tests.test_serving import free_port, png, upload
from tests.test_serving_limits import server_logs

fastapi = pytest.importorskip("fastapi", reason="pip install -r requirements-serve.txt")
from fastapi.testclient import TestClient  # noqa: E402

from serving.app import create_app  # noqa: E402
from serving.guards import KEY_COOKIE  # noqa: E402

KEY = "correct-horse-battery"


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


GETS = [
    "/",
    "/favicon.ico",
    "/healthz",
    "/metrics",
    "/api/info",
    "/api/similar/3?k=2",
    "/api/gallery/3",
    "/api/gallery/3?size=32",
    "/static/app.js",
]


@pytest.mark.parametrize("url", GETS)
def test_head_answers_as_get_without_a_body(client, url):
    got, head = client.get(url), client.head(url)
    assert got.status_code == head.status_code == 200, (url, head.status_code)
    assert head.content == b"" and got.content
    assert head.headers["content-type"] == got.headers["content-type"]


def test_options_names_each_routes_methods(client):
    for url, allowed in (
        ("/healthz", "GET, HEAD, OPTIONS"),
        ("/api/search", "OPTIONS, POST"),
        ("/api/similar/4", "GET, HEAD, OPTIONS"),
        ("/api/reload", "OPTIONS, POST"),
        ("/static/app.js", "GET, HEAD, OPTIONS"),
    ):
        answer = client.options(url)
        assert answer.status_code == 204 and answer.headers["allow"] == allowed, url
        assert answer.content == b""
    assert client.options("/nowhere").status_code == 404
    assert client.delete("/healthz").status_code == 405


def test_the_favicon_is_a_small_svg(client):
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    assert icon.content.startswith(b"<svg") and len(icon.content) < 1000
    assert '<link rel="icon" href="/favicon.ico"' in client.get("/").text


def test_without_the_key_the_api_answers_401(searcher):
    data = png(gradient((30, 30)))
    with TestClient(create_app(searcher, api_key=KEY)) as client:
        for url in ("/api/info", "/api/similar/3?k=2", "/api/gallery/3", "/metrics"):
            refused = client.get(url)
            assert refused.status_code == 401, url
            assert refused.json()["error"].startswith("no API key: send the service's key")
            assert refused.headers["www-authenticate"].startswith("Bearer")
        assert upload(client, data).status_code == 401
        wrong = client.get("/api/info", headers={"X-API-Key": "guess"})
        assert wrong.status_code == 401 and wrong.json()["error"].startswith("a wrong API key")
        for headers in (
            {"Authorization": f"Bearer {KEY}"},
            {"X-API-Key": KEY},
            {"Cookie": f"{KEY_COOKIE}={KEY}"},  # the page's thumbnails (<img> sends no header)
        ):
            assert client.get("/api/info", headers=headers).status_code == 200, headers
            assert upload(client, data, headers=headers).status_code == 200
        # Open without it: the page (which asks for the key), its files, the health check.
        for url in ("/", "/static/app.js", "/favicon.ico", "/healthz"):
            assert client.get(url).status_code == 200, url
        assert client.options("/api/search").status_code == 204  # a preflight has no key


def test_cors_origins_are_none_unless_given(searcher, client):
    origin = {"Origin": "https://photos.example"}
    assert "access-control-allow-origin" not in client.get("/healthz", headers=origin).headers
    preflight = {**origin, "Access-Control-Request-Method": "POST"}
    answer = client.options("/api/search", headers=preflight)
    assert "access-control-allow-origin" not in answer.headers
    with TestClient(
        create_app(searcher, cors_origins=("https://photos.example",), api_key=KEY)
    ) as allowing:
        answer = allowing.options(
            "/api/search",
            headers={**preflight, "Access-Control-Request-Headers": "x-api-key"},
        )
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://photos.example"
        assert "POST" in answer.headers["access-control-allow-methods"]
        got = allowing.get("/api/info", headers={**origin, "X-API-Key": KEY})
        assert got.headers["access-control-allow-origin"] == "https://photos.example"
        other = allowing.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_serve_refuses_a_network_address_without_a_key(searchable_run, tmp_path, capsys):
    path, _ = searchable_run
    for host in ("0.0.0.0", "192.168.1.20", "example.org"):
        code, _, err = call("serve", "-c", path, "--host", host, capsys=capsys)
        assert code == 2 and err.strip().splitlines() == [err.strip()], err
        assert err.strip() == (
            f"error: --host {host}: the service would be open to the network without a key; "
            "give --api-key-file <file> (a key clients must send), or --public to serve anyone"
        )
    short = tmp_path / "short.key"
    short.write_text("abc\n")
    code, _, err = call("serve", "-c", path, "--api-key-file", short, capsys=capsys)
    assert code == 2 and "the key must be one word of at least 8 characters" in err
    code, _, err = call("serve", "-c", path, "--api-key-file", tmp_path / "none", capsys=capsys)
    assert code == 2 and "cannot be read" in err
    code, _, err = call("serve", "-c", path, "--workers", "4", capsys=capsys)
    assert code == 2 and "serve.py runs one process" in err and "behind a proxy" in err
    for flag, value in (("--body-timeout", "0"), ("--decoders", "0"), ("--reload-every", "-1")):
        code, _, err = call("serve", "-c", path, flag, value, capsys=capsys)
        assert code == 2 and flag in err, err


def test_serve_names_the_config_when_the_run_is_untrained(tmp_path, tiny_demo, capsys):
    import shutil

    from tests.conftest import tiny_config, write_config

    shutil.copytree(tiny_demo, tmp_path / "datasets" / "shapes")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFCBIR_DATA_DIR", str(tmp_path))
        path = write_config(tmp_path, "untrained", tiny_config())
        code, _, err = call("serve", "-c", path, "--port", free_port(), capsys=capsys)
    assert code == 2 and "has no trained model yet" in err, err
    assert f"python train.py -c {path} " in err and "<config>" not in err, err


def test_each_request_is_one_json_access_line(client):
    data = png(gradient((30, 30)))
    with server_logs() as logs:
        upload(client, data, "secret-name.png", k=4)
        client.get("/api/similar/3?k=2")
        client.get("/nowhere/at/all")
    lines = logs.access()
    assert [(line["method"], line["route"], line["status"], line.get("k")) for line in lines] == [
        ("POST", "/api/search", 200, 4),
        ("GET", "/api/similar/{index}", 200, 2),
        ("GET", "/nowhere/at/all", 404, None),
    ]
    assert all(line["ms"] >= 0 and line["bytes"] > 0 for line in lines)
    assert set(lines[0]) == {"method", "route", "status", "ms", "bytes", "k"}
    assert "secret-name" not in json.dumps(lines)  # nothing of the upload itself


def test_metrics_in_prometheus_text_format(searcher):
    from prometheus_client.parser import text_string_to_metric_families

    with TestClient(create_app(searcher)) as client:
        for _ in range(3):
            client.get("/api/similar/3?k=2")
        client.get("/api/similar/999?k=2")
        text = client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(text.text)}
    counted = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in families["tfcbir_requests"].samples
        if s.name == "tfcbir_requests_total"
    }
    assert counted[("/api/similar/{index}", "200")] == 3
    assert counted[("/api/similar/{index}", "400")] == 1
    buckets = [s for s in families["tfcbir_request_seconds"].samples if s.name.endswith("_count")]
    assert {s.labels["route"]: s.value for s in buckets}["/api/similar/{index}"] == 4
    assert families["tfcbir_gallery_size"].samples[0].value == 72
