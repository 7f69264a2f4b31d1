"""The search service: ``create_app(searcher)`` -> a FastAPI app (serve.py runs it with uvicorn).

Routes (every answer JSON unless it is a page or an image; every GET route answers HEAD too, and
OPTIONS on any route answers 204 with its ``Allow``):

- ``GET /``: the search page (``static/index.html``, its script and style under ``/static/``);
  ``/favicon.ico`` (an SVG).
- ``GET /healthz``: ``{"status": "ok", "gallery_size": N, "gallery_id": ..., "gallery": name}``.
- ``GET /metrics``: Prometheus' text format (:class:`serving.operations.Metrics`).
- ``GET /api/info``: what the page needs: the run, the gallery's size and classes count,
  ``has_text``, the upload limits, the default k.
- ``POST /api/search?k=10``: a multipart file field ``image``, or a form field ``text`` (one of
  the two); answers :func:`search_json`.
- ``GET /api/similar/{i}?k=10``: "more like this": gallery item i's answers, itself left out.
- ``GET /api/gallery/{i}[?size=160]``: gallery item i's image file, or a JPEG thumbnail that fits
  in size x size (16 to 1024; kept in a bounded in-memory cache). Only gallery items, by position:
  no other path can be asked for.
- ``POST /api/reload``: reopen the gallery file now (:mod:`serving.live`; it is also looked at
  every ``reload_every`` seconds between requests).

Bad input is answered ``{"error": "<one line>"}``: 413 for a request over the upload limit, 400
for anything else the client can fix (not an image, too many pixels, an empty field, both or
neither of image and text, k out of range, a gallery position that does not exist), 401 without
the API key (when one is set), 404 for an unknown route or a gallery image that can no longer be
read, 408 for a body that does not arrive in time, 503 when every decoder is busy and the queue
is full (:mod:`serving.decoding`). Uploads are decoded in memory (a large one may be spooled to
an anonymous temporary file while the request is read, deleted with it); the service writes
nothing. Requests may come concurrently: the Searcher serialises its model and index; uploads
are decoded on a few threads of their own, thumbnails in parallel.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from datasets.images import DEFAULT_MAX_PIXELS, ImageError, ImageTooLarge, load_image
from retrieval.answers import AnswerCountError
from retrieval.searcher import GalleryIndexError, Result, Searcher
from serving.decoding import DEFAULT_DECODERS, DEFAULT_WAITING, DecodeQueue, default_max_pixels
from serving.errors import BadRequest, error_response
from serving.guards import AnswerOptions, ApiKey, BodyLimit, BodyTimeout
from serving.live import LiveSearcher
from serving.operations import AccessLog, Metrics
from tfcbir import UserError

STATIC = Path(__file__).resolve().parent / "static"
MB = 1024 * 1024
DEFAULT_K = 10
THUMBNAIL_SIZES = (16, 1024)  # the smallest and largest ?size=
THUMBNAILS_CACHED = 4096
FORM_OVERHEAD = 64 * 1024  # multipart headers and the text field, beyond the image's bytes
TEXT_LIMIT = 1000  # characters of a text query
GET = ["GET", "HEAD"]
# Reachable without the API key: the page (which then asks for the key) and the health check.
OPEN_PATHS = ("/", "/favicon.ico", "/healthz")
OPEN_PREFIXES = ("/static/",)
FAVICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<rect width="16" height="16" rx="3" fill="#1d2330"/>'
    b'<circle cx="7" cy="7" r="3.6" fill="none" stroke="#fff" stroke-width="1.8"/>'
    b'<path d="M9.6 9.6l3.6 3.6" stroke="#2f6fde" stroke-width="2.2" stroke-linecap="round"/>'
    b"</svg>"
)


def create_app(
    searcher: Searcher,
    *,
    max_upload_bytes: int = 20 * MB,
    max_pixels: int | None = None,
    decoders: int = DEFAULT_DECODERS,
    decode_queue: int = DEFAULT_WAITING,
    body_timeout: float = 30.0,
    api_key: str | None = None,
    cors_origins: tuple[str, ...] = (),
    reload_every: float = 0.0,
) -> FastAPI:
    """The page and API over ``searcher``. Uploads over ``max_upload_bytes`` are refused (413),
    images of more than ``max_pixels`` pixels (header size, checked before decoding; default:
    :func:`serving.decoding.default_max_pixels` of the model's input) too (400). ``decoders``
    uploads are decoded at once, ``decode_queue`` more wait (503 beyond). A body must arrive
    within ``body_timeout`` seconds (408). ``api_key``: required of every request but the
    page's and /healthz (401). ``cors_origins``: the origins other sites' pages may call the
    API from. ``reload_every``: seconds between looks at the gallery file (0: never)."""
    if max_pixels is None:
        max_pixels = default_max_pixels(model_input(searcher))
    metrics = Metrics()
    metrics.gallery_size.set(len(searcher))

    def swapped(new: Searcher) -> None:
        metrics.gallery_size.set(len(new))
        metrics.reloads.inc()

    live = LiveSearcher(searcher, check_every=reload_every, on_swap=swapped)
    decodes = DecodeQueue(decoders, decode_queue)
    metrics.decodes_waiting.set_function(lambda: decodes.pending)
    app = FastAPI(title="tfcbir search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.live, app.state.metrics = live, metrics
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_error_handlers(app)
    _add_page_routes(app, live, metrics, max_upload_bytes, max_pixels)
    _add_search_routes(app, live, decodes, max_upload_bytes, max_pixels)
    _add_gallery_route(app, live)
    _add_middleware(app, metrics, max_upload_bytes, body_timeout, api_key, cors_origins)
    return app


def model_input(searcher: Searcher) -> tuple[int, int] | None:
    """The ``(h, w)`` an upload is decoded to (the model's resize, else its input size)."""
    if searcher.embedder is None:
        return None
    return tuple(searcher.embedder.resize or searcher.embedder.image_size)


def _add_middleware(
    app: FastAPI,
    metrics: Metrics,
    max_upload_bytes: int,
    body_timeout: float,
    api_key: str | None,
    cors_origins: tuple[str, ...],
) -> None:
    """From the inside out: the body's size, its time, the key, OPTIONS, CORS, the access log
    (outermost: it sees every answer, refusals included, and every disconnect)."""
    limit = (
        f"the request is over the {_megabytes(max_upload_bytes)} upload limit; send a smaller image"
    )
    app.add_middleware(BodyLimit, limit=max_upload_bytes + FORM_OVERHEAD, message=limit)
    app.add_middleware(BodyTimeout, seconds=body_timeout)
    if api_key is not None:
        app.add_middleware(ApiKey, key=api_key, open_paths=OPEN_PATHS, open_prefixes=OPEN_PREFIXES)
    app.add_middleware(AnswerOptions, router=app.router)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "HEAD", "POST"],
            allow_headers=["Authorization", "X-API-Key"],
        )
    app.add_middleware(AccessLog, metrics=metrics)


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal answered ``{"error": "<one line>"}``: BadRequest, FastAPI's parameter
    validation (400) and Starlette's HTTP errors (404 for an unknown route, ...)."""

    @app.exception_handler(BadRequest)
    async def bad_request(_request, error: BadRequest):
        return error_response(error.status, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, error: RequestValidationError):
        first = error.errors()[0]
        where = " ".join(str(part) for part in first.get("loc", ()) if part != "path")
        value = first.get("input")
        return error_response(400, f"{where} {value!r}: {first.get('msg', 'invalid').lower()}")

    @app.exception_handler(HTTPException)
    async def http_error(_request, error: HTTPException):
        return error_response(error.status_code, str(error.detail), error.headers)


