"""How the service refuses a request: :class:`BadRequest` (raised by routes and middleware) and
the one-line JSON answer every refusal gets, ``{"error": "<one line>"}``."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse

# Refusals after which the connection is closed: the rest of the request's body (too large, or
# not arriving) is not read, so the connection cannot carry another request.
CLOSING_STATUSES = frozenset({408, 413})


class BadRequest(Exception):
    """A request the client can fix: answered ``status`` with ``{"error": message}``, and
    ``headers`` (e.g. Retry-After on a 503)."""

    def __init__(self, message: str, status: int = 400, headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.headers = message, status, dict(headers or {})


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """The JSON refusal as a response (routes and exception handlers)."""
    headers = dict(headers or {})
    if status in CLOSING_STATUSES:
        headers["Connection"] = "close"
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


async def send_error(send, status: int, message: str, headers: dict | None = None) -> None:
    """The JSON refusal sent through an ASGI ``send`` (middleware, before any route)."""
    body = json.dumps({"error": one_line(message)}).encode()
    extra = dict(headers or {})
    if status in CLOSING_STATUSES:
        extra["connection"] = "close"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *((name.lower().encode(), str(value).encode()) for name, value in extra.items()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def one_line(message: object) -> str:
    return " ".join(str(message).split())


__all__ = ["BadRequest", "CLOSING_STATUSES", "error_response", "send_error", "one_line"]
