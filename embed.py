"""Embed images with a trained model into HDF5 galleries: ``python embed.py -c <config>``.

By default the sets the evaluation protocol needs are embedded (e.g. train and test) into
<data_dir>/trainings/<name>/embeddings/<set>.h5. Re-running after an interruption resumes; a
gallery already made by the same model is kept.

To share the work among n machines or GPUs, each embeds one part, ``--shard i/n`` (into
<set>.shard-<i>-of-<n>.h5), and then one of them joins the parts with ``--merge``, which checks
that every part is there once and all come from the same model, config and image list. The
shards are kept after merging.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runs.folder import RunFolder
from tfcbir.cli import import_tensorflow, run


def main(argv: list[str]) -> int:
    from retrieval.sets import SET_NAMES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", required=True, help="training config (.json or .yaml)")
    parser.add_argument(
        "--split",
        choices=SET_NAMES,
        help="the set to embed (default: the sets eval.protocol uses)",
    )
    parser.add_argument("-o", "--output", type=Path, help="gallery file (with one --split only)")
    parser.add_argument(
        "--checkpoint", type=Path, help="weights to use instead of the run's best.weights.h5"
    )
    parser.add_argument(
        "--index",
        help="exact, or a FAISS factory string such as IVF4096,Flat "
        "(default: the config's index.type)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help="embed only part I of N (0 <= I < N) of each set, into <set>.shard-I-of-N.h5 "
        "(--merge joins the parts and builds the index)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="join the checked shards of each set into <set>.h5 (the shards are kept)",
    )
    args = parser.parse_args(argv)
    import_tensorflow()

    import config
    from retrieval import sets
    from retrieval.shards import parse_shard
    from tfcbir import UserError

    shard = parse_shard(args.shard) if args.shard is not None else None
    if shard and args.merge:
        raise UserError("--shard embeds one part and --merge joins the parts; give one of them")
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
    if args.merge:
        return _merge(args, cfg, names, made, index)

    from retrieval.embedder import embed_images, load_embedder
    from retrieval.shards import embed_shard, shard_path, shard_range

    embedder = load_embedder(cfg, args.checkpoint)
    for name in names:
        images = sets.images(cfg, name, made)
        out = args.output or RunFolder.of(cfg).gallery(name)
        if shard is None:
            print(f"embedding {len(images)} {name} images -> {out}", file=sys.stderr)
            path = embed_images(
                embedder, images, out, split=name, batch_size=args.batch_size, progress=_progress
            )
        else:
            start, stop = shard_range(len(images), *shard)
            items = f"items {start} to {stop - 1}" if stop > start else "no items"
            print(
                f"embedding shard {shard[0]}/{shard[1]} of the {len(images)} {name} images "
                f"({items}) -> {shard_path(out, *shard)}",
                file=sys.stderr,
            )
            path = embed_shard(
                embedder,
                images,
                out,
                shard,
                split=name,
                batch_size=args.batch_size,
                progress=_progress,
            )
        print(file=sys.stderr)
        if shard is None:
            _build_index(cfg, path, index)
        print(path)
    return 0


def _merge(args, cfg: dict, names: list[str], made, index: str) -> int:
    """--merge: check the shards of every set first, then write each merged gallery."""
    import config
    from retrieval import sets
    from retrieval.gallery import GalleryIdentity
    from retrieval.shards import check_shards, list_hash
    from runs.weights import expected_model_id

    model_id = expected_model_id(cfg, args.checkpoint)
    checked = []
    for name in names:
        images = sets.images(cfg, name, made)
        command = f"python embed.py -c {args.config} --split {name}"
        if args.output is not None:
            command += f" -o {args.output}"
        if args.checkpoint is not None:
            command += f" --checkpoint {args.checkpoint}"
        checked.append(
            check_shards(
                args.output or RunFolder.of(cfg).gallery(name),
                images,
                split=name,
                expect=GalleryIdentity(model_id, config.model_hash(cfg), list_hash(images)),
                command=command,
            )
        )
    for shards in checked:
        path = shards.merge()
        count, total, dropped = len(shards.shards), len(shards.images), len(shards.dropped)
        left_out = f", {dropped} unreadable left out" if dropped else ""
        print(
            f"merged {count} shards of the {shards.split} set ({total - dropped} of {total} "
            f"images{left_out}) -> {path}; the shards are kept: delete "
            f"{path.parent / path.stem}.shard-*-of-{count}.h5 when no longer needed",
            file=sys.stderr,
        )
        _build_index(cfg, path, index)
        print(path)
    return 0


def _build_index(cfg: dict, path: Path, index: str) -> None:
    if index == "exact":
        return
    from retrieval.faiss_index import build_index
    from retrieval.gallery import read_gallery

    built = build_index(
        read_gallery(path), index, search_parameters=cfg["index"]["search_parameters"]
    )
    print(f"index {index} -> {built}", file=sys.stderr)


def _progress(done: int, total: int) -> None:
    if sys.stderr.isatty() or done == total:
        end = "" if sys.stderr.isatty() else "\n"
        print(f"\r{done}/{total} images", end=end, file=sys.stderr, flush=True)


if __name__ == "__main__":
    run(main)
