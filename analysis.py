"""Analyse a run's embedding space: ``python analysis.py -c <config> [--split test]``.

Writes a report of the gallery of one set (default: the set the evaluation protocol queries)
into <run>/analysis/<split>/: clustering scores (k-means, agglomerative, DBSCAN, HDBSCAN against
the classes), 2-D maps, per-class Recall@1 and MAP@R, the nearest-neighbour class confusion and
the training curves, as PNG files and one page, index.html. --compare other.json puts another run
beside it on the same images (<split>-vs-<other>/); --baseline the model before training
(<split>-vs-baseline/). Large sets are sampled (seeded) where a part would be slow; the report
says where.

--duplicates [--threshold t] instead groups the set's near-duplicate images (pairs scoring at or
above t, default the run's same-item threshold from evaluation.py --verification) into
<run>/analysis/duplicates-<split>.csv and duplicates-<split>.png; see docs/analysis.md.
"""

from __future__ import annotations

import argparse
import json

import config
from tfcbir import UserError
from tfcbir.cli import add_checkpoint_argument, add_config_argument, import_tensorflow, run


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.duplicates or args.threshold is not None:
        return _duplicates(args)
    from report.build import Limits, analyze, summary  # matplotlib

    if args.compare and args.baseline:
        raise UserError("--compare and --baseline each add a second model; give one of them")
    cfg = config.load(args.config)
    other = config.load(args.compare) if args.compare else None
    if args.baseline:
        import_tensorflow()
    result = analyze(
        cfg,
        split=args.split,
        compare=other,
        baseline=args.baseline,
        out=args.out,
        seed=args.seed,
        limits=Limits(
            map_points=args.map_points,
            cluster_points=args.cluster_points,
            queries=args.queries,
            thumbnails=args.thumbnails,
            dbscan_quantile=args.dbscan_quantile,
        ),
        config_path=args.config,
        compare_path=args.compare,
        checkpoint=args.checkpoint,
    )
    print(json.dumps(result) if args.json else summary(result))
    return 0


def _duplicates(args: argparse.Namespace) -> int:
    """--duplicates: the near-duplicate groups of one set, instead of the report."""
    from report.build import default_split
    from report.duplicates import find_duplicates, summary

    if not args.duplicates:
        raise UserError("--threshold goes with --duplicates")
    if args.compare or args.baseline:
        raise UserError("--duplicates looks at one run; leave out --compare and --baseline")
    cfg = config.load(args.config)
    result = find_duplicates(
        cfg,
        args.split or default_split(cfg),
        args.threshold,
        config_path=args.config,
        checkpoint=args.checkpoint,
    )
    print(json.dumps(result) if args.json else summary(result))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_argument(parser)
    parser.add_argument(
        "--split",
        help="the set to analyse: train, test, all, query or gallery (default: the set the "
        "evaluation protocol queries); embed it first with embed.py",
    )
    parser.add_argument("--compare", metavar="CONFIG", help="another run to put beside this one")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="put the untrained model (ImageNet or random init, per model.weights) beside it",
    )
    parser.add_argument(
        "--duplicates",
        action="store_true",
        help="group the set's near-duplicate images (a CSV and a picture in <run>/analysis/) "
        "instead of the report",
    )
    parser.add_argument(
        "--threshold",
        metavar="SCORE",
        help="with --duplicates: pairs scoring at or above it are duplicates (cosine, or the "
        "negative distance; default: the run's threshold from evaluation.py --verification)",
    )
    add_checkpoint_argument(parser)
    parser.add_argument("--out", help="report folder (default: <run>/analysis/<split>...)")
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    parser.add_argument("--seed", type=int, default=0, help="seed of every sample and method")
    parser.add_argument(
        "--map-points", type=int, default=5000, help="points on each 2-D map (default 5000)"
    )
    parser.add_argument(
        "--cluster-points",
        type=int,
        default=5000,
        help="images for agglomerative, DBSCAN, HDBSCAN and silhouettes (default 5000)",
    )
    parser.add_argument(
        "--queries",
        type=int,
        default=10000,
        help="leave-one-out queries for per-class retrieval; 0: every image (default 10000)",
    )
    parser.add_argument(
        "--thumbnails",
        type=int,
        default=400,
        help="images drawn on the thumbnail map; 0: none (default 400)",
    )
    parser.add_argument(
        "--dbscan-quantile",
        type=float,
        default=0.5,
        help="DBSCAN's eps: this quantile of the distance to the 4th nearest neighbour, about "
        "the share of core points (default 0.5)",
    )
    return parser


if __name__ == "__main__":
    run(main)
