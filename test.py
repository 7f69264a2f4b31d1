"""Query with a random test image: ``python test.py -c <config> -r 10``.

Prints the ranked answers (rank, score, class, path, whether the class matches) and saves a
picture of the query beside its top r under <run>/queries/. ``--text`` queries a dual encoder
with words instead: ``--text "a red bag"``, or ``--text`` alone for a random test image's caption
(its class prompt when it has none), whose class then marks the matches.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tfcbir.cli import import_tensorflow, run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", required=True, help="training config (.json or .yaml)")
    parser.add_argument("-r", "--retrieve", type=int, default=10, help="answers to show")
    parser.add_argument("--seed", type=int, help="pick the query with this seed (default: any)")
    parser.add_argument("--index", help="exact or the FAISS factory string embed.py built")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="weights to use instead of the run's best.weights.h5 (embed.py --checkpoint)",
    )
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
    from retrieval.embedder import load_embedder
    from retrieval.evaluate import open_gallery
    from retrieval.faiss_index import open_index
    from tfcbir import UserError

    cfg = config.load(args.config)
    protocol = sets.protocol(cfg)
    embedder = load_embedder(cfg, args.checkpoint)  # its weights' hash checks the gallery
    gallery = open_gallery(cfg, protocol.gallery, args.config, embedder.model_id, args.checkpoint)
    answers.check_r(args.retrieve, gallery, protocol.leave_one_out)
    candidates = sets.images(cfg, protocol.queries)
    rng = np.random.default_rng(args.seed)
    for pick in rng.permutation(len(candidates))[:20]:  # a broken file: try another image
        path = candidates.absolute_paths()[pick]
        found = list(embedder.embed_files([path]))
        if found:
            break
    else:
        raise UserError(f"no readable query image found in {candidates.root}")
    label = int(candidates.labels[pick])
    relative = candidates.paths[pick]
    exclude = None
    if protocol.leave_one_out and relative in gallery.paths:
        exclude = np.array([gallery.paths.index(relative)])
    index = open_index(
        gallery,
        args.index or cfg["index"]["type"],
        search_parameters=cfg["index"]["search_parameters"],
        config_path=args.config,
    )
    ranked = answers.rank(index, gallery, found[0][1], [label], args.retrieve, exclude)[0]
    class_name = candidates.classes[label]
    print(answers.table(relative, class_name, ranked))
    out = args.save or config.run_dir(cfg) / "queries" / f"test-{Path(relative).stem}.png"
    print(f"picture: {answers.picture(path, class_name, ranked, gallery, out)}")
    return 0


def _text_query(args) -> int:
    import numpy as np

    import config
    from datasets.captions import image_captions, load_caption_table
    from retrieval import answers, sets
    from retrieval.embedder import load_text_encoder
    from retrieval.faiss_index import open_index
    from retrieval.text_queries import class_prompts_of, open_text_gallery, slug

    cfg = config.load(args.config)
    protocol = sets.protocol(cfg)
    encoder = load_text_encoder(cfg, args.checkpoint)
    gallery = open_text_gallery(cfg, protocol.gallery, encoder, args.config, args.checkpoint)
    answers.check_r(args.retrieve, gallery)
    text, label = " ".join(args.text.split()), None
    if not text:  # a random test image's caption, or its class prompt
        candidates = sets.images(cfg, protocol.queries)
        pick = int(np.random.default_rng(args.seed).integers(len(candidates)))
        label = int(candidates.labels[pick])
        table = load_caption_table(config.data_root(cfg), cfg["data"]["captions"]["file"])
        own = image_captions(candidates.subset([pick]), table, None).texts
        text = own[0] if own else class_prompts_of(cfg, [candidates.classes[label]])[0][0]
        print(f"text of {candidates.paths[pick]}: {text!r}")
    index = open_index(
        gallery,
        args.index or cfg["index"]["type"],
        search_parameters=cfg["index"]["search_parameters"],
        config_path=args.config,
    )
    ranked = answers.rank(index, gallery, encoder.embed([text]), [label], args.retrieve)[0]
    class_name = None if label is None else gallery.classes[label]
    print(answers.text_table(text, class_name, ranked))
    unknown = encoder.unknown_words(text)
    if unknown:
        print(f"unknown words (read as unknown): {', '.join(unknown)}")
    out = args.save or config.run_dir(cfg) / "queries" / f"text-{slug(text)}.png"
    print(f"picture: {answers.text_picture(text, class_name, ranked, gallery, out)}")
    return 0


if __name__ == "__main__":
    run(main)
