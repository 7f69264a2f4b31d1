"""Benchmark: an ablation of the training tricks on a hard demo set, and re-ranking's effect.

Data: ``datasets.demo.generate`` at a harder setting than the bundled demo (every one of its 16
shapes, 400 images each at 32 x 32 px: small images, more classes; clutter as always), written to
a temporary folder (or ``--data-dir``). Split by images (a quarter of each class for test), so
4,800 images train (480 of them held out for validation, the rest trained on) and 1,600 are
test queries against the 4,800 training images (train.py's and evaluation.py's defaults).

Settings (``--settings``, comma-separated; default: all, in this order):

- ``baseline``: trainings/demo.json as it is (the current defaults: small_cnn, 48 px crops,
  semi-hard triplet, P x K = 8 x 4, 800 steps of adam at 1e-3 with a linear decay);
- ``recipe``: trainings/recipes/small_from_scratch.json as it is;
- each trick alone: the baseline with one group of keys set (``TRICKS``: the values of the first
  recipe, and ``miner``, the distance-weighted miner on the baseline's loss);
- tricks together: their names joined by ``+`` (``batch+pooling+memory``).

Each setting trains once per seed (``--seeds``, default 0,1,2; the seed also draws the split, so
the settings see the same splits seed for seed). The model is the run's best weights on the
validation holdout (train.py's default: model selection never sees the test split), chosen by
the config's ``train.validation.metric`` or, with ``--select map@r``, by MAP@R for every setting
(the rows are then named ``<setting> [map@r]``); it is then scored on every test query: MAP@R,
Recall@1 and mAP@10. Printed: the holdout score at the best step (the selection metric, from
best.json: what a choice between settings may look at), the test metrics (mean and sample
standard deviation over the seeds) and the training seconds (the ``train()`` call, validation
included, TensorFlow's start-up not: an unreported warm-up run pays it). The recipe's models are
also scored with each query-time re-ranking method at its defaults (``retrieval.rerank``).

    python benchmarks/recipe.py                              # every setting, 3 seeds
    python benchmarks/recipe.py --settings baseline,recipe   # a subset
    python benchmarks/recipe.py --quick                      # smoke run: tiny data, 30 steps
    python benchmarks/recipe.py --settings loss,ema --json b.json     # part of it, saved
    python benchmarks/recipe.py --select map@r --settings baseline,batch+pooling  # on MAP@R
    python benchmarks/recipe.py --table a.json b.json        # the table of saved parts

The table and its command are in docs/recipes.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BASELINE = os.path.join(ROOT, "trainings", "demo.json")
RECIPE = os.path.join(ROOT, "trainings", "recipes", "small_from_scratch.json")
DATA = {"classes": 16, "per_class": 400, "size": 32}
QUICK_DATA = {"classes": 16, "per_class": 16, "size": 32}
QUICK_STEPS = 30

# Each trick: the keys (paths) the baseline takes to try it, with their values: the values of the
# first small_from_scratch recipe (the one the ablation first measured), written out here so that
# a row keeps its meaning when the recipe changes; "miner" is the distance-weighted miner on the
# baseline's own loss (Wu et al. 2017: Euclidean distances between unit vectors, as its metric).
TRICKS = {
    "loss": {("loss",): {"name": "multi_similarity"}},
    "batch": {("train", "batch"): {"P": 16, "K": 4}},
    "schedule": {
        ("train", "steps"): 1500,
        ("train", "optimizer"): {"name": "adam", "lr": 0.002},
        ("train", "lr_schedule"): {"name": "cosine", "warmup_steps": 100, "decay_start": 100},
    },
    "size": {("data", "image_size"): [32, 32], ("data", "resize"): [36, 36]},
    "augment": {("data", "augment"): {"preset": "light"}},
    "pooling": {("model", "pooling"): "gem"},
    "ema": {("train", "ema"): True},
    "memory": {("train", "memory"): {"size": 1024, "start_step": 300}},
    "miner": {("loss", "miner"): "distance_weighted"},
}
SETTINGS = ("baseline", "recipe", *TRICKS)
RERANK = ("alpha_qe", "dba", "dba_alpha_qe", "k_reciprocal")
METRICS = ("MAP@R", "recall@1", "mAP@10")


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def setting_config(name: str, baseline: dict, recipe: dict) -> dict:
    """The raw config of one setting: the baseline, the recipe, or the baseline with the keys of
    one trick or of several (``"batch+pooling"``) set to the tricks' values."""
    if name == "baseline":
        return copy.deepcopy(baseline)
    if name == "recipe":
        return copy.deepcopy(recipe)
    raw = copy.deepcopy(baseline)
    for trick in name.split("+"):
        for path, value in TRICKS[trick].items():
            parent = raw
            for key in path[:-1]:
                parent = parent.setdefault(key, {})
            parent[path[-1]] = copy.deepcopy(value)
    return raw


