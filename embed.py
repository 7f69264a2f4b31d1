"""Embed images with a trained model into HDF5 galleries: ``python embed.py -c <config>``.

By default the sets the evaluation protocol needs are embedded (e.g. train and test) into
<data_dir>/trainings/<name>/embeddings/<set>.h5. Re-running after an interruption resumes; a
gallery already made by the same model is kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tfcbir.cli import run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", required=True, help="training config (.json or .yaml)")
    parser.add_argument("--split", choices=["train", "test", "all", "query", "gallery"],
                        help="the set to embed (default: the sets eval.protocol uses)")
    parser.add_argument("-o", "--output", type=Path, help="gallery file (with one --split only)")
    parser.add_argument("--checkpoint", type=Path,
                        help="weights to use instead of the run's best.weights.h5")
    parser.add_argument("--index", help="exact, or a FAISS factory string such as IVF4096,Flat "
                        "(default: the config's index.type)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    import config
    from retrieval import sets
    from retrieval.embedder import embed_images, load_embedder
    from tfcbir import UserError

    cfg = config.load(args.config)
    if args.output is not None and args.split is None:
        raise UserError("-o/--output names one gallery file; give --split too")
    made = None if args.split in ("query", "gallery") else sets.splits(cfg)
    if args.split:
        names = [args.split]
    else:
        protocol = sets.protocol(cfg, made)
        names = list(dict.fromkeys([protocol.gallery, protocol.queries]))
    index = args.index or cfg["index"]["type"]
    embedder = load_embedder(cfg, args.checkpoint)
    for name in names:
        images = sets.images(cfg, name, made)
        out = args.output or sets.gallery_file(cfg, name)
        print(f"embedding {len(images)} {name} images -> {out}", file=sys.stderr)
        path = embed_images(embedder, images, out, split=name, batch_size=args.batch_size,
                            progress=_progress)
        print(file=sys.stderr)
        if index != "exact":
            from retrieval.faiss_index import build_index
            from retrieval.gallery import read_gallery

            built = build_index(read_gallery(path), index,
                                search_parameters=cfg["index"]["search_parameters"])
            print(f"index {index} -> {built}", file=sys.stderr)
        print(path)
    return 0


def _progress(done: int, total: int) -> None:
    if sys.stderr.isatty() or done == total:
        end = "" if sys.stderr.isatty() else "\n"
        print(f"\r{done}/{total} images", end=end, file=sys.stderr, flush=True)


if __name__ == "__main__":
    run(main)
