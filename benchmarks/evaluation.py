"""Benchmark: leave-one-out retrieval metrics, blocked (retrieval.metrics) vs plain dense NumPy.

Random unit embeddings (N x 128, noisy class centres so the metrics are not all zero) of C classes
are evaluated leave-one-out twice, each in a fresh subprocess so that its peak memory
(``ru_maxrss``) is its own:

- blocked: ``retrieval.metrics.evaluate_leave_one_out`` (memory-bounded query blocks);
- dense: the plain way, the full N x N float32 score matrix, then a stable argsort per row
  (about 4 N^2 bytes: 14 GB for N = 60,000).

Both compute mAP, Recall@1/2/4/8, MAP@R and R-precision; the benchmark checks they agree and prints
both times, the ratio and both peaks. NMI (the same k-means in both) is timed only with --nmi.

    python benchmarks/evaluation.py                 # 60,000 x 128, 11,000 classes (needs ~15 GB)
    python benchmarks/evaluation.py --n 20000       # classes scale with n
    python benchmarks/evaluation.py --quick         # 6,000 embeddings, a few seconds
    python benchmarks/evaluation.py --only blocked  # skip the dense baseline
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_data(n: int, n_classes: int, dim: int, seed: int = 0):
    """Unit embeddings (n, dim) float32 around random class centres; labels (n,), every class
    used (sizes differ by at most one)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % n_classes)
    centres = rng.standard_normal((n_classes, dim)).astype(np.float32)
    embeddings = centres[labels] + 1.5 * rng.standard_normal((n, dim)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings, labels


def blocked(embeddings, labels, args) -> dict:
    from retrieval.metrics import clustering_nmi, evaluate_leave_one_out

    start = time.perf_counter()
    metrics = evaluate_leave_one_out(
        embeddings, labels, normalized=True, nmi=False, memory_mb=args.memory_mb
    )
    result = {"seconds": time.perf_counter() - start, "metrics": metrics.as_dict()}
    if args.nmi:
        start = time.perf_counter()
        result["nmi"] = clustering_nmi(embeddings, labels)
        result["nmi_seconds"] = time.perf_counter() - start
    return result


def dense(embeddings, labels, args) -> dict:
    """The plain computation: the whole score matrix, then one stable argsort per query."""
    start = time.perf_counter()
    n = len(labels)
    scores = embeddings @ embeddings.T
    np.fill_diagonal(scores, -np.inf)  # leave each query out: it sorts last, then is dropped
    ap, map_r, r_precision, first = [], [], [], []
    positions = np.arange(1, n)
    for i in range(n):
        ranking = np.argsort(-scores[i], kind="stable")[:-1]
        relevant = labels[ranking] == labels[i]
        g = int(relevant.sum())
        if g == 0:
            continue
        precision = np.cumsum(relevant) / positions
        ap.append((precision * relevant).sum() / g)
        map_r.append((precision[:g] * relevant[:g]).sum() / g)
        r_precision.append(relevant[:g].sum() / g)
        first.append(int(np.argmax(relevant)) + 1)
    first = np.array(first)
    values = {"mAP": float(np.mean(ap)), "precision@1": float(np.mean(first == 1))}
    values.update({f"recall@{k}": float(np.mean(first <= k)) for k in (1, 2, 4, 8)})
    values.update({"MAP@R": float(np.mean(map_r)), "R-precision": float(np.mean(r_precision))})
    values["excluded_queries"] = n - len(first)
    return {"seconds": time.perf_counter() - start, "metrics": values}


def worker(args) -> None:
    embeddings, labels = make_data(args.n, args.classes, args.dim)
    result = {"blocked": blocked, "dense": dense}[args.worker](embeddings, labels, args)
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
    print(json.dumps(result))


def run_worker(name: str, args) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        name,
        "--n",
        str(args.n),
        "--classes",
        str(args.classes),
        "--dim",
        str(args.dim),
        "--memory-mb",
        str(args.memory_mb),
    ] + (["--nmi"] if args.nmi else [])
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"the {name} run failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=60_000, help="embeddings (default 60000)")
    parser.add_argument(
        "--classes", type=int, default=None, help="classes (default: n * 11000 / 60000)"
    )
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--memory-mb", type=float, default=256, help="the blocked budget")
    parser.add_argument("--quick", action="store_true", help="6,000 embeddings")
    parser.add_argument("--nmi", action="store_true", help="also time k-means + NMI (blocked)")
    parser.add_argument("--only", choices=["blocked", "dense"], help="run one side only")
    parser.add_argument("--worker", choices=["blocked", "dense"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.n = 6_000
    if args.classes is None:
        args.classes = max(1, round(args.n * 11_000 / 60_000))
    if args.worker:
        worker(args)
        return

    print(
        f"leave-one-out metrics of {args.n:,} x {args.dim} unit embeddings, "
        f"{args.classes:,} classes (each side in a fresh process)"
    )
    sides = [args.only] if args.only else ["blocked", "dense"]
    results = {}
    for name in sides:
        results[name] = run_worker(name, args)
        print(
            f"  {name:8s} {results[name]['seconds']:9.2f} s   peak {results[name]['peak_mib']:9,.0f} MiB"
        )
    if "nmi_seconds" in results.get("blocked", {}):
        print(
            f"  k-means + NMI (not in the times above): {results['blocked']['nmi_seconds']:.2f} s,"
            f" NMI {results['blocked']['nmi']:.4f}"
        )
    metrics = results[sides[0]]["metrics"]
    print(
        "  metrics: "
        + ", ".join(
            f"{k} {metrics[k]:.4f}" for k in ("mAP", "recall@1", "recall@8", "MAP@R", "R-precision")
        )
        + f"; {metrics['excluded_queries']} queries without a relevant item"
    )
    if len(results) == 2:
        a, b = results["blocked"], results["dense"]
        print(
            f"  dense / blocked: time x{b['seconds'] / a['seconds']:.2f}, "
            f"peak memory x{b['peak_mib'] / a['peak_mib']:.2f}"
        )
        differ = [k for k, v in b["metrics"].items() if abs(a["metrics"][k] - v) > 1e-9]
        print("  the two agree on every metric" if not differ else f"  DISAGREE on {differ}")
        if differ:
            sys.exit(1)


if __name__ == "__main__":
    main()
