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

from tfcbir.cli import import_tensorflow, run


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
    from retrieval import answers, sets
    from retrieval.embedder import load_embedder, load_text_encoder
    from retrieval.evaluate import open_gallery
    from retrieval.faiss_index import open_index
    from retrieval.text_queries import open_text_gallery, slug
    from tfcbir import UserError

    cfg = config.load(args.config)
    texts = _texts(args.text)
    paths = _query_paths(args.queries, args.list, is_image_name, allow_none=bool(texts))
    name = args.gallery or sets.protocol(cfg).gallery
    # Each model is loaded only if a query needs it; their identity (both towers) checks the
    # gallery.
    encoder = load_text_encoder(cfg, args.checkpoint) if texts else None
    embedder = load_embedder(cfg, args.checkpoint) if paths else None
    if encoder is not None:
        gallery = open_text_gallery(cfg, name, encoder, args.config, args.checkpoint)
    else:
        gallery = open_gallery(cfg, name, args.config, embedder.model_id, args.checkpoint)
    answers.check_r(args.retrieve, gallery)
    index = open_index(
        gallery,
        args.index or cfg["index"]["type"],
        search_parameters=cfg["index"]["search_parameters"],
        config_path=args.config,
    )
    count = len(paths) + len(texts)
    failed: list[int] = []
    results = []

    def out_path(stem: str) -> Path:
        if count == 1:
            return args.save
        return args.save.with_name(f"{args.save.stem}_{stem}{args.save.suffix}")

    if embedder is not None:
        for indices, embeddings in embedder.embed_files(
            [str(p) for p in paths],
            batch_size=args.batch_size,
            on_error=lambda i, _message: failed.append(i),
        ):
            labels = [_known_class(paths[i], gallery) for i in indices]
            ranked = answers.rank(index, gallery, embeddings, labels, args.retrieve)
            for i, label, found in zip(indices, labels, ranked):
                class_name = None if label is None else gallery.classes[label]
                results.append(answers.as_json(str(paths[i]), class_name, found))
                if not args.json:
                    print(answers.table(str(paths[i]), class_name, found) + "\n")
                if args.save:
                    saved = answers.picture(
                        paths[i], class_name, found, gallery, out_path(paths[i].stem)
                    )
                    print(f"picture: {saved}", file=sys.stderr)
    if encoder is not None:
        ranked = answers.rank(
            index, gallery, encoder.embed(texts), [None] * len(texts), args.retrieve
        )
        for n, (text, found) in enumerate(zip(texts, ranked)):
            unknown = encoder.unknown_words(text)
            if unknown:
                print(
                    f"warning: --text {text!r}: {', '.join(map(repr, unknown))} "
                    f"{'is' if len(unknown) == 1 else 'are'} not in the text tower's vocabulary "
                    "(the training captions' words) and read as unknown",
                    file=sys.stderr,
                )
            results.append(answers.text_as_json(text, None, found, unknown))
            if not args.json:
                print(answers.text_table(text, None, found) + "\n")
            if args.save:
                stem = f"text{n + 1}-{slug(text)}" if len(texts) > 1 else slug(text)
                saved = answers.text_picture(text, None, found, gallery, out_path(stem))
                print(f"picture: {saved}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "gallery": str(gallery.path),
                    "r": args.retrieve,
                    "results": results,
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


def _known_class(path: Path, gallery) -> int | None:
    """A query inside a class folder of the gallery's data set has that class."""
    try:
        Path(path).resolve().relative_to(Path(gallery.data_root).resolve())
    except ValueError:
        return None
    folder = Path(path).parent.name
    return gallery.classes.index(folder) if folder in gallery.classes else None


if __name__ == "__main__":
    run(main)
