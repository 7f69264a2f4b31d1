"""The search service: ``create_app(searcher)`` -> a FastAPI app (serve.py runs it with uvicorn).

Routes (every answer JSON unless it is a page or an image):

- ``GET /``: the search page (``static/index.html``, its script and style under ``/static/``).
- ``GET /healthz``: ``{"status": "ok", "gallery_size": N}``.
- ``GET /api/info``: what the page needs: the run, the gallery's size and classes count,
  ``has_text``, the upload limit, the default k.
- ``POST /api/search?k=10``: a multipart file field ``image``, or a form field ``text`` (one of
  the two); answers :func:`search_json`.
- ``GET /api/similar/{i}?k=10``: "more like this": gallery item i's answers, itself left out.
- ``GET /api/gallery/{i}[?size=160]``: gallery item i's image file, or a JPEG thumbnail that fits
  in size x size (16 to 1024; kept in a bounded in-memory cache). Only gallery items, by position:
  no other path can be asked for.

Bad input is answered ``{"error": "<one line>"}``: 413 for a request over the upload limit, 400
for anything else the client can fix (not an image, too many pixels, an empty field, both or
neither of image and text, k out of range, a gallery position that does not exist), 404 for an
unknown route or a gallery image that can no longer be read. Uploads are decoded in memory (a
large one may be spooled to an anonymous temporary file while the request is read, deleted with
it); the service writes nothing. Requests may come concurrently: the Searcher serialises its
model and index; images are decoded and thumbnails made in parallel.
"""

from __future__ import annotations

import io
import json
from functools import lru_cache
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from datasets.images import DEFAULT_MAX_PIXELS, ImageError, ImageTooLarge, load_image
from retrieval.answers import AnswerCountError
from retrieval.searcher import GalleryIndexError, Result, Searcher
from tfcbir import UserError

STATIC = Path(__file__).resolve().parent / "static"
MB = 1024 * 1024
DEFAULT_K = 10
THUMBNAIL_SIZES = (16, 1024)  # the smallest and largest ?size=
THUMBNAILS_CACHED = 4096
FORM_OVERHEAD = 64 * 1024  # multipart headers and the text field, beyond the image's bytes
TEXT_LIMIT = 1000  # characters of a text query


class BadRequest(Exception):
    """A request the client can fix: answered ``status`` with ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


def create_app(
    searcher: Searcher,
    *,
    max_upload_bytes: int = 20 * MB,
    max_pixels: int = 40_000_000,
) -> FastAPI:
    """The page and API over ``searcher``. Uploads over ``max_upload_bytes`` are refused (413),
    images of more than ``max_pixels`` pixels (header size, checked before decoding) too (400)."""
    app = FastAPI(title="tfcbir search", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=max_upload_bytes + FORM_OVERHEAD)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_error_handlers(app)
    _add_page_routes(app, searcher, max_upload_bytes)
    _add_search_routes(app, searcher, max_upload_bytes, max_pixels)
    _add_gallery_route(app, searcher)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal answered ``{"error": "<one line>"}``: BadRequest, FastAPI's parameter
    validation (400) and Starlette's HTTP errors (404 for an unknown route, ...)."""

    @app.exception_handler(BadRequest)
    async def bad_request(_request, error: BadRequest):
        return _error(error.status, error.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, error: RequestValidationError):
        first = error.errors()[0]
        where = " ".join(str(part) for part in first.get("loc", ()) if part != "path")
        value = first.get("input")
        return _error(400, f"{where} {value!r}: {first.get('msg', 'invalid').lower()}")

    @app.exception_handler(HTTPException)
    async def http_error(_request, error: HTTPException):
        return _error(error.status_code, str(error.detail))


def _add_page_routes(app: FastAPI, searcher: Searcher, max_upload_bytes: int) -> None:
    """``GET /`` (the page), ``GET /healthz`` and ``GET /api/info`` (what the page needs)."""
    gallery = searcher.gallery

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "gallery_size": len(gallery)}

    @app.get("/api/info")
    def info() -> dict:
        return {
            "run": searcher.config["name"],
            "gallery": gallery.path.name,
            "gallery_size": len(gallery),
            "classes": len(gallery.classes),
            "has_text": searcher.has_text,
            "default_k": min(DEFAULT_K, len(gallery) - 1),
            "max_upload_bytes": max_upload_bytes,
            "model_step": gallery.model_step,
        }


