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


def main() -> None:
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
    args = parser.parse_args()
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