def with_selection(raw: dict, metric: str | None) -> dict:
    """``raw`` with ``train.validation.metric`` set to ``metric`` (None: as it is)."""
    raw = copy.deepcopy(raw)
    if metric:
        raw["train"].setdefault("validation", {})["metric"] = metric
    return raw


def known_setting(name: str) -> bool:
    """A setting's name: baseline, recipe, a trick, or tricks joined by "+"."""
    return name in ("baseline", "recipe") or all(part in TRICKS for part in name.split("+"))


def run_config(raw: dict, *, name: str, seed: int, root: str, steps: int | None) -> dict:
    """``raw`` made a run: its data root, seed and name; ``steps`` (quick runs) shortens it,
    with the schedule and the step-keyed keys scaled along."""
    raw = copy.deepcopy(raw)
    raw.update(name=name, seed=seed)
    raw["data"]["root"] = root
    if steps:
        train = raw["train"]
        train.update(steps=steps, checkpoint_every=steps, validate_every=steps // 2)
        train.get("lr_schedule", {}).update(decay_start=steps // 2, warmup_steps=0)
        if train.get("memory", {}).get("size"):
            train["memory"]["start_step"] = 0
    return raw


def train_and_score(raw: dict, folder: str, rerank: bool) -> dict:
    """Train ``raw`` from scratch (its config file written to ``folder``/configs), embed the
    sets its protocol needs; its test metrics (and, with ``rerank``, each re-ranking method's,
    under ``"<method>/<metric>"``) and ``seconds`` of training."""
    import config
    import embed
    from retrieval import evaluate
    from retrieval.rerank import RerankSpec
    from training.trainer import train

    path = os.path.join(folder, "configs", f"{raw['name']}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(raw, handle, indent=1)
    resolved = config.load(path)
    began = time.perf_counter()
    result = train(resolved, restart=True)
    scores = {"seconds": time.perf_counter() - began, **holdout_score(result.best)}
    with contextlib.redirect_stdout(io.StringIO()):  # embed.py prints the galleries' paths
        embed.main(["-c", path])
    methods = ("none", *RERANK) if rerank else ("none",)
    for method in methods:
        spec = RerankSpec.parse(method)
        result = evaluate.evaluate_run(
            resolved, queries=0, r=10, nmi=False, config_path=path, rerank=spec
        )
        prefix = "" if method == "none" else f"{method}/"
        scores.update({f"{prefix}{key}": result[key] for key in METRICS})
    return scores


def holdout_score(best: dict | None) -> dict:
    """The selection metric on the validation holdout at the best step (best.json):
    ``holdout`` (None without validation) and ``holdout_metric`` ("recall@1" or "map@r")."""
    from training.validation import VALIDATION_METRICS

    for metric, (key, _) in VALIDATION_METRICS.items():
        if (best or {}).get(key) is not None:
            return {"holdout": best[key], "holdout_metric": metric, "best_step": best["step"]}
    return {"holdout": None, "holdout_metric": None, "best_step": None}


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {deviation:.3f}"


def table(results: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: per setting, mean ± standard deviation over the seeds."""
    lines = [
        "| setting | seeds | holdout (selection metric) | MAP@R | Recall@1 | mAP@10 | train s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in results.items():
        cells = [spread([run[key] for run in runs]) for key in METRICS]
        seconds = statistics.fmean(run["seconds"] for run in runs)
        lines.append(
            f"| {name} | {len(runs)} | {holdout_cell(runs)} | {' | '.join(cells)} | {seconds:.0f} |"
        )
    return lines


def holdout_cell(runs: list[dict]) -> str:
    """The holdout score's mean ± deviation and its metric; "-" for runs measured before the
    benchmark recorded it (or without validation), "mixed" across metrics."""
    metrics = {run.get("holdout_metric") for run in runs}
    if None in metrics:
        return "-"
    if len(metrics) > 1:
        return "mixed"
    shown = {"recall@1": "Recall@1", "map@r": "MAP@R"}[metrics.pop()]
    return f"{shown} {spread([run['holdout'] for run in runs])}"


def rerank_table(runs: list[dict]) -> list[str]:
    lines = [
        "| recipe + re-ranking | MAP@R | Recall@1 | mAP@10 |",
        "| --- | --- | --- | --- |",
    ]
    for method in ("none", *RERANK):
        prefix = "" if method == "none" else f"{method}/"
        cells = [spread([run[prefix + key] for run in runs]) for key in METRICS]
        lines.append(f"| {method} | {' | '.join(cells)} |")
    return lines


def add_run_arguments(parser: argparse.ArgumentParser, settings) -> None:
    """The arguments of a benchmark that trains settings x seeds: --settings, --seeds, --quick,
    --data-dir, --json."""
    parser.add_argument("--settings", default=",".join(settings), help="comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, few steps")
    parser.add_argument("--data-dir", help="keep the data and runs here (default: a temp dir)")
    parser.add_argument("--json", help="write every run's scores to this JSON file as they come")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, SETTINGS)
    parser.add_argument(
        "--select",
        choices=("recall@1", "map@r"),
        help="select every setting's model on the holdout by this metric "
        "(train.validation.metric; default: each config's own); its rows are named "
        "<setting> [<metric>]",
    )
    parser.add_argument(
        "--table",
        nargs="+",
        metavar="JSON",
        help="train nothing: print the tables of runs saved with --json (merged, in order)",
    )
    args = parser.parse_args(argv)
    args.settings = [name.strip() for name in args.settings.split(",") if name.strip()]
    unknown = [name for name in args.settings if not known_setting(name)]
    if unknown:
        parser.error(
            f"--settings: unknown {', '.join(unknown)}; choose from {', '.join(SETTINGS)} "
            "or tricks joined by '+' (batch+pooling)"
        )
    args.seeds = [int(seed) for seed in args.seeds.split(",")]
    return args


def run_all(args, folder: str) -> dict[str, list[dict]]:
    """Every setting and seed in ``folder`` (the data dir); prints each run as it ends."""
    from datasets.demo import generate

    os.environ["TFCBIR_DATA_DIR"] = folder
    data = QUICK_DATA if args.quick else DATA
    root = "shapes_{classes}x{per_class}_{size}px".format(**data)
    generate(os.path.join(folder, root), **data)
    steps = QUICK_STEPS if args.quick else None
    baseline, recipe = read_json(BASELINE), read_json(RECIPE)
    # The first run in a process pays TensorFlow's start-up: a short unreported one.
    warm = run_config(baseline, name="warm_up", seed=0, root=root, steps=QUICK_STEPS)
    train_and_score(warm, folder, rerank=False)
    results: dict[str, list[dict]] = {}
    for name in args.settings:
        for seed in args.seeds:
            raw = run_config(
                with_selection(setting_config(name, baseline, recipe), args.select),
                name=f"{name.replace('+', '-')}_seed{seed}",
                seed=seed,
                root=root,
                steps=steps,
            )
            scores = train_and_score(raw, folder, rerank=name == "recipe")
            row = f"{name} [{args.select}]" if args.select else name
            record_run(results, row, seed, scores, args.json)
            shown = ", ".join(f"{key} {scores[key]:.3f}" for key in METRICS)
            holdout = scores["holdout"]
            held = "" if holdout is None else f"holdout {scores['holdout_metric']} {holdout:.3f}, "
            print(f"  {row} seed {seed}: {held}{shown}, {scores['seconds']:.0f} s", flush=True)
    return results


def record_run(results: dict, row: str, seed: int, scores: dict, path: str | None) -> None:
    """Add one run's scores to ``results`` (row -> runs); with ``path``, save them all there
    after every run, so that an interrupted benchmark keeps what it measured."""
    results.setdefault(row, []).append({"seed": seed, **scores})
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)


def print_tables(command: str, results: dict[str, list[dict]]) -> None:
    print(f"\n$ {command}")
    print("\n".join(table(results)))
    for name, runs in results.items():
        if name.split(" ")[0] == "recipe" and "alpha_qe/MAP@R" in runs[0]:
            print()
            print(
                "\n".join(rerank_table(runs)).replace("recipe + re-ranking", f"{name} + re-ranking")
            )


def merged(paths: list[str]) -> dict[str, list[dict]]:
    """The runs of several ``--json`` files, settings in ``SETTINGS`` order; a setting's seed
    run twice (two files) counts once, the later file's."""
    found: dict[str, dict[int, dict]] = {}
    for path in paths:
        for name, runs in read_json(path).items():
            found.setdefault(name, {}).update((run["seed"], run) for run in runs)
    order = [name for name in SETTINGS if name in found]
    order += [name for name in found if name not in order]  # combinations, [metric] rows
    return {name: list(found[name].values()) for name in order}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table:
        print_tables(
            f"python benchmarks/recipe.py --table {' '.join(args.table)}", merged(args.table)
        )
        return
    from tfcbir.cli import quiet_tensorflow

    quiet_tensorflow()
    command = "python benchmarks/recipe.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{command.strip()}\n{os.cpu_count()} CPUs", flush=True)
    if args.data_dir:
        results = run_all(args, os.path.abspath(args.data_dir))
    else:
        with tempfile.TemporaryDirectory() as folder:
            results = run_all(args, folder)
    print_tables(command.strip(), results)


if __name__ == "__main__":
    main()
