"""Query with a random test image: ``python test.py -c <config> -r 10``.

Prints the ranked answers (rank, score, class, path, whether the class matches) and saves a
picture of the query beside its top r under <run>/queries/. ``--text`` queries a dual encoder
with words instead: ``--text "a red bag"``, or ``--text`` alone for a random test image's caption
(its class prompt when it has none), whose class then marks the matches.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import config
from datasets.captions import image_captions, load_caption_table
from datasets.lists import ImageList
from retrieval import answers, sets
from retrieval.answers import Answer
from retrieval.rerank import add_rerank_argument, flag_spec
from retrieval.searcher import Searcher
from retrieval.text_queries import class_prompts_of, slug
from runs.folder import RunFolder
from tfcbir import UserError
from tfcbir.cli import add_config_argument, add_search_arguments, import_tensorflow, run


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    import_tensorflow()
    if args.text is not None:
        return _text_query(args)
    return _image_query(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_argument(parser)
    parser.add_argument("-r", "--retrieve", type=int, default=10, help="answers to show")
    parser.add_argument("--seed", type=int, help="pick the query with this seed (default: any)")
    add_search_arguments(parser)
    add_rerank_argument(parser)
    parser.add_argument("--save", type=Path, help="picture file (default: <run>/queries/)")
    parser.add_argument(
        "--text",
        nargs="?",
        const="",
        metavar="TEXT",
        help="a text query (needs a text tower); alone: a random test image's caption",
    )
    return parser


def _image_query(args) -> int:
    """A random query image's answers: printed as a table and drawn into a picture."""
    cfg = config.load(args.config)
    searcher = Searcher.open(
        cfg,
        index=args.index,
        checkpoint=args.checkpoint,
        rerank=flag_spec(args.rerank),
        config_path=args.config,
        text=False,
    )
    answers.check_r(args.retrieve, searcher.gallery, searcher.protocol.leave_one_out)
    candidates = sets.images(cfg, searcher.protocol.queries)
    pick, path, ranked = _search_random_image(searcher, candidates, args.retrieve, args.seed)
    relative = candidates.paths[pick]
    class_name = candidates.classes[int(candidates.labels[pick])]
    print(answers.table(relative, class_name, ranked))
    out = args.save or RunFolder.of(cfg).queries / f"test-{Path(relative).stem}.png"
    print(f"picture: {answers.picture(path, class_name, ranked, searcher.gallery, out)}")
    return 0


def _search_random_image(
    searcher: Searcher, candidates: ImageList, r: int, seed: int | None
) -> tuple[int, str, list[Answer]]:
    """The first readable of up to 20 random ``candidates`` (seeded) and its ``r`` answers:
    ``(position in candidates, absolute path, answers)``."""
    absolute = candidates.absolute_paths()
    rng = np.random.default_rng(seed)
    for pick in rng.permutation(len(candidates))[:20]:  # a broken file: try another image
        relative = candidates.paths[pick]
        # Leave-one-out: the query is a gallery item, left out of its own answers.
        itself = searcher.position(relative) if searcher.protocol.leave_one_out else None
        found = list(
            searcher.search_files(
                [absolute[pick]],
                r,
                labels=[int(candidates.labels[pick])],
                exclude=[itself],
            )
        )
        if found:
            return pick, absolute[pick], found[0].answers
    raise UserError(f"no readable query image found in {candidates.root}")


def _text_query(args) -> int:
    """A text query's answers (``--text`` alone: a random query image's caption or class
    prompt, whose class marks the matches): printed as a table and drawn into a picture."""
    cfg = config.load(args.config)
    searcher = Searcher.open(
        cfg,
        index=args.index,
        checkpoint=args.checkpoint,
        rerank=flag_spec(args.rerank),
        config_path=args.config,
        images=False,
        text=True,
    )
    answers.check_r(args.retrieve, searcher.gallery)
    text, label = " ".join(args.text.split()), None
    if not text:
        text, label = _random_caption(cfg, searcher, args.seed)
    result = searcher.search_text([text], args.retrieve, labels=[label])[0]
    print(result.table())
    if result.unknown_words:
        print(f"unknown words (read as unknown): {', '.join(result.unknown_words)}")
    out = args.save or RunFolder.of(cfg).queries / f"text-{slug(text)}.png"
    picture = answers.text_picture(text, result.query_class, result.answers, searcher.gallery, out)
    print(f"picture: {picture}")
    return 0


def _random_caption(cfg: dict, searcher: Searcher, seed: int | None) -> tuple[str, int]:
    """A random query image's caption, or its class prompt when it has none, and its label."""
    candidates = sets.images(cfg, searcher.protocol.queries)
    pick = int(np.random.default_rng(seed).integers(len(candidates)))
    label = int(candidates.labels[pick])
    table = load_caption_table(config.data_root(cfg), cfg["data"]["captions"]["file"])
    own = image_captions(candidates.subset([pick]), table, None).texts
    text = own[0] if own else class_prompts_of(cfg, [candidates.classes[label]])[0][0]
    print(f"text of {candidates.paths[pick]}: {text!r}")
    return text, label


if __name__ == "__main__":
    run(main)
