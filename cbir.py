"""Answer image and text queries with a run's gallery: its most similar images, ranked.

    python cbir.py -c <config> -r 10 photo.jpg [more.jpg | folder ...] [--text "a red handbag" ...]

Queries are image files, folders of images, or list files (--list, one path a line); they are
embedded in batches and searched in the gallery of the config's eval.protocol (or --gallery).
--text queries (a dual encoder's) are embedded by its text tower and searched in the same
gallery. Prints each query's ranked answers, or one JSON document with --json; --save writes
pictures. --where filters the answers by the images' attributes (<data root>/metadata.csv and
their class), e.g. --where "category == 'tote' and price < 100". Exit code: 0 when every query
was answered, 1 when some could not be read, 2 when none.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import config
from datasets.images import is_image_name
from retrieval import answers, evaluate
from retrieval.gallery import Gallery
from retrieval.rerank import add_rerank_argument, flag_spec
from retrieval.searcher import Result, Searcher
from retrieval.sets import SET_NAMES
from retrieval.text_queries import slug
from tfcbir import UserError
from tfcbir.cli import (
    add_config_argument,
    add_gallery_argument,
    add_search_arguments,
    import_tensorflow,
    run,
)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    import_tensorflow()
    cfg = config.load(args.config)
    texts = _texts(args.text)
    paths = _query_paths(args.queries, args.list, allow_none=bool(texts))
    # Each tower is loaded only if a query needs it; their identity (both towers) checks the
    # gallery.
    searcher = Searcher.open(
        cfg,
        gallery=args.gallery,
        index=args.index,
        checkpoint=args.checkpoint,
        rerank=flag_spec(args.rerank),
        config_path=args.config,
        images=bool(paths),
        text=bool(texts),
    )
    answers.check_r(args.retrieve, searcher.gallery)
    searcher.where_mask(args.where)  # a bad expression is refused before any query is embedded
    if args.same_item:
        args.same_item = evaluate.same_item_threshold(cfg, searcher.gallery.model_id)
    count = len(paths) + len(texts)
    results, failed = _search_images(searcher, paths, args, count)
    results += _search_texts(searcher, texts, args, count)
    if args.json:
        unreadable = [paths[i] for i in sorted(failed)]
        _print_json(searcher.gallery, args, results, unreadable)
    if not results:
        raise UserError(f"none of the {len(paths)} query images could be read (see above)")
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_argument(parser)
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
    add_gallery_argument(parser, SET_NAMES)
    add_search_arguments(parser)
    add_rerank_argument(parser)
    parser.add_argument(
        "--where",
        metavar="EXPR",
        help="answer only with images whose attributes match, e.g. \"category == 'tote' and "
        "price < 100\" (columns: <data root>/metadata.csv's and class)",
    )
    parser.add_argument(
        "--same-item",
        action="store_const",
        const=True,
        help="mark the answers that score at or above the run's verification threshold "
        "(measured by evaluation.py --verification) as the same item",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--save",
        type=Path,
        help="picture file (several queries: one file each, named after the query)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    return parser


def _search_images(
    searcher: Searcher, paths: list[Path], args, count: int
) -> tuple[list[Result], list[int]]:
    """Answer the query images, printing each one's answers (unless --json) and saving its
    picture (--save) as it comes: ``(results, positions in paths of the unreadable)``."""
    results: list[Result] = []
    failed: list[int] = []
    if not paths:
        return results, failed
    for result in searcher.search_files(
        paths,
        args.retrieve,
        batch_size=args.batch_size,
        on_error=lambda i, _message: failed.append(i),
        where=args.where,
    ):
        results.append(result)
        if not args.json:
            print(_table(result, args.same_item) + "\n")
        if args.save:
            query = paths[result.position]
            out = _picture_file(args.save, count, query.stem)
            picture = answers.picture(
                query, result.query_class, result.answers, searcher.gallery, out
            )
            print(f"picture: {picture}", file=sys.stderr)
    return results, failed


def _search_texts(searcher: Searcher, texts: list[str], args, count: int) -> list[Result]:
    """Answer the --text queries, warning of unknown words, printing each one's answers (unless
    --json) and saving its picture (--save)."""
    results: list[Result] = []
    found = searcher.search_text(texts, args.retrieve, where=args.where) if texts else []
    for result in found:
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
            print(_table(result, args.same_item) + "\n")
        if args.save:
            stem = f"text{result.position + 1}-{slug(text)}" if len(texts) > 1 else slug(text)
            out = _picture_file(args.save, count, stem)
            picture = answers.text_picture(text, None, result.answers, searcher.gallery, out)
            print(f"picture: {picture}", file=sys.stderr)
    return results


def _picture_file(save: Path, count: int, stem: str) -> Path:
    """--save itself for one query; for several, one file each: <save stem>_<stem><suffix>."""
    if count == 1:
        return save
    return save.with_name(f"{save.stem}_{stem}{save.suffix}")


def _table(result: Result, threshold: float | None) -> str:
    """The answers' table; with --same-item, a line naming the answers at or above the run's
    verification threshold (the same item, as evaluation.py --verification measured it)."""
    if threshold is None:
        return result.table()
    same = [str(a.rank) for a in result.answers if a.score >= threshold]
    line = f"the same item (score >= {threshold:.4f}): "
    line += f"rank {', '.join(same)}" if same else "none of these"
    return result.table() + "\n" + line


def _print_json(gallery: Gallery, args, results: list[Result], unreadable: list[Path]) -> None:
    """--json: every query's answers (with --same-item, each marked ``same_item``) and the
    query images that could not be read."""
    records = [result.as_json() for result in results]
    if args.same_item is not None:
        for record in records:
            for answer in record["answers"]:
                answer["same_item"] = answer["score"] >= args.same_item
    document = {
        "gallery": str(gallery.path),
        "r": args.retrieve,
        "results": records,
        "unreadable": [str(path) for path in unreadable],
    }
    if args.same_item is not None:
        document["same_item_threshold"] = args.same_item
    print(json.dumps(document, indent=2))


def _texts(texts: list[str]) -> list[str]:
    """The --text queries, blanks refused."""
    cleaned = [" ".join(text.split()) for text in texts]
    if any(not text for text in cleaned):
        raise UserError('--text: an empty query; give words, e.g. --text "a red handbag"')
    return cleaned


def _query_paths(items: list[Path], lists: list[Path], allow_none: bool = False) -> list[Path]:
    """Files as given, folders' images (recursively, sorted), and the paths in list files;
    none at all is an error unless ``allow_none`` (there are text queries)."""
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
