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
    """Silence TensorFlow's C++ start-up chatter; must run before TensorFlow is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


quiet_tensorflow()  # every CLI imports this module first


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
