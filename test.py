"""Query with a random test image: ``python test.py -c <config> -r 10``.

Prints the ranked answers (rank, score, class, path, whether the class matches) and saves a
picture of the query beside its top r under <run>/queries/. ``--text`` queries a dual encoder
with words instead: ``--text "a red bag"``, or ``--text`` alone for a random test image's caption
(its class prompt when it has none), whose class then marks the matches.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from runs.folder import RunFolder
from tfcbir.cli import add_search_arguments, import_tensorflow, run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", required=True, help="training config (.json or .yaml)")
    parser.add_argument("-r", "--retrieve", type=int, default=10, help="answers to show")
    parser.add_argument("--seed", type=int, help="pick the query with this seed (default: any)")
    add_search_arguments(parser, gallery=False)
    parser.add_argument("--save", type=Path, help="picture file (default: <run>/queries/)")
    parser.add_argument(
        "--text",
        nargs="?",
        const="",
        metavar="TEXT",
        help="a text query (needs a text tower); alone: a random test image's caption",
    )
    args = parser.parse_args(argv)
    import_tensorflow()
    if args.text is not None:
        return _text_query(args)

    import numpy as np

    import config
    from retrieval import answers, sets
    from retrieval.searcher import Searcher
    from tfcbir import UserError

    cfg = config.load(args.config)
    searcher = Searcher.open(
        cfg, index=args.index, checkpoint=args.checkpoint, config_path=args.config, text=False
    )
    protocol = searcher.protocol
    answers.check_r(args.retrieve, searcher.gallery, protocol.leave_one_out)
    candidates = sets.images(cfg, protocol.queries)
    absolute = candidates.absolute_paths()
    rng = np.random.default_rng(args.seed)
    for pick in rng.permutation(len(candidates))[:20]:  # a broken file: try another image
        relative = candidates.paths[pick]
        # Leave-one-out: the query is a gallery item, left out of its own answers.
        itself = searcher.position(relative) if protocol.leave_one_out else None
        found = list(
            searcher.search_files(
                [absolute[pick]],
                args.retrieve,
                labels=[int(candidates.labels[pick])],
                exclude=[itself],
            )
        )
        if found:
            break
    else:
        raise UserError(f"no readable query image found in {candidates.root}")
    path = absolute[pick]
    class_name = candidates.classes[int(candidates.labels[pick])]
    ranked = found[0].answers
    print(answers.table(relative, class_name, ranked))
    out = args.save or RunFolder.of(cfg).queries / f"test-{Path(relative).stem}.png"
    print(f"picture: {answers.picture(path, class_name, ranked, searcher.gallery, out)}")
    return 0


def _text_query(args) -> int:
    import numpy as np

    import config
    from datasets.captions import image_captions, load_caption_table
    from retrieval import answers, sets
    from retrieval.searcher import Searcher
    from retrieval.text_queries import class_prompts_of, slug

    cfg = config.load(args.config)
    searcher = Searcher.open(
        cfg,
        index=args.index,
        checkpoint=args.checkpoint,
        config_path=args.config,
        images=False,
        text=True,
    )
    answers.check_r(args.retrieve, searcher.gallery)
    text, label = " ".join(args.text.split()), None
    if not text:  # a random test image's caption, or its class prompt
        candidates = sets.images(cfg, searcher.protocol.queries)
        pick = int(np.random.default_rng(args.seed).integers(len(candidates)))
        label = int(candidates.labels[pick])
        table = load_caption_table(config.data_root(cfg), cfg["data"]["captions"]["file"])
        own = image_captions(candidates.subset([pick]), table, None).texts
        text = own[0] if own else class_prompts_of(cfg, [candidates.classes[label]])[0][0]
        print(f"text of {candidates.paths[pick]}: {text!r}")
    result = searcher.search_text([text], args.retrieve, labels=[label])[0]
    print(result.table())
    if result.unknown_words:
        print(f"unknown words (read as unknown): {', '.join(result.unknown_words)}")
    out = args.save or RunFolder.of(cfg).queries / f"text-{slug(text)}.png"
    picture = answers.text_picture(text, result.query_class, result.answers, searcher.gallery, out)
    print(f"picture: {picture}")
    return 0


if __name__ == "__main__":
    run(main)
