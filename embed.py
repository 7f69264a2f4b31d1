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

import config
from config.schema import LANCE_INDEX_TYPES
from retrieval import sets
from retrieval.embedder import embed_images, load_embedder, update_gallery
from retrieval.faiss_index import build_index, update_index
from retrieval.gallery import GalleryIdentity, read_gallery
from retrieval.lance_gallery import (
    finish_parts,
    part_written,
    publish_set,
    reindex,
    store_of,
    up_to_date,
    update_set,
    uses_lancedb,
    write_part,
)
from retrieval.sets import SET_NAMES
from retrieval.shards import (
    check_shards,
    embed_shard,
    list_hash,
    parse_shard,
    shard_path,
    shard_range,
)
from runs.folder import RunFolder
from runs.weights import expected_model_id
from tfcbir import UserError
from tfcbir.cli import add_checkpoint_argument, add_config_argument, import_tensorflow, run


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    import_tensorflow()
    shard = parse_shard(args.shard) if args.shard is not None else None
    if shard and args.merge:
        raise UserError("--shard embeds one part and --merge joins the parts; give one of them")
    cfg = config.load(args.config)
    if args.output is not None and args.split is None:
        raise UserError("-o/--output names one gallery file; give --split too")
    _check_update_flags(args, shard)
    made = None if args.split in ("query", "gallery") else sets.splits(cfg)
    names = _set_names(cfg, args.split, made)
    index = args.index or cfg["index"]["type"]
    lance = uses_lancedb(cfg)
    if lance:
        _check_lance_flags(args, index)
    if args.merge:
        return _merge(args, cfg, names, made, index)
    embedder = load_embedder(cfg, args.checkpoint)
    for name in names:
        if lance:
            print(_lance_set(embedder, args, cfg, name, made, shard, index))
            continue
        if args.update:
            path = _update_set(embedder, args, cfg, name, made, index)
        else:
            path = _embed_set(embedder, args, cfg, name, made, shard)
            if shard is None:
                _build_index(cfg, path, index)
        print(path)
    return 0


def _check_update_flags(args, shard) -> None:
    if args.verify and not args.update:
        raise UserError("--verify checks the files' contents during an update; give --update too")
    if args.update and (shard is not None or args.merge):
        raise UserError(
            "--update brings whole galleries up to date; embed shards without it (--shard, "
            "--merge), then update the merged gallery"
        )


def _check_lance_flags(args, index: str) -> None:
    if index not in LANCE_INDEX_TYPES:
        raise UserError(
            f"--index {index}: not a LanceDB index (index.backend lancedb); use one of "
            f"{', '.join(LANCE_INDEX_TYPES)}"
        )
    if args.merge:
        raise UserError(
            "--merge: with index.backend lancedb each --shard worker writes its part into the "
            "table, and the last one finishes the gallery; there is nothing to merge"
        )


def _lance_set(embedder, args, cfg: dict, name: str, made, shard, index: str) -> str:
    """index.backend lancedb: embed set ``name`` (or part ``shard`` of it, or only its changes
    with --update) into its table; the table's location."""
    images = sets.images(cfg, name, made)
    store = store_of(cfg, name)
    record = store.record()  # read once: what the table holds now
    identity = embedder.gallery_identity(images)
    if args.update and record is not None:
        report = update_set(
            embedder,
            store,
            name,
            images,
            verify=args.verify,
            batch_size=args.batch_size,
            progress=_progress,
            config_path=args.config,
        )
        print(f"updated {store.location}: {report.summary()}", file=sys.stderr)
    elif up_to_date(record, identity):
        print(f"{store.location} is up to date: nothing to embed", file=sys.stderr)
        line = reindex(cfg, store, record, index)
        if line is not None:
            print(line, file=sys.stderr)
    elif shard is not None and part_written(store, shard, identity):
        line = finish_parts(cfg, store, images, shard, index)
        print(f"part {shard[0]}/{shard[1]} is in the table already; {line}", file=sys.stderr)
    else:
        path = _embed_set(embedder, args, cfg, name, made, shard)
        if shard is None:
            line = publish_set(cfg, store, path, images, index)
        else:
            line = write_part(cfg, store, path, shard, images, index)
        print(line, file=sys.stderr)
    return store.location


