"""What every CLI script shares: quiet TensorFlow, logging, the flags several scripts take, and
the one place UserError is caught.

A script's ``main(argv)`` does its work; ``run(main)`` sets TensorFlow's environment (before
``main`` can import it), turns a UserError into one line on stderr and exit code 2, Ctrl-C into
exit code 130, and leaves every other exception's traceback alone (it is a bug). Importing this
module changes nothing: a benchmark or a test that imports TensorFlow itself calls
:func:`quiet_tensorflow` first.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tfcbir import UserError


def quiet_tensorflow() -> None:
    """Silence TensorFlow's start-up chatter and turn on oneDNN's CPU kernels (off by default in
    tensorflow-cpu 2.21, 2.6x faster ResNet50 steps here: benchmarks/cpu_opts.py); must run
    before TensorFlow is imported. Values the user set are kept."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


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


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """-c/--config, the run's training config: every script takes it."""
    parser.add_argument("-c", "--config", required=True, help="training config (.json or .yaml)")


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """--checkpoint: the weights a script uses instead of the run's best ones."""
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="weights to use instead of the run's best.weights.h5; a gallery embedded with "
        "embed.py --checkpoint is read with the same --checkpoint",
    )


def add_gallery_argument(parser: argparse.ArgumentParser, set_names: Sequence[str]) -> None:
    """--gallery, one of ``set_names`` (retrieval.sets.SET_NAMES): the embedded set to search."""
    parser.add_argument(
        "--gallery",
        choices=set_names,
        help="the embedded set to search (default: the protocol's gallery)",
    )


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the commands that search a run's gallery: --index and --checkpoint (the
    weights the gallery was embedded with); :func:`add_gallery_argument` adds --gallery."""
    parser.add_argument("--index", help="exact or the FAISS factory string embed.py built")
    add_checkpoint_argument(parser)


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Call ``main`` and exit with its code; a UserError becomes ``error: ...`` and exit 2.

    TensorFlow's environment is set first: a script imports TensorFlow only inside ``main``."""
    quiet_tensorflow()
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
