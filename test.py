"""Query with a random test image: ``python test.py -c <config> -r 10``.

Prints the ranked answers (rank, score, class, path, whether the class matches) and saves a
picture of the query beside its top r under <run>/queries/.
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
    args = parser.parse_args(argv)
    import_tensorflow()

    import numpy as np

    import config
    from retrieval import answers, sets
    from retrieval.searcher import Searcher
    from tfcbir import UserError

    cfg = config.load(args.config)
    searcher = Searcher.open(
        cfg, index=args.index, checkpoint=args.checkpoint, config_path=args.config
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
    out = args.save or config.run_dir(cfg) / "queries" / f"test-{Path(relative).stem}.png"
    print(f"picture: {answers.picture(path, class_name, ranked, searcher.gallery, out)}")
    return 0


if __name__ == "__main__":
    run(main)
