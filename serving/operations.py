"""Running the service: one JSON access-log line per request (:class:`AccessLog`, logger
``tfcbir_access``) and its Prometheus metrics (:class:`Metrics`, served at ``/metrics``).

A log line holds ``method``, ``route`` (the route's pattern, e.g. ``/api/similar/{index}``; the
path for an unknown one), ``status``, ``ms``, ``bytes`` (of the answer) and ``k`` (when asked);
never an upload's name, its pixels or a text query. A client that disconnects before its
answer is one line with status 499 (nginx's "client closed request") and ``"error": "client
disconnected"``: no traceback.
"""

from __future__ import annotations

import json
import logging
import time
from urllib.parse import parse_qs

import uvicorn
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.requests import ClientDisconnect

# Not under "tfcbir": its lines are not the CLI's messages (and go where serve.py says).
ACCESS_LOGGER = "tfcbir_access"
DISCONNECTED = 499  # nginx's status for a request whose client went away
# Seconds: a "more like this" answers in ~1 ms, an upload in ~20 ms, a big decode in ~1 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The service's Prometheus metrics, in a registry of their own (one per app):
    ``tfcbir_requests_total{route,method,status}``, ``tfcbir_request_seconds{route}`` (a
    histogram), ``tfcbir_gallery_size``, ``tfcbir_decodes_waiting`` and
    ``tfcbir_gallery_reloads_total``."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tfcbir_requests",
            "HTTP requests answered, by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tfcbir_request_seconds",
            "Time from a request's start to its answer, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.gallery_size = Gauge(
            "tfcbir_gallery_size", "Items in the gallery being searched", registry=self.registry
        )
        self.decodes_waiting = Gauge(
            "tfcbir_decodes_waiting",
            "Image searches decoding or queued for a decoder",
            registry=self.registry,
        )
        self.reloads = Counter(
            "tfcbir_gallery_reloads",
            "Galleries swapped in while serving (a re-embedded file, or POST /api/reload)",
            registry=self.registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def text(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class AccessLog:
    """ASGI middleware (the outermost): logs one JSON line per HTTP request to
    ``tfcbir_access`` at INFO and counts it in ``metrics``; a client's disconnect
    (starlette's ClientDisconnect) ends the request quietly."""

    def __init__(self, app, metrics: Metrics | None = None):
        self.app, self.metrics = app, metrics
        self.logger = logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status, sent, error = None, 0, None

        async def watching_send(message):
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except ClientDisconnect:
            status, error = DISCONNECTED, "client disconnected"
        except BaseException:  # a bug (ServerErrorMiddleware answers 500) or a cancellation
            status, error = status or 500, "the server failed"
            raise
        finally:
            self._record(scope, status or DISCONNECTED, sent, time.perf_counter() - started, error)

    def _record(self, scope, status: int, sent: int, seconds: float, error: str | None) -> None:
        route = scope.get("route")
        pattern = getattr(route, "path", None)
        line = {
            "method": scope["method"],
            "route": pattern or scope["path"],
            "status": status,
            "ms": round(seconds * 1000, 2),
            "bytes": 0 if scope["method"] == "HEAD" else sent,  # uvicorn sends no body
        }
        k = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("k")
        if k:
            line["k"] = int(k[0]) if k[0].isdigit() else k[0][:20]
        if error:
            line["error"] = error
        self.logger.info(json.dumps(line))
        if self.metrics is not None:
            # An unknown path is not a label: a scan of random paths must not grow the metrics.
            self.metrics.observe(pattern or "(unmatched)", scope["method"], status, seconds)


def uvicorn_config(app, host: str, port: int, *, keep_alive: float = 5.0) -> uvicorn.Config:
    """How serve.py runs ``app``: uvicorn's own access log off (:class:`AccessLog` writes it),
    its other messages from warnings up, idle keep-alive connections closed after
    ``keep_alive`` seconds."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=keep_alive,
    )


def log_to_stderr() -> None:
    """The access log's lines, as they are, on stderr (serve.py; tests read the logger)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


__all__ = [
    "AccessLog",
    "Metrics",
    "uvicorn_config",
    "ACCESS_LOGGER",
    "DISCONNECTED",
    "log_to_stderr",
]