def _add_page_routes(
    app: FastAPI, live: LiveSearcher, metrics: Metrics, max_upload_bytes: int, max_pixels: int
) -> None:
    """``/`` (the page), the favicon, ``/healthz``, ``/metrics``, ``/api/info`` (what the page
    needs) and ``POST /api/reload``."""

    @app.api_route("/", methods=GET, include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.api_route("/favicon.ico", methods=GET, include_in_schema=False)
    def favicon() -> Response:
        headers = {"Cache-Control": "max-age=86400"}
        return Response(FAVICON, media_type="image/svg+xml", headers=headers)

    @app.api_route("/healthz", methods=GET)
    def healthz() -> dict:
        gallery = live.check().gallery
        return {
            "status": "ok",
            "gallery_size": len(gallery),
            "gallery_id": gallery.gallery_id,
            "gallery": gallery.path.name,
        }

    @app.api_route("/metrics", methods=GET)
    def prometheus() -> Response:
        body, content_type = metrics.text()
        return Response(body, media_type=content_type)

    @app.api_route("/api/info", methods=GET)
    def info() -> dict:
        searcher = live.check()
        gallery = searcher.gallery
        return {
            "run": searcher.config["name"],
            "gallery": gallery.path.name,
            "gallery_id": gallery.gallery_id,
            "gallery_size": len(gallery),
            "classes": len(gallery.classes),
            "has_text": searcher.has_text,
            "default_k": min(DEFAULT_K, len(gallery) - 1),
            "max_upload_bytes": max_upload_bytes,
            "max_pixels": max_pixels,
            "model_step": gallery.model_step,
        }

    @app.post("/api/reload")
    def reload() -> dict:
        try:
            swapped = live.reload()
        except UserError as error:
            raise BadRequest(f"the gallery cannot be reloaded: {error}", 409) from None
        gallery = live.current().gallery
        return {"reloaded": swapped, "gallery_id": gallery.gallery_id, "gallery_size": len(gallery)}


def _add_search_routes(
    app: FastAPI, live: LiveSearcher, decodes: DecodeQueue, max_upload_bytes: int, max_pixels: int
) -> None:
    """``POST /api/search`` (an uploaded image or a text) and ``GET /api/similar/{i}``."""

    @app.post("/api/search")
    async def search(request: Request, k: int = DEFAULT_K, where: str | None = None) -> dict:
        searcher = await run_in_threadpool(live.check) if live.due() else live.current()
        _check_k(searcher, k)
        _check_where(searcher, where)
        try:
            form = await request.form(max_files=1, max_fields=4, max_part_size=FORM_OVERHEAD)
        except HTTPException as error:  # a malformed or oversized form part
            raise BadRequest(f"the form cannot be read: {error.detail}") from None
        try:
            image, text = _query_fields(form)
            if text is not None:
                return await run_in_threadpool(_search_text, searcher, text, k, where)
            data = await image.read(max_upload_bytes + 1)
            name = Path(image.filename or "upload").name
        finally:
            await form.close()  # an upload spooled to a temporary file: deleted
        _check_upload(data, name, max_upload_bytes)
        results = await decodes.run(_search_image, searcher, data, name, k, max_pixels, where)
        return search_json(results[0], k)

    @app.api_route("/api/similar/{index}", methods=GET)
    def similar(index: int, k: int = DEFAULT_K, where: str | None = None) -> dict:
        searcher = live.check()
        _check_k(searcher, k, leave_one_out=True)
        _check_where(searcher, where)
        try:
            result = searcher.search_gallery([index], k, where=where)[0]
        except GalleryIndexError as error:
            raise BadRequest(_index_message(error)) from None
        return search_json(result, k)


def _add_gallery_route(app: FastAPI, live: LiveSearcher) -> None:
    """``GET /api/gallery/{i}[?size=160]``: a gallery item's file, or a cached JPEG thumbnail."""

    @lru_cache(maxsize=THUMBNAILS_CACHED)
    def thumbnail(path: Path, size: int) -> bytes:
        # A gallery file is the data set's, embedded already: PIL's own limit, not the uploads'.
        pixels = load_image(path, max_pixels=DEFAULT_MAX_PIXELS)
        image = Image.fromarray(pixels)
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=88)
        return out.getvalue()

    # A re-embedded data set may hold other pictures under the same paths.
    live.when_swapped(lambda _new: thumbnail.cache_clear())

    @app.api_route("/api/gallery/{index}", methods=GET)
    def gallery_image(request: Request, index: int, size: int | None = None) -> Response:
        searcher = live.check()
        try:
            path = searcher.image_file(index)
        except GalleryIndexError as error:
            raise BadRequest(_index_message(error)) from None
        low, high = THUMBNAIL_SIZES
        if size is not None and not low <= size <= high:
            raise BadRequest(f"size={size}: give a thumbnail size from {low} to {high} pixels")
        # Position i is another image once the gallery is re-embedded: the browser revalidates
        # (no-cache) against a tag naming this gallery, and gets 304 while it is the same.
        tag = f'"{searcher.gallery.gallery_id}-{index}-{size or "file"}"'
        headers = {"Cache-Control": "no-cache", "ETag": tag}
        if request.headers.get("if-none-match") == tag:
            return Response(status_code=304, headers=headers)
        if size is None:
            if not path.is_file():
                raise BadRequest(f"gallery item {index}'s image is gone from the data set", 404)
            return FileResponse(path, headers=headers)
        try:
            data = thumbnail(path, size)
        except ImageError as error:
            raise BadRequest(
                f"gallery item {index}'s image cannot be read ({error.problem})", 404
            ) from None
        return Response(data, media_type="image/jpeg", headers=headers)


