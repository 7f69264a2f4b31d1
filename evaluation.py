"""Score retrieval: ``python evaluation.py -c <config> -t 100 -r 10``.

Picks -t random queries (seeded; -t 0: every query), retrieves -r answers each from the gallery
of the config's eval.protocol and prints mAP (AP@r), Precision@1, Recall@1/2/4/8, MAP@R,
R-precision and NMI. The result is also saved under <run>/evaluation/.

``--text-queries`` scores a dual encoder's text queries instead: each class's prompt against the
test images (mAP@r, Recall@1/5/10) and, where they have captions, caption-to-image and
image-to-caption Recall@1/5/10, beside chance (see retrieval/text_queries.py).

``--verification`` answers "are these two images the same item?": every query-gallery pair of the
protocol as same-class or different-class, ROC AUC, equal error rate and the score threshold at
--false-match-rate (saved for ``cbir.py --same-item``).
"""

from __future__ import annotations

import argparse
import json

import config
from retrieval import evaluate, text_queries
from retrieval.embedder import load_text_encoder
from retrieval.rerank import add_rerank_argument, flag_spec
from retrieval.verification import DEFAULT_FALSE_MATCH_RATE
from tfcbir.cli import add_checkpoint_argument, add_config_argument, import_tensorflow, run


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.text_queries:
        return _text_queries(args, config.load(args.config))
    cfg = config.load(args.config)
    if args.verification:
        result = evaluate.verify_run(
            cfg,
            false_match_rate=args.false_match_rate,
            seed=args.seed,
            config_path=args.config,
            checkpoint=args.checkpoint,
        )
        print(json.dumps(result) if args.json else evaluate.verification_report(result))
        return 0
    result = evaluate.evaluate_run(
        cfg,
        queries=args.queries,
        r=args.retrieve,
        seed=args.seed,
        ap_denominator=args.ap_denominator,
        config_path=args.config,
        checkpoint=args.checkpoint,
        nmi=not args.no_nmi,
        rerank=flag_spec(args.rerank),
    )
    print(json.dumps(result, indent=None) if args.json else evaluate.report(result))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_argument(parser)
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
    add_checkpoint_argument(parser)
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
    add_rerank_argument(parser)
    parser.add_argument(
        "--verification",
        action="store_true",
        help="same-class vs different-class pairs: ROC AUC, equal error rate and the score "
        "threshold at --false-match-rate (saved for cbir.py --same-item)",
    )
    parser.add_argument(
        "--false-match-rate",
        type=float,
        default=DEFAULT_FALSE_MATCH_RATE,
        help="with --verification: the false match rate the threshold allows (default 0.001)",
    )
    return parser


def _text_queries(args, cfg: dict) -> int:
    import_tensorflow()  # the text tower embeds the prompts and captions
    encoder = load_text_encoder(cfg, args.checkpoint)
    result = text_queries.evaluate_text(
        cfg, encoder, r=args.retrieve, config_path=args.config, checkpoint=args.checkpoint
    )
    print(json.dumps(result, indent=None) if args.json else text_queries.report(result))
    return 0


if __name__ == "__main__":
    run(main)
