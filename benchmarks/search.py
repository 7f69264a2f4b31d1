"""Benchmark: top-k search at scale, ExactIndex against FAISS (exact and approximate indexes).

A gallery of N x 128 unit float32 vectors and Q unit queries (default 1,000,000 and 1,000),
top-10, inner product (cosine). Two kinds of data:

- random: uniform on the sphere, no cluster structure: the worst case for approximate indexes,
  whose partitions or graphs then carry little information;
- clustered: a Gaussian mixture of N / 100 centres (real embeddings look more like this), queries
  drawn from the same mixture.

Every case runs in a fresh subprocess so that its peak memory is its own: the high-water mark of
its resident memory (``VmHWM`` on Linux; see :func:`peak_mib`). ``extra`` is that peak minus
the peak right after loading the gallery and queries: the index, its training and the search's
temporaries.

- exact: ``retrieval.search.ExactIndex`` (blocked float32 products, exact ties) against FAISS's
  ``IndexFlatIP`` (what ``FaissIndex`` builds for ``Flat``). Their time ratio is measured in one
  more process that runs the two alternately and keeps each one's best, so that other load on the
  machine hits both alike. Goal: exact / FAISS <= 1.2.
- approximate: each factory string is built once (``FaissIndex.build``: train + add, timed), then
  searched with each run-time setting: recall@10 against the exact top 10, the batch time, and the
  median time of one query at a time through ``FaissIndex.search`` (what the CLIs call; the
  ``raw`` column is ``index.search`` of FAISS alone). Goal: recall@10 >= 0.95 under 2 ms a query;
  the last line of each table says whether some setting reaches it, and the fastest that does.

``x exact`` is ExactIndex's batch time over the row's (how many times faster than exact).

- ``--only ivfpq``: FAISS IVF-PQ against LanceDB IVF-PQ (``index.backend: lancedb``) side by
  side, the same lists (about 4 sqrt(N)), 32 sub-quantizers of 8 bits and probes. Each index is
  built in one process (timed) and searched in another that holds only what a server holds: the
  FAISS index read from its file, or the Lance table opened from its folder with the gallery's
  paths (``retrieval.lance_store.LanceIndex``, as the searcher uses it); its peak memory is the
  ``peak MiB`` column. Both also re-score 10 x k candidates with the full vectors (LanceDB's
  ``refine_factor``, read from the table; FAISS's ``IndexRefineFlat``, which must hold them in
  memory), and LanceDB runs without an index too (its exact flat search).

    python benchmarks/search.py                    # 1M x 128, both kinds of data (~40 min,
                                                   # mostly building the indexes)
    python benchmarks/search.py --quick            # 100k gallery items, 300 queries
    python benchmarks/search.py --data clustered --n 300000 --queries 500
    python benchmarks/search.py --only exact       # ExactIndex against IndexFlatIP only
    python benchmarks/search.py --only ivfpq --data clustered   # FAISS vs LanceDB IVF-PQ
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

K = 10
GOAL_RATIO = 1.2
GOAL_RECALL = 0.95
GOAL_MS = 2.0
#: One at a time, an exact query reads the whole gallery (~50 ms at 1M): a sample is enough.
EXACT_LATENCY_QUERIES = 50
#: The norm of the clustered data's noise around its unit centres.
NOISE = 1.0


def unit(rows: np.ndarray) -> np.ndarray:
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def make_data(kind: str, n: int, n_queries: int, dim: int, seed: int = 0):
    """Gallery (n, dim) and queries (n_queries, dim) float32 unit vectors."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        gallery = unit(rng.standard_normal((n, dim), dtype=np.float32))
        return gallery, unit(rng.standard_normal((n_queries, dim), dtype=np.float32))
    # Noise of norm ~1 around unit centres: a point's nearest are mostly, not all, of its own
    # cluster (~100 points); the clusters overlap, as classes do in real embeddings.
    centres = unit(rng.standard_normal((max(1, n // 100), dim), dtype=np.float32))
    noise = NOISE / np.sqrt(dim)

    def sample(count):
        points = centres[rng.integers(0, len(centres), size=count)]
        points += noise * rng.standard_normal((count, dim), dtype=np.float32)
        return unit(points)

    return sample(n), sample(n_queries)


def peak_mib() -> float:
    """This process's peak resident memory. Linux: VmHWM, the high-water mark of this process's
    own address space. Not ru_maxrss: a child's starts at its parent's resident size at fork
    time (the kernel folds the forked copy's mark in at exec), which would hide small peaks."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    # Elsewhere: ru_maxrss (KiB on Linux, bytes on macOS); the driver keeps itself small.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def best_time(function, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def one_at_a_time(search, queries: np.ndarray) -> float:
    """Median milliseconds of searching the queries one by one."""
    times = []
    for query in queries:
        start = time.perf_counter()
        search(query[None, :])
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


# --- the cases, each run in its own process ------------------------------------------------------


def case_exact(gallery, queries, args) -> dict:
    from retrieval.search import ExactIndex

    start = time.perf_counter()
    index = ExactIndex(gallery, normalized=True, memory_mb=args.memory_mb)
    build = time.perf_counter() - start
    seconds, (_, indices) = best_time(lambda: index.search(queries, K), args.repeats)
    np.save(os.path.join(args.data_dir, f"{args.data}_truth.npy"), indices)
    few = queries[: min(args.latency_queries, EXACT_LATENCY_QUERIES)]
    latency = one_at_a_time(lambda q: index.search(q, K), few)
    return {"rows": [{"build_s": build, "batch_s": seconds, "ms": latency}]}


def case_flat(gallery, queries, args) -> dict:
    from retrieval.faiss_index import FaissIndex

    start = time.perf_counter()
    index = FaissIndex.build(gallery, normalized=True, factory="Flat")
    build = time.perf_counter() - start
    seconds, (_, indices) = best_time(lambda: index.index.search(queries, K), args.repeats)
    few = queries[: min(args.latency_queries, EXACT_LATENCY_QUERIES)]
    latency = one_at_a_time(lambda q: index.search(q, K), few)
    row = {"build_s": build, "batch_s": seconds, "ms": latency, "recall": recall(indices, args)}
    return {"rows": [row]}


def case_ratio(gallery, queries, args) -> dict:
    """ExactIndex and IndexFlatIP alternately in one process: the fairest ratio on a busy box."""
    from retrieval.faiss_index import FaissIndex
    from retrieval.search import ExactIndex

    exact = ExactIndex(gallery, normalized=True, memory_mb=args.memory_mb)
    flat = FaissIndex.build(gallery, normalized=True, factory="Flat").index
    times = {"exact": [], "faiss": []}
    for _ in range(args.repeats):
        for name, search in (("exact", exact.search), ("faiss", flat.search)):
            start = time.perf_counter()
            search(queries, K)
            times[name].append(time.perf_counter() - start)
    return {"exact": times["exact"], "faiss": times["faiss"]}


def case_faiss(gallery, queries, args) -> dict:
    from retrieval.faiss_index import FaissIndex

    start = time.perf_counter()
    index = FaissIndex.build(gallery, normalized=True, factory=args.factory)
    build = time.perf_counter() - start
    rows = []
    for parameters in args.parameters:
        searcher = FaissIndex(
            index.index, normalized=True, factory=args.factory, search_parameters=parameters
        )
        seconds, (_, indices) = best_time(lambda s=searcher: s.search(queries, K), 1)
        few = queries[: args.latency_queries]
        rows.append(
            {
                "parameters": parameters or f"default {searcher.parameters}",
                "build_s": build,
                "batch_s": seconds,
                "ms": one_at_a_time(lambda q, s=searcher: s.search(q, K), few),
                "raw_ms": one_at_a_time(lambda q, s=searcher: s.index.search(q, K), few),
                "recall": recall(indices, args),
            }
        )
    return {"rows": rows}


def case_faiss_build(gallery, queries, args) -> dict:
    """Train and fill FAISS's IVF-PQ, write it to a file for case_faiss_search."""
    import faiss

    from retrieval.faiss_index import FaissIndex

    start = time.perf_counter()
    index = FaissIndex.build(gallery, normalized=True, factory=args.factory)
    build = time.perf_counter() - start
    faiss.write_index(index.index, os.path.join(args.data_dir, "ivfpq.faiss"))
    return {"build_s": build}


def case_faiss_search(queries, args) -> dict:
    """What a FAISS server holds: the index read from its file, searched at each setting."""
    import faiss

    from retrieval.faiss_index import FaissIndex

    index = faiss.read_index(os.path.join(args.data_dir, "ivfpq.faiss"))
    rows = []
    for parameters in args.parameters:
        searcher = FaissIndex(
            index, normalized=True, factory=args.factory, search_parameters=parameters
        )
        seconds, (_, indices) = best_time(lambda s=searcher: s.search(queries, K), 1)
        few = queries[: args.latency_queries]
        rows.append(
            {
                "parameters": parameters,
                "batch_s": seconds,
                "ms": one_at_a_time(lambda q, s=searcher: s.search(q, K), few),
                "recall": recall(indices, args),
            }
        )
    return {"rows": rows}


def case_faiss_refine(gallery, queries, args) -> dict:
    """FAISS's counterpart of LanceDB's refine_factor: the IVF-PQ's candidates re-scored with
    the full vectors, which the process must then hold (IndexRefineFlat over the gallery)."""
    import faiss

    index = faiss.read_index(os.path.join(args.data_dir, "ivfpq.faiss"))
    refined = faiss.IndexRefineFlat(index, faiss.swig_ptr(gallery))
    refined.k_factor = 10
    rows = []
    for probes in args.parameters:
        faiss.extract_index_ivf(index).nprobe = probes
        seconds, (_, indices) = best_time(lambda: refined.search(queries, K), 1)
        few = queries[: args.latency_queries]
        # One query at a time on one OpenMP thread: IndexRefineFlat's parallel loop over the
        # queries has nothing to share for one, and waking the idle thread cost ~8 ms a query
        # on the busy 2-core machine.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        single = one_at_a_time(lambda q: refined.search(q, K), few)
        faiss.omp_set_num_threads(threads)
        rows.append(
            {
                "parameters": f"nprobe={probes},k_factor=10",
                "batch_s": seconds,
                "ms": single,
                "recall": recall(indices, args),
            }
        )
    return {"rows": rows}


def lance_paths(n: int) -> list[str]:
    return [f"{i:07d}.png" for i in range(n)]


def case_lance_build(gallery, queries, args) -> dict:
    """Write the gallery to a Lance table and build its IVF-PQ (and an unindexed copy)."""
    from retrieval.lance_store import LanceStore, Rows, connect

    uri = os.path.join(args.data_dir, "lancedb")
    store = LanceStore(connect(uri), uri, "bench")
    n = len(gallery)
    rows = Rows(lance_paths(n), ["c"] * n, np.arange(n), gallery, None, None, "benchmark")
    start = time.perf_counter()
    table = store.overwrite(rows)
    written = time.perf_counter() - start
    start = time.perf_counter()
    store.build_index(table, "IVF_PQ", args.build, metric="dot")
    build = time.perf_counter() - start
    flat = LanceStore(store.db, uri, "bench_flat")
    flat.overwrite(rows)
    return {"write_s": written, "build_s": build}


def case_lance_search(queries, args) -> dict:
    """What a LanceDB server holds: the table opened, the gallery's paths, LanceIndex."""
    from retrieval.lance_store import LanceIndex, connect

    db = connect(os.path.join(args.data_dir, "lancedb"))
    rows = []
    for table_name, parameters in args.parameters:
        table = db.open_table(table_name)
        paths = table.search().select(["path"]).limit(None).to_arrow()["path"].to_pylist()
        gallery = _Sized(sorted(paths))
        index = LanceIndex(table, gallery, metric="dot", search_parameters=parameters, metadata=[])
        seconds, (_, indices) = best_time(lambda i=index: i.search(queries, K), 1)
        few = queries[: args.latency_queries]
        label = ",".join(f"{k}={v}" for k, v in parameters.items())
        rows.append(
            {
                "parameters": (label or "default") if table_name == "bench" else "no index",
                "batch_s": seconds,
                "ms": one_at_a_time(lambda q, i=index: i.search(q, K), few),
                "recall": recall(indices, args),
            }
        )
    return {"rows": rows}


class _Sized:
    """The paths LanceIndex maps answers to (a gallery's, without its vectors)."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)


def recall(indices: np.ndarray, args) -> float | None:
    path = os.path.join(args.data_dir, f"{args.data}_truth.npy")
    if not os.path.exists(path):
        return None
    truth = np.load(path)
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(indices, truth)]))


def worker(args) -> None:
    if args.worker == "data":
        gallery, queries = make_data(args.data, args.n, args.queries, args.dim)
        np.save(os.path.join(args.data_dir, f"{args.data}_gallery.npy"), gallery)
        np.save(os.path.join(args.data_dir, f"{args.data}_queries.npy"), queries)
        print("RESULT {}")
        return
    queries = np.load(os.path.join(args.data_dir, f"{args.data}_queries.npy"))
    searches = {"faiss_search": case_faiss_search, "lance_search": case_lance_search}
    if args.worker in searches:  # a server: no gallery in memory
        loaded = peak_mib()
        result = searches[args.worker](queries, args)
        result.update({"peak_mib": peak_mib(), "loaded_mib": loaded})
        print("RESULT " + json.dumps(result))
        return
    gallery = np.load(os.path.join(args.data_dir, f"{args.data}_gallery.npy"))
    loaded = peak_mib()
    case = {
        "exact": case_exact,
        "flat": case_flat,
        "ratio": case_ratio,
        "faiss": case_faiss,
        "faiss_build": case_faiss_build,
        "faiss_refine": case_faiss_refine,
        "lance_build": case_lance_build,
    }
    result = case[args.worker](gallery, queries, args)
    result.update({"peak_mib": peak_mib(), "loaded_mib": loaded})
    print("RESULT " + json.dumps(result))


def run_worker(name: str, args, data: str, factory: str = "", parameters=(), build=None) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--data", data]
    command += ["--data-dir", args.data_dir, "--repeats", str(args.repeats)]
    command += ["--memory-mb", str(args.memory_mb), "--latency-queries", str(args.latency_queries)]
    command += ["--n", str(args.n), "--queries", str(args.queries), "--dim", str(args.dim)]
    if factory:
        command += ["--factory", factory]
    if parameters:
        command += ["--parameters", json.dumps(list(parameters))]
    if build:
        command += ["--build", json.dumps(build)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(
            f"the {name} {factory} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


# --- the driver --------------------------------------------------------------------------------


def approximate_cases(n: int) -> list[tuple[str, list[str]]]:
    """Factory strings scaled to n (about 4 sqrt(n) lists, a power of two) and their settings."""
    nlist = 2 ** round(np.log2(4 * np.sqrt(n)))
    probes = [max(1, nlist // d) for d in (256, 128, 64, 32, 16)]
    return [
        (f"IVF{nlist},Flat", [""] + [f"nprobe={p}" for p in probes]),
        ("HNSW32", [""] + [f"efSearch={e}" for e in (32, 64, 128, 256, 512)]),
        (f"IVF{nlist},PQ32np", [f"nprobe={p}" for p in probes[1::2]]),
    ]


ROW = "{:<18} {:<22} {:>8} {:>8} {:>8} {:>9} {:>7} {:>9} {:>9} {:>9}"


def print_row(case, parameters, row, result, exact_s):
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    print(
        ROW.format(
            case,
            parameters,
            fmt(row.get("build_s"), ".1f"),
            fmt(row.get("batch_s"), ".2f"),
            fmt(exact_s / row["batch_s"], ".1f"),
            fmt(row.get("ms"), ".3f"),
            fmt(row.get("raw_ms"), ".3f"),
            fmt(row.get("recall"), ".4f"),
            fmt(result["peak_mib"], ",.0f"),
            fmt(result["peak_mib"] - result["loaded_mib"], ",.0f"),
        )
    )


def run_data(data: str, args) -> None:
    run_worker("data", args, data)  # in its own process too: the driver stays small
    print(f"\n== {data} data: {args.n:,} x {args.dim} gallery, {args.queries:,} queries, top-{K}")
    header = ("case", "parameters", "build s", "batch s", "x exact", "ms/query", "raw ms")
    print(ROW.format(*header, "recall@10", "peak MiB", "extra MiB"))
    exact = run_worker("exact", args, data)
    exact_s = exact["rows"][0]["batch_s"]
    print_row("ExactIndex", "", exact["rows"][0], exact, exact_s)
    flat = run_worker("flat", args, data)
    print_row("FAISS IndexFlatIP", "", flat["rows"][0], flat, exact_s)
    if args.only == "ivfpq":
        run_ivfpq(data, args, exact_s)
        return
    ratio = run_worker("ratio", args, data)
    best_exact, best_faiss = min(ratio["exact"]), min(ratio["faiss"])
    verdict = "met" if best_exact <= GOAL_RATIO * best_faiss else "NOT met"
    print(
        f"exact, alternating runs in one process (best of {args.repeats}): ExactIndex "
        f"{best_exact:.2f} s, IndexFlatIP {best_faiss:.2f} s: ratio {best_exact / best_faiss:.2f} "
        f"(goal <= {GOAL_RATIO}: {verdict}); each round exact/FAISS: "
        + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(ratio["exact"], ratio["faiss"]))
    )
    print(
        f"peak memory exact / FAISS flat: {exact['peak_mib']:,.0f} / {flat['peak_mib']:,.0f} MiB "
        f"(x{exact['peak_mib'] / flat['peak_mib']:.2f}); FAISS flat's recall against exact "
        f"{flat['rows'][0]['recall']:.4f}"
    )
    if args.only == "exact":
        return
    good = []
    for factory, settings in approximate_cases(args.n):
        result = run_worker("faiss", args, data, factory, settings)
        for row in result["rows"]:
            print_row(factory, row["parameters"], row, result, exact_s)
            if row["recall"] >= GOAL_RECALL and row["ms"] < GOAL_MS:
                good.append((row["ms"], factory, row["parameters"], row["recall"]))
    if good:
        ms, factory, parameters, value = min(good)
        print(
            f"ANN goal (recall@{K} >= {GOAL_RECALL} under {GOAL_MS} ms a query) met: fastest "
            f"{factory} {parameters}: recall {value:.4f} at {ms:.3f} ms"
        )
    else:
        print(
            f"ANN goal (recall@{K} >= {GOAL_RECALL} under {GOAL_MS} ms a query) NOT met by any "
            "setting above on this data and machine"
        )


def run_ivfpq(data: str, args, exact_s: float) -> None:
    """FAISS IVF-PQ and LanceDB IVF-PQ: the same lists, sub-quantizers and probes."""
    nlist = 2 ** round(np.log2(4 * np.sqrt(args.n)))
    probes = [max(1, nlist // d) for d in (128, 64, 32, 16)]
    factory = f"IVF{nlist},PQ32"
    built = run_worker("faiss_build", args, data, factory)
    print(
        f"{factory}: built in {built['build_s']:.1f} s (train + add; peak {built['peak_mib']:,.0f} MiB)"
    )
    served = run_worker("faiss_search", args, data, factory, [f"nprobe={p}" for p in probes])
    for row in served["rows"]:
        print_row(f"FAISS {factory}", row["parameters"], row, served, exact_s)
    refined = run_worker("faiss_refine", args, data, factory, probes[1:3])
    for row in refined["rows"]:
        print_row(f"FAISS {factory}", row["parameters"], row, refined, exact_s)
    build = {"num_partitions": nlist, "num_sub_vectors": 32}
    built = run_worker("lance_build", args, data, build=build)
    print(
        f"LanceDB IVF_PQ (num_partitions={nlist}, num_sub_vectors=32): table written in "
        f"{built['write_s']:.1f} s, index built in {built['build_s']:.1f} s (peak "
        f"{built['peak_mib']:,.0f} MiB)"
    )
    settings = [("bench", {"nprobes": p}) for p in probes]
    settings += [("bench", {"nprobes": p, "refine_factor": 10}) for p in probes[1:3]]
    served = run_worker("lance_search", args, data, parameters=settings)
    for row in served["rows"]:
        print_row("LanceDB IVF_PQ", row["parameters"], row, served, exact_s)
    served = run_worker("lance_search", args, data, parameters=[("bench_flat", {})])
    print_row("LanceDB", "no index", served["rows"][0], served, exact_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery items (1,000,000)")
    parser.add_argument("--queries", type=int, default=1_000, help="queries (1,000)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--data", choices=["random", "clustered", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="100,000 items, 300 queries")
    parser.add_argument(
        "--only",
        choices=["exact", "ivfpq"],
        help="exact: skip the approximate indexes; ivfpq: FAISS and LanceDB IVF-PQ only",
    )
    parser.add_argument("--repeats", type=int, default=3, help="batch searches timed (best)")
    parser.add_argument("--memory-mb", type=float, default=256, help="ExactIndex's budget")
    parser.add_argument(
        "--latency-queries", type=int, default=None, help="one-at-a-time queries (default all)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--factory", help=argparse.SUPPRESS)
    parser.add_argument("--parameters", type=json.loads, help=argparse.SUPPRESS)
    parser.add_argument("--build", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.n, args.queries = 100_000, 300
    if args.latency_queries is None:
        args.latency_queries = args.queries
    import faiss

    print(
        f"threads: FAISS (OpenMP) {faiss.omp_get_max_threads()}, CPUs {os.cpu_count()}; "
        f"ExactIndex memory budget {args.memory_mb:g} MiB; each case in a fresh process"
    )
    with tempfile.TemporaryDirectory() as data_dir:
        args.data_dir = data_dir
        for data in ["random", "clustered"] if args.data == "both" else [args.data]:
            run_data(data, args)


if __name__ == "__main__":
    main()
