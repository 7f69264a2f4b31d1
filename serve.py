"""Serve the search page and API: ``python serve.py -c <config> [--host 127.0.0.1] [--port 8000]``.

Loads the run's model, gallery and index once (as cbir.py does), then answers on
http://<host>:<port>/: the page (drop an image, see its answers, click one for more like it)
and the API (POST /api/search, GET /api/similar/<i>, GET /api/gallery/<i>, GET /healthz,
GET /metrics; see docs/service.md). Bound to localhost unless --host says otherwise; another
address needs --api-key-file (or --public). A rewritten gallery (embed.py again) is served
without a restart. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import socket
from pathlib import Path

import config
from retrieval.searcher import Searcher
from retrieval.sets import SET_NAMES
from tfcbir import UserError
from tfcbir.cli import (
    add_config_argument,
    add_gallery_argument,
    add_search_arguments,
    import_tensorflow,
    run,
)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    _check_numbers(args)
    try:  # the optional serving packages (requirements-serve.txt)
        import uvicorn

        from serving.app import MB, create_app
        from serving.operations import log_to_stderr, uvicorn_config
    except ImportError as error:
        raise UserError(
            f"serving needs {error.name}; install it: pip install -r requirements-serve.txt"
        ) from None
    api_key = _read_key(args.api_key_file) if args.api_key_file else None
    _check_exposure(args.host, api_key, args.public)
    _check_address(args.host, args.port)  # before minutes of loading
    import_tensorflow()
    cfg = config.load(args.config)
    searcher = _open(cfg, args)
    app = create_app(
        searcher,
        max_upload_bytes=int(args.max_upload_mb * MB),
        max_pixels=args.max_pixels,
        decoders=args.decoders,
        decode_queue=args.decode_queue,
        body_timeout=args.body_timeout,
        api_key=api_key,
        cors_origins=tuple(args.cors_origin),
        reload_every=args.reload_every,
    )
    shown = f"[{args.host}]" if ":" in args.host else args.host
    logging.getLogger("tfcbir").info(
        "searching %s (%d images) of run %s: http://%s:%d/%s",
        searcher.gallery.path,
        len(searcher),
        cfg["name"],
        shown,
        args.port,
        " (the API key is required)" if api_key else "",
    )
    log_to_stderr()
    uvicorn.Server(uvicorn_config(app, args.host, args.port, keep_alive=args.keep_alive)).run()
    return 0


def _open(cfg: dict, args: argparse.Namespace) -> Searcher:
    try:
        return Searcher.open(
            cfg,
            gallery=args.gallery,
            index=args.index,
            checkpoint=args.checkpoint,
            config_path=args.config,
        )
    except UserError as error:  # the commands it suggests, with this config's path
        raise UserError(str(error).replace("-c <config>", f"-c {args.config}")) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_argument(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    add_gallery_argument(parser, SET_NAMES)
    add_search_arguments(parser)
    parser.add_argument(
        "--max-upload-mb", type=float, default=20, help="largest upload accepted, in MB"
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        help="largest image accepted, in pixels (checked before decoding; default: 64 x the "
        "model input's pixels, at least 12.6 M)",
    )
    _add_operation_arguments(parser)
    return parser


def _add_operation_arguments(parser: argparse.ArgumentParser) -> None:
    """How much work the service takes on, who may use it, and how it runs."""
    parser.add_argument(
        "--decoders", type=int, default=2, help="uploads decoded at once (each costs memory)"
    )
    parser.add_argument(
        "--decode-queue", type=int, default=16, help="uploads that may wait (503 beyond)"
    )
    parser.add_argument(
        "--body-timeout", type=float, default=30, help="seconds a request body may take (408)"
    )
    parser.add_argument(
        "--keep-alive", type=float, default=5, help="seconds an idle connection is kept open"
    )
    parser.add_argument(
        "--api-key-file",
        type=Path,
        help="a file holding the key every API request must send (Authorization: Bearer <key> "
        "or X-API-Key); the page asks for it once",
    )
    parser.add_argument(
        "--public",
        action="store_true",
        help="allow a non-loopback --host without --api-key-file (anyone may search)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="an origin (https://example.org) whose pages may call the API; repeat for more",
    )
    parser.add_argument(
        "--reload-every",
        type=float,
        default=5,
        help="seconds between looks at the gallery file for a re-embedded gallery (0: never)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes: 1 (one process holds the model; see docs/service.md)",
    )


def _check_numbers(args: argparse.Namespace) -> None:
    """UserError for an option out of range (before anything is loaded)."""
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: give a port from 1 to 65535")
    pixels_ok = args.max_pixels is None or args.max_pixels > 0
    if not (math.isfinite(args.max_upload_mb) and args.max_upload_mb > 0) or not pixels_ok:
        raise UserError("--max-upload-mb and --max-pixels must be positive (and finite)")
    if args.decoders < 1 or args.decode_queue < 0:
        raise UserError("--decoders must be at least 1 and --decode-queue at least 0")
    for name in ("body_timeout", "keep_alive"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--{name.replace('_', '-')} {value:g}: give a number of seconds > 0")
    if not (math.isfinite(args.reload_every) and args.reload_every >= 0):
        raise UserError(f"--reload-every {args.reload_every:g}: give seconds >= 0 (0: never)")
    if args.workers != 1:
        raise UserError(
            f"--workers {args.workers}: serve.py runs one process, which holds the model, the "
            "gallery and the index once (each more worker would load them again, as much "
            "memory as the first) and uses every core for the model already; to serve more, "
            "run several serve.py on other ports behind a proxy"
        )


def _read_key(path: Path) -> str:
    try:
        key = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--api-key-file {path}: cannot be read ({error})") from None
    if len(key) < 8 or any(c.isspace() for c in key):
        raise UserError(
            f"--api-key-file {path}: the key must be one word of at least 8 characters; "
            "make one with: python -c 'import secrets; print(secrets.token_urlsafe())'"
        )
    return key


def _check_exposure(host: str, api_key: str | None, public: bool) -> None:
    """UserError for a --host beyond this machine without a key, unless --public says so."""
    if api_key is not None or public or is_loopback(host):
        return
    raise UserError(
        f"--host {host}: the service would be open to the network without a key; give "
        "--api-key-file <file> (a key clients must send), or --public to serve anyone"
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or "localhost") is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _check_address(host: str, port: int) -> None:
    """UserError unless (host, port) can be listened on (uvicorn itself would only log it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(
                f"--host {host} --port {port}: cannot listen there ({error.strerror or error}); "
                "choose another --port, or stop what uses it"
            ) from None


if __name__ == "__main__":
    run(main)
