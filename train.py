"""Train an embedding network: ``python train.py -c trainings/<name>.json [--restart]``.

Everything goes to <data_dir>/trainings/<name>/; running the same command again resumes from the
newest checkpoint. ``--check [--json]`` checks the config and the data without training (the
layout, the splits, the validation holdout, the evaluation protocol, unreadable images) and exits
with 0 when everything is usable, 1 when some images are unreadable (a run would skip them).
"""

from __future__ import annotations

import argparse
import json
import sys

import config
from tfcbir import UserError
from tfcbir.cli import add_config_argument, import_tensorflow, run
from training.check import check, report
from training.validation import VALIDATION_METRICS


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_argument(parser)
    parser.add_argument(
        "--restart",
        action="store_true",
        help="discard the run's checkpoints and logs and start from step 0",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the config and the data without training: layout, classes and images per "
        "split, validation holdout, evaluation protocol, unreadable images (exit 1 if any)",
    )
    parser.add_argument("--json", action="store_true", help="with --check: the report as JSON")
    args = parser.parse_args(argv)
    if args.json and not args.check:
        raise UserError("--json formats the --check report; give --check too")
    if args.check:
        return _check(args)
    import_tensorflow()
    from training.trainer import train  # TensorFlow and Keras

    result = train(config.load(args.config), restart=args.restart)
    if result.interrupted:
        return 130
    loss = "" if result.loss is None else f", loss {result.loss:.4f}"
    print(
        f"done: step {result.step}{loss}, model {result.run.best_weights}{_best_text(result.best)}"
    )
    return 0


def _best_text(best: dict | None) -> str:
    """`` (validation Recall@1 0.7750 at step 1500)`` (or MAP@R), or "" without a score."""
    for key, name in VALIDATION_METRICS.values():
        if (best or {}).get(key) is not None:
            return f" (validation {name} {best[key]:.4f} at step {best['step']})"
    return ""


def _check(args) -> int:
    result = check(config.load(args.config), progress=_progress())
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 1 if result["unreadable"] else 0


def _progress():
    """A progress(done, total) that shows one line on a terminal, updated in place, and a line at
    every tenth elsewhere (a log file)."""
    tty, shown = sys.stderr.isatty(), [-1]

    def progress(done: int, total: int) -> None:
        if tty:
            end = "\n" if done == total else ""
            print(f"\rchecking images: {done:,}/{total:,}", end=end, file=sys.stderr, flush=True)
        elif done * 10 // total > shown[0]:
            shown[0] = done * 10 // total
            print(f"checking images: {done:,}/{total:,}", file=sys.stderr, flush=True)

    return progress


if __name__ == "__main__":
    run(main)