def _update_set(embedder, args, cfg: dict, name: str, made, index: str) -> Path:
    """--update: embed set ``name``'s new and changed images into its gallery, drop the removed
    ones (a set without a gallery yet is embedded whole); the index follows."""
    images = sets.images(cfg, name, made)
    out = args.output or RunFolder.of(cfg).gallery(name)
    if not out.exists():
        print(
            f"{out} does not exist yet: embedding all {len(images)} {name} images", file=sys.stderr
        )
        path = embed_images(
            embedder, images, out, split=name, batch_size=args.batch_size, progress=_progress
        )
        _build_index(cfg, path, index)
        return path
    report = update_gallery(
        embedder,
        images,
        out,
        split=name,
        verify=args.verify,
        batch_size=args.batch_size,
        progress=_progress,
        config_path=args.config,
    )
    print(f"updated {out}: {report.summary()}", file=sys.stderr)
    if index != "exact":
        gallery = read_gallery(out)
        _, line = update_index(
            gallery, report, index, search_parameters=cfg["index"]["search_parameters"]
        )
        print(line, file=sys.stderr)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_argument(parser)
    parser.add_argument(
        "--split",
        choices=SET_NAMES,
        help="the set to embed (default: the sets eval.protocol uses)",
    )
    parser.add_argument("-o", "--output", type=Path, help="gallery file (with one --split only)")
    add_checkpoint_argument(parser)
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
    parser.add_argument(
        "--update",
        action="store_true",
        help="bring existing galleries up to date with the data set: embed only new and changed "
        "images (by size and modification time), drop removed ones",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="with --update: find changed images by their contents (reads every file)",
    )
    return parser


def _set_names(cfg: dict, split: str | None, made) -> list[str]:
    """The sets to embed: ``split``, or the gallery and query sets of the evaluation protocol."""
    if split:
        return [split]
    protocol = sets.protocol(cfg, made)
    return list(dict.fromkeys([protocol.gallery, protocol.queries]))


def _embed_set(embedder, args, cfg: dict, name: str, made, shard) -> Path:
    """Embed set ``name`` (only part ``shard`` = (i, n) of it when given); the file written."""
    images = sets.images(cfg, name, made)
    out = args.output or RunFolder.of(cfg).gallery(name)
    if shard is None:
        print(f"embedding {len(images)} {name} images", file=sys.stderr)  # stdout names the file
        return embed_images(
            embedder, images, out, split=name, batch_size=args.batch_size, progress=_progress
        )
    start, stop = shard_range(len(images), *shard)
    items = f"items {start} to {stop - 1}" if stop > start else "no items"
    print(
        f"embedding shard {shard[0]}/{shard[1]} of the {len(images)} {name} images "
        f"({items}) -> {shard_path(out, *shard)}",
        file=sys.stderr,
    )
    return embed_shard(
        embedder, images, out, shard, split=name, batch_size=args.batch_size, progress=_progress
    )


def _merge(args, cfg: dict, names: list[str], made, index: str) -> int:
    """--merge: check the shards of every set first, then write each merged gallery."""
    model_id = expected_model_id(cfg, args.checkpoint)
    checked = []
    for name in names:
        images = sets.images(cfg, name, made)
        checked.append(
            check_shards(
                args.output or RunFolder.of(cfg).gallery(name),
                images,
                split=name,
                expect=GalleryIdentity(model_id, config.model_hash(cfg), list_hash(images)),
                command=_embed_command(args, name),
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


def _embed_command(args, name: str) -> str:
    """The embed.py command that makes set ``name``'s shards (a missing shard's fix)."""
    command = f"python embed.py -c {args.config} --split {name}"
    if args.output is not None:
        command += f" -o {args.output}"
    if args.checkpoint is not None:
        command += f" --checkpoint {args.checkpoint}"
    return command


def _build_index(cfg: dict, path: Path, index: str) -> None:
    if index == "exact":
        return
    built = build_index(
        read_gallery(path), index, search_parameters=cfg["index"]["search_parameters"]
    )
    print(f"index {index} -> {built}", file=sys.stderr)


def _progress(done: int, total: int) -> None:
    """``done/total images``, redrawn in place on a terminal; the last count ends the line."""
    if sys.stderr.isatty() or done == total:
        end = "\n" if done == total else ""
        print(f"\r{done}/{total} images", end=end, file=sys.stderr, flush=True)


if __name__ == "__main__":
    run(main)