def _query_fields(form: FormData) -> tuple[UploadFile | None, object]:
    """A search form's ``(image, text)``: exactly one of them sent (the other None), an image
    as a file upload; the text is checked by :func:`_search_text`."""
    unknown = sorted(set(form.keys()) - {"image", "text"})
    if unknown:
        raise BadRequest(
            f"unknown form field {unknown[0]!r}; send a file field 'image' or a field 'text'"
        )
    image, text = form.get("image"), form.get("text")
    if image is not None and text is not None:
        raise BadRequest("both 'image' and 'text' were sent; send one query, not two")
    if image is None and text is None:
        raise BadRequest("no query: send a file field 'image' or a form field 'text'")
    if text is None and not isinstance(image, UploadFile):
        raise BadRequest("'image' must be a file upload (multipart), not a text field")
    return image, text


def _check_upload(data: bytes, name: str, max_upload_bytes: int) -> None:
    if len(data) > max_upload_bytes:
        raise BadRequest(
            f"{name} is over the {_megabytes(max_upload_bytes)} upload limit; send a smaller image",
            413,
        )
    if not data:
        raise BadRequest(f"{name}: the 'image' field is empty; send an image file")


def _check_where(searcher: Searcher, where: str | None) -> None:
    """The ``where`` filter parsed and checked against the gallery's metadata before any work;
    a bad one: BadRequest naming the token or column."""
    try:
        searcher.where_mask(where, label="where")
    except UserError as error:
        raise BadRequest(str(error)) from None


