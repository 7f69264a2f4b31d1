"""What every CLI script shares: quiet TensorFlow, logging, and the one place UserError is caught.

A script's ``main(argv)`` does its work; ``run(main)`` turns a UserError into one line on stderr
and exit code 2, Ctrl-C into exit code 130, and leaves every other exception's traceback alone
(it is a bug).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from tfcbir import UserError


def quiet_tensorflow() -> None:
    """Silence TensorFlow's start-up chatter and turn on oneDNN's CPU kernels (off by default in
    tensorflow-cpu 2.21, 2.6x faster ResNet50 steps here: benchmarks/cpu_opts.py); must run
    before TensorFlow is imported. Values the user set are kept."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


quiet_tensorflow()  # every CLI imports this module first


def import_tensorflow() -> None:
    """Import TensorFlow with its C++ start-up lines (oneDNN notice, absl preamble) silenced.

    TF_CPP_MIN_LOG_LEVEL does not reach them, so stderr's file descriptor is pointed at
    /dev/null while TensorFlow loads and runs its first op; Python errors still surface.
    """
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    sys.stderr.flush()
    os.dup2(null, 2)
    try:
        import tensorflow as tf

        # The first op prints the rest of the start-up lines; it also starts TensorFlow's
        # runtime, which a multi-worker run (TF_CONFIG) must configure first.
        if not os.environ.get("TF_CONFIG"):
            tf.constant(1) + 1
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class _Format(logging.Formatter):
    def format(self, record):
        text = super().format(record)
        return f"warning: {text}" if record.levelno == logging.WARNING else text


def setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format("%(message)s"))
    logger = logging.getLogger("tfcbir")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def add_search_arguments(parser, *, gallery: bool = True) -> None:
    """The flags of the commands that search a run's gallery: --gallery (the set), --index and
    --checkpoint (the weights the gallery was embedded with)."""
    from pathlib import Path

    from retrieval.sets import SET_NAMES

    if gallery:
        parser.add_argument(
            "--gallery",
            choices=SET_NAMES,
            help="the embedded set to search (default: the protocol's gallery)",
        )
    parser.add_argument("--index", help="exact or the FAISS factory string embed.py built")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="weights to use instead of the run's best.weights.h5 (embed.py --checkpoint)",
    )


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Call ``main`` and exit with its code; a UserError becomes ``error: ...`` and exit 2."""
    setup_logging()
    try:
        code = main(sys.argv[1:] if argv is None else argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
