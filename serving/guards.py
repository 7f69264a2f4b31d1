"""The service's ASGI middleware that guards the routes: a request body's size
(:class:`BodyLimit`) and the time it may take to arrive (:class:`BodyTimeout`), the API key
(:class:`ApiKey`) and OPTIONS answered for every route (:class:`AnswerOptions`).

Each is a plain ASGI app wrapping the next one (``Middleware(app, **options)``), so it sees the
request before FastAPI does and refuses with the service's one-line JSON
(:func:`serving.errors.send_error`).
"""

from __future__ import annotations

import asyncio
import hmac
from http.cookies import SimpleCookie
from urllib.parse import unquote

from starlette.routing import Match

from serving.errors import BadRequest, send_error

# The cookie the page sets once the user has typed the key: images (<img src>) cannot send a
# header, cookies they do. SameSite=Strict: another site's page cannot send it.
KEY_COOKIE = "tfcbir_key"


class BodyLimit:
    """A request body over ``limit`` bytes is refused with 413 ``message`` (at once when its
    Content-Length says so, else as soon as that many bytes have arrived)."""

    def __init__(self, app, limit: int, message: str):
        self.app, self.limit, self.message = app, limit, message

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self.limit
            except ValueError:
                return await send_error(send, 400, "the Content-Length header is not a number")
            if too_large:
                return await send_error(send, 413, self.message)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BadRequest(self.message, 413)
            return message

        await _refusing(self.app, scope, limited_receive, send)


class BodyTimeout:
    """A request body that has not all arrived ``seconds`` after the request began is refused
    with 408 and its connection closed (a stalled or trickled upload holds no worker). Waiting
    for a disconnect after the body (as streamed answers do) is not timed."""

    def __init__(self, app, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        complete = False

        async def timed_receive():
            nonlocal complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                raise BadRequest(
                    f"the request's body did not arrive within {self.seconds:g} s; "
                    "send it again on a faster connection",
                    408,
                ) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await _refusing(self.app, scope, timed_receive, send)


class ApiKey:
    """Requests without ``key`` get 401, except to the ``open_paths`` and the paths under
    ``open_prefixes`` (the page, its assets, the health check). The key is read from ``Authorization: Bearer <key>``, ``X-API-Key`` or
    the page's cookie; compared in constant time."""

    def __init__(
        self, app, key: str, open_paths: tuple[str, ...] = (), open_prefixes: tuple[str, ...] = ()
    ):
        self.app, self.key = app, key.encode()
        self.open_paths, self.open_prefixes = frozenset(open_paths), open_prefixes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self._is_open(scope["path"]):
            return await self.app(scope, receive, send)
        given = request_key(dict(scope.get("headers") or []))
        if given is None or not hmac.compare_digest(given.encode(), self.key):
            what = "a wrong API key" if given else "no API key"
            return await send_error(
                send,
                401,
                f"{what}: send the service's key as 'Authorization: Bearer <key>' or "
                "'X-API-Key: <key>' (the page asks for it)",
                {"WWW-Authenticate": 'Bearer realm="tfcbir"'},
            )
        await self.app(scope, receive, send)

    def _is_open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(self.open_prefixes)


def request_key(headers: dict[bytes, bytes]) -> str | None:
    """The API key a request carries (header ``Authorization: Bearer``, ``X-API-Key``, or the
    page's cookie), or None."""
    authorization = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if headers.get(b"x-api-key"):
        return headers[b"x-api-key"].decode("latin-1").strip()
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
    except Exception:  # a malformed Cookie header: as if there were none
        return None
    return unquote(cookie[KEY_COOKIE].value) if KEY_COOKIE in cookie else None


class AnswerOptions:
    """``OPTIONS <path>``: 204 with ``Allow`` listing the methods of the route at that path
    (404 for none). A CORS preflight reaches this only when no CORS origin is allowed (the
    CORS middleware, outside, answers the rest): it then carries no CORS headers."""

    def __init__(self, app, router):
        self.app, self.router = app, router

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "OPTIONS":
            return await self.app(scope, receive, send)
        methods = set()
        for route in self.router.routes:
            match, _ = route.matches({**scope, "method": "GET"})
            if match != Match.NONE:
                methods |= set(getattr(route, "methods", None) or {"GET", "HEAD"})
        if not methods:
            return await send_error(send, 404, "Not Found")
        allow = ", ".join(sorted(methods | {"OPTIONS"}))
        await send(
            {
                "type": "http.response.start",
                "status": 204,
                "headers": [(b"allow", allow.encode()), (b"content-length", b"0")],
            }
        )
        await send({"type": "http.response.body", "body": b""})


async def _refusing(app, scope, receive, send) -> None:
    """``app`` called with a ``receive`` that may raise BadRequest: answered with its JSON
    unless the response has begun already."""
    started = False

    async def tracking_send(message):
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, receive, tracking_send)
    except BadRequest as error:  # raised while the body was read, outside a route
        if not started:
            await send_error(send, error.status, error.message, error.headers)


__all__ = ["BodyLimit", "BodyTimeout", "ApiKey", "AnswerOptions", "KEY_COOKIE", "request_key"]