def _add_search_routes(
    app: FastAPI, searcher: Searcher, max_upload_bytes: int, max_pixels: int
) -> None:
    """``POST /api/search`` (an uploaded image or a text) and ``GET /api/similar/{i}``."""

    @app.post("/api/search")
    async def search(request: Request, k: int = DEFAULT_K) -> dict:
        _check_k(searcher, k)
        try:
            form = await request.form(max_files=1, max_fields=4, max_part_size=FORM_OVERHEAD)
        except HTTPException as error:  # a malformed or oversized form part
            raise BadRequest(f"the form cannot be read: {error.detail}") from None
        try:
            image, text = _query_fields(form)
            if text is not None:
                return await run_in_threadpool(_search_text, searcher, text, k)
            data = await image.read(max_upload_bytes + 1)
            name = Path(image.filename or "upload").name
        finally:
            await form.close()  # an upload spooled to a temporary file: deleted
        return await _search_image(searcher, data, name, k, max_upload_bytes, max_pixels)

    @app.get("/api/similar/{index}")
    def similar(index: int, k: int = DEFAULT_K) -> dict:
        _check_k(searcher, k, leave_one_out=True)
        try:
            result = searcher.search_gallery([index], k)[0]
        except GalleryIndexError as error:
            raise BadRequest(_index_message(error)) from None
        return search_json(result, k)


def _add_gallery_route(app: FastAPI, searcher: Searcher) -> None:
    """``GET /api/gallery/{i}[?size=160]``: a gallery item's file, or a cached JPEG thumbnail."""
    gallery = searcher.gallery

    @lru_cache(maxsize=THUMBNAILS_CACHED)
    def thumbnail(index: int, size: int) -> bytes:
        # A gallery file is the data set's, embedded already: PIL's own limit, not the uploads'.
        pixels = load_image(searcher.image_file(index), max_pixels=DEFAULT_MAX_PIXELS)
        image = Image.fromarray(pixels)
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=88)
        return out.getvalue()

    @app.get("/api/gallery/{index}")
    def gallery_image(request: Request, index: int, size: int | None = None) -> Response:
        try:
            path = searcher.image_file(index)
        except GalleryIndexError as error:
            raise BadRequest(_index_message(error)) from None
        low, high = THUMBNAIL_SIZES
        if size is not None and not low <= size <= high:
            raise BadRequest(f"size={size}: give a thumbnail size from {low} to {high} pixels")
        # Position i is another image once the gallery is re-embedded: the browser revalidates
        # (no-cache) against a tag naming this gallery, and gets 304 while it is the same.
        tag = f'"{gallery.gallery_id}-{index}-{size or "file"}"'
        headers = {"Cache-Control": "no-cache", "ETag": tag}
        if request.headers.get("if-none-match") == tag:
            return Response(status_code=304, headers=headers)
        if size is None:
            if not path.is_file():
                raise BadRequest(f"gallery item {index}'s image is gone from the data set", 404)
            return FileResponse(path, headers=headers)
        try:
            data = thumbnail(index, size)
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


async def _search_image(
    searcher: Searcher, data: bytes, name: str, k: int, max_upload_bytes: int, max_pixels: int
) -> dict:
    """An uploaded image's answers; too large, empty or not an image: BadRequest."""
    if len(data) > max_upload_bytes:
        raise BadRequest(
            f"{name} is over the {_megabytes(max_upload_bytes)} upload limit; send a smaller image",
            413,
        )
    if not data:
        raise BadRequest(f"{name}: the 'image' field is empty; send an image file")
    try:
        results = await run_in_threadpool(
            searcher.search_bytes, [data], k, names=[name], max_pixels=max_pixels
        )
    except ImageError as error:
        fix = (
            "send a smaller image"
            if isinstance(error, ImageTooLarge)
            else "send a JPEG, PNG, GIF, BMP, TIFF or WebP image"
        )
        raise BadRequest(f"{name}: {error.problem.split('; ')[0]}; {fix}") from None
    return search_json(results[0], k)


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


def _search_text(searcher: Searcher, text: str, k: int) -> dict:
    if not isinstance(text, str):
        raise BadRequest("'text' must be a form field, not a file")
    if not text.strip():
        raise BadRequest("the 'text' field is empty; type words to search for")
    if len(text) > TEXT_LIMIT:
        raise BadRequest(f"the text is {len(text)} characters; send at most {TEXT_LIMIT}")
    try:
        results = searcher.search_text([text], k)
    except UserError as error:
        fix = "; send an image instead" if not searcher.has_text else ""
        raise BadRequest(f"{error}{fix}") from None
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


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused with 413 (at once when its
    Content-Length says so, else as soon as that many bytes have arrived)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self.limit
            except ValueError:
                return await _send_error(send, 400, "the Content-Length header is not a number")
            if too_large:
                return await _send_error(send, 413, self._message())
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BadRequest(self._message(), 413)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BadRequest as error:  # raised while the body was read, outside a route
            if not started:
                await _send_error(send, error.status, error.message)

    def _message(self) -> str:
        return (
            f"the request is over the {_megabytes(self.limit - FORM_OVERHEAD)} upload limit; "
            "send a smaller image"
        )


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


__all__ = ["create_app", "search_json", "BadRequest"]
