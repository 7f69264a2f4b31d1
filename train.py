"""Train an embedding network: ``python train.py -c trainings/<name>.json [--restart]``.

Everything goes to <data_dir>/trainings/<name>/; running the same command again resumes from the
newest checkpoint.
"""

from __future__ import annotations

import argparse

from tfcbir.cli import import_tensorflow, run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", required=True, help="training config (.json or .yaml)")
    parser.add_argument(
        "--restart",
        action="store_true",
        help="discard the run's checkpoints and logs and start from step 0",
    )
    args = parser.parse_args(argv)
    import_tensorflow()

    import config
    from training.trainer import train

    result = train(config.load(args.config), restart=args.restart)
    if result.interrupted:
        return 130
    best = result.best or {}
    loss = "" if result.loss is None else f", loss {result.loss:.4f}"
    print(
        f"done: step {result.step}{loss}, model {result.run.best_weights}"
        + (
            f" (validation Recall@1 {best['val_recall@1']:.4f} at step {best['step']})"
            if best.get("val_recall@1") is not None
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    run(main)
