"""Answer image queries: ``python cbir.py -c <config> -r 10 photo.jpg [more.jpg | folder ...]``.

Queries are image files, folders of images, or list files (--list, one path a line); they are
embedded in batches and searched in the gallery of the config's eval.protocol (or --gallery).
Prints each query's ranked answers, or one JSON document with --json; --save writes pictures.
Exit code: 0 when every query was answered, 1 when some could not be read, 2 when none.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tfcbir.cli import import_tensorflow, run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", required=True, help="training config (.json or .yaml)")
    parser.add_argument("-r", "--retrieve", type=int, default=10, help="answers per query")
    parser.add_argument("queries", nargs="*", type=Path, help="image files or folders")
    parser.add_argument(
        "--list",
        type=Path,
        action="append",
        default=[],
        help="a text file naming one query image a line",
    )
    parser.add_argument(
        "--gallery",
        choices=["train", "test", "all", "query", "gallery"],
        help="the embedded set to search (default: the protocol's gallery)",
    )
    parser.add_argument("--index", help="exact or the FAISS factory string embed.py built")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="weights to use instead of the run's best.weights.h5 (embed.py --checkpoint)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--save",
        type=Path,
        help="picture file (several queries: one file each, named after the query)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    import_tensorflow()

    import config
    from datasets.images import is_image_name
    from retrieval import answers
    from retrieval.searcher import Searcher
    from tfcbir import UserError

    cfg = config.load(args.config)
    paths = _query_paths(args.queries, args.list, is_image_name)
    searcher = Searcher.open(
        cfg,
        gallery=args.gallery,
        index=args.index,
        checkpoint=args.checkpoint,
        config_path=args.config,
    )
    gallery = searcher.gallery
    answers.check_r(args.retrieve, gallery)
    failed: list[int] = []
    results = []
    for result in searcher.search_files(
        paths,
        args.retrieve,
        batch_size=args.batch_size,
        on_error=lambda i, _message: failed.append(i),
    ):
        results.append(result)
        if not args.json:
            print(result.table() + "\n")
        if args.save:
            query = paths[result.position]
            out = (
                args.save
                if len(paths) == 1
                else args.save.with_name(f"{args.save.stem}_{query.stem}{args.save.suffix}")
            )
            saved = answers.picture(query, result.query_class, result.answers, gallery, out)
            print(f"picture: {saved}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "gallery": str(gallery.path),
                    "r": args.retrieve,
                    "results": [result.as_json() for result in results],
                    "unreadable": [str(paths[i]) for i in sorted(failed)],
                },
                indent=2,
            )
        )
    if not results:
        raise UserError(f"none of the {len(paths)} query images could be read (see above)")
    return 1 if failed else 0


def _query_paths(items: list[Path], lists: list[Path], is_image_name) -> list[Path]:
    """Files as given, folders' images (recursively, sorted), and the paths in list files."""
    from tfcbir import UserError

    paths: list[Path] = []
    for list_file in lists:
        if not list_file.is_file():
            raise UserError(f"--list {list_file}: no such file")
        lines = list_file.read_text(encoding="utf-8").splitlines()
        paths += [Path(line.strip()) for line in lines if line.strip()]
    for item in items:
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and is_image_name(p.name))
            if not found:
                raise UserError(f"{item}: the folder holds no images")
            paths += found
        else:
            paths.append(item)  # a missing or broken file is reported when it is read
    if not paths:
        raise UserError("no query given; name image files, folders or --list files")
    return paths


if __name__ == "__main__":
    run(main)
