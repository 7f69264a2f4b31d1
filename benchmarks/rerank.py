"""Benchmark: query-time re-ranking (retrieval.rerank) at SOP scale: time, peak memory, metrics.

Data: ``benchmarks/evaluation.py``'s generator (imported): unit embeddings around random class
centres (default 60,000 x 128 of 11,000 classes, Stanford Online Products' test set), evaluated
leave-one-out (each query its own gallery item, left out of its answers) with mAP@10, Recall@1
and MAP@R, for the plain search and each method at its defaults (or ``--k1`` etc.):

- none: :func:`retrieval.metrics.evaluate` of the plain search;
- alpha_qe, dba, dba_alpha_qe: the new vectors, then the same evaluation;
- k_reciprocal: the gallery's neighbour lists and largest distances, the queries' re-ranked lists
  (``candidates`` each), then their metrics.

Each method runs in a fresh process: its wall time (re-ranking and metrics), the process's peak
resident memory (``ru_maxrss``: data, interpreter and libraries included; the line ``data only``
shows that floor) and tracemalloc's peak of the method's own allocations (NumPy's arrays). The
reference implementation of k-reciprocal holds (Q + G) x (Q + G) dense matrices; its size in
float32 (the pool here is the gallery: the queries are its items) is printed above them.

    python benchmarks/rerank.py                  # 60,000 x 128, 11,000 classes, every query
    python benchmarks/rerank.py --n 6000 --queries 1000
    python benchmarks/rerank.py --methods none,k_reciprocal --candidates 200

``--trained``: re-ranking's gain (or loss) per data set the project makes, on trained models
instead of synthetic vectors. Each data set of ``--sets`` (default demo,text) is drawn with
``datasets.demo.generate`` into a temporary folder (or ``--data-dir``), its config trained once
per seed (``--seeds``, default 0,1,2; the model chosen on the validation holdout), its galleries
embedded, and every test query evaluated as evaluation.py does (the run's protocol: queries
against the training images) with no re-ranking and with each method at its defaults:

- ``demo``: the bundled demo (12 shapes, 60 images each at 64 px, ``make demo``'s) with
  trainings/demo.json, as ``make demo`` trains it;
- ``text``: the same images with trainings/demo_text.json (``make demo-text``'s dual encoder),
  image queries through its image tower;
- ``hard``: the ablation's set (16 shapes, 400 at 32 px: benchmarks/recipe.py) with
  trainings/recipes/small_from_scratch.json (benchmarks/recipe.py's ``recipe`` rows print the same
  table for it).

    python benchmarks/rerank.py --trained                    # demo and text, 3 seeds
    python benchmarks/rerank.py --trained --sets hard --seeds 0
    python benchmarks/rerank.py --trained --quick            # smoke run: tiny data, 30 steps
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.evaluation import make_data  # noqa: E402  (after the path is set)

METHODS = ("none", "alpha_qe", "dba", "dba_alpha_qe", "k_reciprocal")
PARAMETERS = ("alpha", "neighbours", "k1", "k2", "lambda", "candidates")


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def spec_value(args) -> dict:
    """The method and the parameters given on the command line that it takes."""
    from retrieval.rerank import PARAMS

    value = {"method": args.worker}
    for key in PARAMETERS:
        given = getattr(args, key.replace("lambda", "lambda_value"))
        if given is not None and key in PARAMS[args.worker]:
            value[key] = given
    return value


def worker(args) -> None:
    from retrieval.rerank import RerankSpec, evaluate_reranked

    embeddings, labels = make_data(args.n, args.classes, args.dim)
    picked = np.arange(args.n)
    if args.queries and args.queries < args.n:
        picked = np.sort(np.random.default_rng(0).choice(args.n, args.queries, replace=False))
    data_rss = peak_rss_mib()
    spec = RerankSpec.parse(spec_value(args), "--method")
    tracemalloc.start()
    start, cpu = time.perf_counter(), time.process_time()
    metrics = evaluate_reranked(
        spec,
        embeddings[picked],
        labels[picked],
        embeddings,
        labels,
        normalized=True,
        exclude=picked,
        query_items=picked,
        r=10,
        memory_mb=args.memory_mb,
    )
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    values = metrics.as_dict()
    result = {
        "spec": spec.as_config(),
        "seconds": seconds,
        "cpu": cpu,
        "traced_mib": traced,
        "peak_mib": peak_rss_mib(),
        "data_mib": data_rss,
        "metrics": {key: values[key] for key in ("mAP@10", "recall@1", "MAP@R")},
        "queries": int(len(picked)),
    }
    print(json.dumps(result))


def run_worker(method: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", method]
    for key in ("n", "classes", "dim", "queries", "memory_mb", *PARAMETERS):
        value = getattr(args, key.replace("lambda", "lambda_value"))
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"the {method} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def trained_data_sets() -> dict[str, tuple[str, dict, str]]:
    """``--trained``'s data sets: name -> (config file, datasets.demo.generate's arguments, the
    data root they are drawn into, relative to the data dir)."""
    from benchmarks.recipe import DATA, RECIPE

    demo = {"classes": 12, "per_class": 60, "size": 64}  # datasets.demo's defaults: make demo
    return {
        "demo": (os.path.join(ROOT, "trainings", "demo.json"), demo, "datasets/demo_shapes"),
        "text": (os.path.join(ROOT, "trainings", "demo_text.json"), demo, "datasets/demo_shapes"),
        "hard": (RECIPE, DATA, "shapes_16x400_32px"),
    }


def trained_runs(args, folder: str) -> dict[str, list[dict]]:
    """Every data set of ``args.sets`` trained once per seed in ``folder`` and scored with and
    without each re-ranking method (benchmarks/recipe.py's train_and_score)."""
    from benchmarks.recipe import (
        QUICK_DATA,
        QUICK_STEPS,
        read_json,
        record_run,
        run_config,
        train_and_score,
    )
    from datasets.demo import generate

    os.environ["TFCBIR_DATA_DIR"] = folder
    found = trained_data_sets()
    results: dict[str, list[dict]] = {}
    for name in args.sets:
        path, data, root = found[name]
        generate(os.path.join(folder, root), **(QUICK_DATA if args.quick else data))
        for seed in args.seeds:
            raw = run_config(
                read_json(path),
                name=f"rerank_{name}_seed{seed}",
                seed=seed,
                root=root,
                steps=QUICK_STEPS if args.quick else None,
            )
            scores = train_and_score(raw, folder, rerank=True)
            record_run(results, name, seed, scores, args.json)
            shown = ", ".join(f"{m} MAP@R {scores[f'{m}/MAP@R']:.3f}" for m in METHODS[1:])
            print(f"  {name} seed {seed}: none MAP@R {scores['MAP@R']:.3f}, {shown}", flush=True)
    return results


def trained_table(results: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: per data set and method, mean ± deviation over the seeds, and the mean
    change from no re-ranking (seed by seed)."""
    from benchmarks.recipe import spread

    keys = ("MAP@R", "recall@1", "mAP@10")
    lines = [
        "| data set | re-ranking | MAP@R | Recall@1 | mAP@10 | change in MAP@R | in Recall@1 "
        "| in mAP@10 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in results.items():
        for method in METHODS:
            prefix = "" if method == "none" else f"{method}/"
            cells = [spread([run[prefix + key] for run in runs]) for key in keys]
            changes = [
                f"{np.mean([run[prefix + key] - run[key] for run in runs]):+.3f}" for key in keys
            ]
            lines.append(
                f"| {name} ({len(runs)} seed{'s' * (len(runs) > 1)}) | {method} | {' | '.join(cells)} "
                f"| {' | '.join(changes)} |"
            )
    return lines


def trained_main(args, argv: list[str]) -> None:
    import tempfile

    from tfcbir.cli import quiet_tensorflow

    quiet_tensorflow()
    command = "python benchmarks/rerank.py " + " ".join(argv)
    print(f"{command}\n{os.cpu_count()} CPUs", flush=True)
    if args.data_dir:
        results = trained_runs(args, os.path.abspath(args.data_dir))
    else:
        with tempfile.TemporaryDirectory() as folder:
            results = trained_runs(args, folder)
    print(f"\n$ {command}")
    print("\n".join(trained_table(results)))


def add_trained_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trained", action="store_true", help="per data set the project makes, trained models"
    )
    parser.add_argument("--sets", default="demo,text", help="--trained: demo, text, hard")
    parser.add_argument("--seeds", default="0,1,2", help="--trained: comma-separated seeds")
    parser.add_argument("--quick", action="store_true", help="--trained: tiny data, 30 steps")
    parser.add_argument("--data-dir", help="--trained: keep data and runs here (default: temp)")
    parser.add_argument("--json", help="--trained: write every run's scores here")
    parser.add_argument("--table", nargs="+", help="--trained: print the table of --json files")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=60_000, help="embeddings (default 60000)")
    parser.add_argument(
        "--classes", type=int, default=None, help="classes (default: n * 11000 / 60000)"
    )
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=0, help="sampled queries (0: all)")
    parser.add_argument("--memory-mb", type=float, default=256, help="blocks' budget")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--neighbours", type=int)
    parser.add_argument("--k1", type=int)
    parser.add_argument("--k2", type=int)
    parser.add_argument("--lambda", dest="lambda_value", type=float)
    parser.add_argument("--candidates", type=int)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    add_trained_arguments(parser)
    args = parser.parse_args(argv)
    if args.table:
        merged: dict[str, list[dict]] = {}
        for path in args.table:
            with open(path, encoding="utf-8") as handle:
                merged.update(json.load(handle))
        print("\n".join(trained_table(merged)))
        return
    if args.trained:
        args.sets = [name.strip() for name in args.sets.split(",") if name.strip()]
        unknown = set(args.sets) - set(trained_data_sets())
        if unknown:
            parser.error(f"--sets: unknown {', '.join(sorted(unknown))}; give demo, text, hard")
        args.seeds = [int(seed) for seed in args.seeds.split(",")]
        trained_main(args, argv)
        return
    if args.classes is None:
        args.classes = max(1, round(args.n * 11_000 / 60_000))
    if args.worker:
        worker(args)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; give some of {', '.join(METHODS)}")
    queries = args.queries if args.queries and args.queries < args.n else args.n
    # Leave-one-out: the queries are gallery items, so k-reciprocal's pool is the gallery.
    dense_gib = args.n**2 * 4 / 2**30
    print(
        f"re-ranking, leave-one-out: {queries:,} queries of {args.n:,} x {args.dim} unit "
        f"embeddings, {args.classes:,} classes; each method in a fresh process, blocks of "
        f"{args.memory_mb:g} MiB (one dense pool x pool float32 matrix: {dense_gib:.1f} GiB)"
    )
    print(
        f"  {'method':<13} {'seconds':>8} {'CPU s':>8} {'peak RSS':>9} {'traced':>8}  "
        f"{'mAP@10':>7} {'R@1':>7} {'MAP@R':>7}  parameters"
    )
    baseline = None
    for method in methods:
        result = run_worker(method, args)
        metrics = result["metrics"]
        params = ", ".join(f"{k}={v}" for k, v in result["spec"].items() if k != "method")
        print(
            f"  {method:<13} {result['seconds']:8.2f} {result['cpu']:8.2f} "
            f"{result['peak_mib']:6,.0f} MiB {result['traced_mib']:4,.0f} MiB  "
            f"{metrics['mAP@10']:7.4f} {metrics['recall@1']:7.4f} {metrics['MAP@R']:7.4f}  "
            f"{params}"
        )
        if method == "none":
            baseline = metrics
            print(f"  {'data only':<13} {'':>8} {'':>8} {result['data_mib']:6,.0f} MiB")
        elif baseline is not None:
            change = ", ".join(
                f"{key} {metrics[key] - baseline[key]:+.4f}" for key in ("mAP@10", "recall@1")
            )
            print(f"  {'':<13} change from none: {change}")


if __name__ == "__main__":
    main()