def _search_image(
    searcher: Searcher, data: bytes, name: str, k: int, max_pixels: int, where: str | None = None
) -> list[Result]:
    """An uploaded image's results (on a decoder thread); one that cannot be used:
    BadRequest saying what to send instead."""
    try:
        return searcher.search_bytes([data], k, names=[name], max_pixels=max_pixels, where=where)
    except ImageTooLarge as error:
        raise BadRequest(f"{name}: {error.problem.split('; ')[0]}; send a smaller image") from None
    except ImageError as error:
        problem = error.problem
        if "truncated or corrupt" in problem:
            message = "the image's data is cut short or damaged; send the whole file again"
        elif problem.startswith("not an image file"):
            message = "not an image file; send a JPEG, PNG, GIF, BMP, TIFF or WebP image"
        else:
            message = f"{problem.split('; ')[0]}; send a JPEG, PNG, GIF, BMP, TIFF or WebP image"
        raise BadRequest(f"{name}: {message}") from None


def search_json(result: Result, k: int) -> dict:
    """The API's answer: the query (``query``: the upload's name, the text or the gallery item's
    path; ``query_class`` and ``query_index`` where known; ``kind``: image, text or gallery;
    a text's ``unknown_words``, those its text tower could only read as unknown)
    and ``results``, ranked as ``cbir.py --json``'s answers with the same scores: ``rank``,
    ``index`` (gallery position), ``path``, ``class``, ``score``, ``match`` (None when the
    query's class is unknown)."""
    return {
        "query": result.query,
        "kind": result.kind,
        "query_class": result.query_class,
        "query_index": result.query_index,
        "k": k,
        **({"unknown_words": result.unknown_words} if result.kind == "text" else {}),
        "results": [
            {
                "rank": a.rank,
                "index": a.index,
                "path": a.path,
                "class": a.class_name,
                "score": a.score,
                "match": a.match,
            }
            for a in result.answers
        ],
    }


def _search_text(searcher: Searcher, text: str, k: int, where: str | None = None) -> dict:
    if not isinstance(text, str):
        raise BadRequest("'text' must be a form field, not a file")
    if not text.strip():
        raise BadRequest("the 'text' field is empty; type words to search for")
    if not searcher.has_text:
        raise BadRequest(
            f"run {searcher.config['name']} searches by image only (its model has no text "
            "tower), so it cannot read words; send an image instead"
        )
    if len(text) > TEXT_LIMIT:
        raise BadRequest(f"the text is {len(text)} characters; send at most {TEXT_LIMIT}")
    try:
        results = searcher.search_text([text], k, where=where)
    except UserError as error:
        raise BadRequest(str(error)) from None
    return search_json(results[0], k)


def _check_k(searcher: Searcher, k: int, leave_one_out: bool = False) -> None:
    try:
        searcher.check_k(k, leave_one_out=leave_one_out)
    except AnswerCountError as error:
        raise BadRequest(
            f"k={k}: the gallery has {error.available} images to answer with; give k from 1 "
            f"to {error.available}"
        ) from None


def _index_message(error: GalleryIndexError) -> str:
    return f"{error}; ask for one of them"


def _megabytes(n: int) -> str:
    return f"{n / MB:g} MB"


__all__ = ["create_app", "search_json", "model_input", "BadRequest", "FORM_OVERHEAD", "MB"]
