"""Score retrieval: ``python evaluation.py -c <config> -t 100 -r 10``.

Picks -t random queries (seeded; -t 0: every query), retrieves -r answers each from the gallery
of the config's eval.protocol and prints mAP (AP@r), Precision@1, Recall@1/2/4/8, MAP@R,
R-precision and NMI. The result is also saved under <run>/evaluation/.

``--text-queries`` scores a dual encoder's text queries instead: each class's prompt against the
test images (mAP@r, Recall@1/5/10) and, where they have captions, caption-to-image and
image-to-caption Recall@1/5/10, beside chance (see retrieval/text_queries.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tfcbir.cli import run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", required=True, help="training config (.json or .yaml)")
    parser.add_argument(
        "-t",
        "--queries",
        type=int,
        default=100,
        help="number of random queries; 0: all (default 100)",
    )
    parser.add_argument(
        "-r",
        "--retrieve",
        type=int,
        default=10,
        help="answers retrieved per query: the r of AP@r (default 10)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the query sample and of NMI's k-means"
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="the weights the galleries were embedded with (embed.py --checkpoint); "
        "default: the run's best.weights.h5",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--no-nmi",
        action="store_true",
        help="leave NMI out (k-means over the whole query set: the slowest part for many classes)",
    )
    parser.add_argument(
        "--ap-denominator",
        choices=["min_r_g", "found"],
        default="min_r_g",
        help="AP@r's denominator: min(r, G) (default), or 'found' as the "
        "original system did (inflates mAP; for comparison only)",
    )
    parser.add_argument(
        "--text-queries",
        action="store_true",
        help="score text queries (class prompts, captions) of a model with a text tower",
    )
    args = parser.parse_args(argv)

    import config

    if args.text_queries:
        return _text_queries(args, config.load(args.config))
    from retrieval.evaluate import evaluate_run, report

    cfg = config.load(args.config)
    result = evaluate_run(
        cfg,
        queries=args.queries,
        r=args.retrieve,
        seed=args.seed,
        ap_denominator=args.ap_denominator,
        config_path=args.config,
        checkpoint=args.checkpoint,
        nmi=not args.no_nmi,
    )
    print(json.dumps(result, indent=None) if args.json else report(result))
    return 0


def _text_queries(args, cfg: dict) -> int:
    from tfcbir.cli import import_tensorflow

    import_tensorflow()  # the text tower embeds the prompts and captions
    from retrieval.embedder import load_text_encoder
    from retrieval.text_queries import evaluate_text, report

    encoder = load_text_encoder(cfg, args.checkpoint)
    result = evaluate_text(
        cfg, encoder, r=args.retrieve, config_path=args.config, checkpoint=args.checkpoint
    )
    print(json.dumps(result, indent=None) if args.json else report(result))
    return 0


if __name__ == "__main__":
    run(main)
