"""Answer image and text queries: ``python cbir.py -c <config> -r 10 photo.jpg [more.jpg | folder
...] [--text "a red handbag" ...]``.

Queries are image files, folders of images, or list files (--list, one path a line); they are
embedded in batches and searched in the gallery of the config's eval.protocol (or --gallery).
--text queries (a dual encoder's) are embedded by its text tower and searched in the same
gallery. Prints each query's ranked answers, or one JSON document with --json; --save writes
pictures. Exit code: 0 when every query was answered, 1 when some could not be read, 2 when none.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tfcbir.cli import add_search_arguments, import_tensorflow, run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", required=True, help="training config (.json or .yaml)")
    parser.add_argument("-r", "--retrieve", type=int, default=10, help="answers per query")
    parser.add_argument("queries", nargs="*", type=Path, help="image files or folders")
    parser.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="TEXT",
        help='a text query, e.g. --text "a red handbag" (repeat for several; needs a model '
        "with a text tower)",
    )
    parser.add_argument(
        "--list",
        type=Path,
        action="append",
        default=[],
        help="a text file naming one query image a line",
    )
    add_search_arguments(parser)
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
    from retrieval.text_queries import slug
    from tfcbir import UserError

    cfg = config.load(args.config)
    texts = _texts(args.text)
    paths = _query_paths(args.queries, args.list, is_image_name, allow_none=bool(texts))
    # Each tower is loaded only if a query needs it; their identity (both towers) checks the
    # gallery.
    searcher = Searcher.open(
        cfg,
        gallery=args.gallery,
        index=args.index,
        checkpoint=args.checkpoint,
        config_path=args.config,
        images=bool(paths),
        text=bool(texts),
    )
    gallery = searcher.gallery
    answers.check_r(args.retrieve, gallery)
    count = len(paths) + len(texts)
    failed: list[int] = []
    results = []

    def out_path(stem: str) -> Path:
        if count == 1:
            return args.save
        return args.save.with_name(f"{args.save.stem}_{stem}{args.save.suffix}")

    if paths:
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
                out = out_path(query.stem)
                saved = answers.picture(query, result.query_class, result.answers, gallery, out)
                print(f"picture: {saved}", file=sys.stderr)
    for result in searcher.search_text(texts, args.retrieve) if texts else []:
        text, unknown = result.query, result.unknown_words
        if unknown:
            print(
                f"warning: --text {text!r}: {', '.join(map(repr, unknown))} "
                f"{'is' if len(unknown) == 1 else 'are'} not in the text tower's vocabulary "
                "(the training captions' words) and read as unknown",
                file=sys.stderr,
            )
        results.append(result)
        if not args.json:
            print(result.table() + "\n")
        if args.save:
            stem = f"text{result.position + 1}-{slug(text)}" if len(texts) > 1 else slug(text)
            saved = answers.text_picture(text, None, result.answers, gallery, out_path(stem))
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


def _texts(texts: list[str]) -> list[str]:
    """The --text queries, blanks refused."""
    from tfcbir import UserError

    cleaned = [" ".join(text.split()) for text in texts]
    if any(not text for text in cleaned):
        raise UserError('--text: an empty query; give words, e.g. --text "a red handbag"')
    return cleaned


def _query_paths(
    items: list[Path], lists: list[Path], is_image_name, allow_none: bool = False
) -> list[Path]:
    """Files as given, folders' images (recursively, sorted), and the paths in list files;
    none at all is an error unless ``allow_none`` (there are text queries)."""
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
    if not paths and not allow_none:
        raise UserError(
            'no query given; name image files, folders or --list files, or --text "..."'
        )
    return paths


if __name__ == "__main__":
    run(main)
