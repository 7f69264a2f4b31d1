"""Serve the search page and API: ``python serve.py -c <config> [--host 127.0.0.1] [--port 8000]``.

Loads the run's model, gallery and index once (as cbir.py does), then answers on
http://<host>:<port>/: the page (drop an image, see its answers, click one for more like it)
and the API (POST /api/search, GET /api/similar/<i>, GET /api/gallery/<i>, GET /healthz; see
the README). Bound to localhost unless --host says otherwise. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import logging
import math
import socket

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
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: give a port from 1 to 65535")
    if not (math.isfinite(args.max_upload_mb) and args.max_upload_mb > 0) or args.max_pixels <= 0:
        raise UserError("--max-upload-mb and --max-pixels must be positive (and finite)")
    try:  # the optional serving packages (requirements-serve.txt)
        import uvicorn

        from serving.app import MB, create_app
    except ImportError as error:
        raise UserError(
            f"serving needs {error.name}; install it: pip install -r requirements-serve.txt"
        ) from None
    _check_address(args.host, args.port)  # before minutes of loading
    import_tensorflow()
    cfg = config.load(args.config)
    searcher = Searcher.open(
        cfg,
        gallery=args.gallery,
        index=args.index,
        checkpoint=args.checkpoint,
        config_path=args.config,
    )
    app = create_app(
        searcher, max_upload_bytes=int(args.max_upload_mb * MB), max_pixels=args.max_pixels
    )
    shown = f"[{args.host}]" if ":" in args.host else args.host
    logging.getLogger("tfcbir").info(
        "searching %s (%d images) of run %s: http://%s:%d/",
        searcher.gallery.path,
        len(searcher),
        cfg["name"],
        shown,
        args.port,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


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
        default=40_000_000,
        help="largest image accepted, in pixels (checked before decoding)",
    )
    return parser


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
