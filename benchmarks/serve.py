"""Benchmark: the search service over HTTP on loopback against the same searches in-process.

Two workloads, each run by --clients concurrent clients for --seconds:

- upload: a 500 x 375 JPEG photo (cycling through a few) searched for its top --k: decode, embed,
  search (``POST /api/search`` with the file, or ``Searcher.search_bytes``);
- similar: "more like this" of a gallery item (``GET /api/similar/<i>``, or
  ``Searcher.search_gallery``): the search alone, no model.

Then the server's memory under uploads (``--memory-clients`` clients, 8 by default, over HTTP for
--seconds each): (a) the same small JPEGs, (b) the largest PNG the server accepts (its
``max_pixels``, mostly one colour: a few KB that decode to millions of pixels). It prints the
server's resident memory (RSS, from /proc) idle (after a few warm-up searches), its peak during
the run (sampled every 10 ms) and settled (3 s after the run), with p50/p99 latency and the
answers' statuses; the goal: settled within 100 MB of idle, peak under 2x idle.

In-process, the clients are threads calling one :class:`retrieval.searcher.Searcher` (what the
server does inside); over HTTP they are threads with keep-alive connections to ``serve.py``,
started as a subprocess on a free localhost port. It prints requests/s and p50/p99 latency of
each, and the ratio HTTP / in-process (throughput): what HTTP, JSON and the multipart upload
cost. The answers of both paths are checked to be the same. On a small machine the clients,
the server and the in-process searches share the CPUs: compare ratios, not absolute numbers,
across machines.

Without -c it makes its own run in a temporary folder: the demo shapes (12 classes x 60) and
trainings/demo.json's model with untrained weights (search costs do not depend on the weights),
its training split embedded as the gallery (540 images).

    .venv/bin/python benchmarks/serve.py                         # 4 clients, 10 s a measurement
    .venv/bin/python benchmarks/serve.py --clients 8 --seconds 20 --k 20
    .venv/bin/python benchmarks/serve.py -c trainings/demo.json  # a trained, embedded run
    .venv/bin/python benchmarks/serve.py --parts memory --seconds 15  # the memory part only
    .venv/bin/python benchmarks/serve.py --parts memory --serve-options "--decoders 8"
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_run(folder: Path) -> Path:
    """A data_dir in ``folder`` with the demo set and an embedded untrained demo run: its config."""
    import config
    import nets
    from datasets.demo import generate
    from embed import main as embed
    from runs.folder import RunFolder

    os.environ["TFCBIR_DATA_DIR"] = str(folder)
    raw = json.loads((ROOT / "trainings" / "demo.json").read_text())
    generate(folder / raw["data"]["root"])
    path = folder / "bench.json"
    path.write_text(json.dumps({**raw, "name": "bench"}))
    cfg = config.load(path)
    model = nets.build_embedding_model(
        cfg["model"], tuple(cfg["data"]["image_size"]), pretrained=False
    )
    run = RunFolder.of(cfg)
    run.best_weights.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(run.best_weights)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = embed(["-c", str(path)])
    if code != 0:
        raise SystemExit("embedding the benchmark's gallery failed")
    return path


def photos(count: int) -> list[bytes]:
    from benchmarks.embed import write_jpegs

    with tempfile.TemporaryDirectory() as folder:
        return [Path(p).read_bytes() for p in write_jpegs(Path(folder), count, seed=1)]


def drive(clients: int, seconds: float, work) -> dict:
    """``clients`` threads calling ``work(client, n)`` for ``seconds``: throughput, latencies."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop = time.perf_counter() + seconds
    errors: list[BaseException] = []

    def client(c: int) -> None:
        n = c
        try:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                work(c, n)
                latencies[c].append(time.perf_counter() - started)
                n += clients
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    every = np.array([t for each in latencies for t in each]) * 1000
    return {
        "requests": len(every),
        "per_s": len(every) / elapsed,
        "p50": float(np.percentile(every, 50)),
        "p99": float(np.percentile(every, 99)),
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(config_path: Path, port: int, options: str = "") -> subprocess.Popen:
    import httpx

    # Its messages (an access-log line per request) to a file: a pipe nobody reads would fill
    # and stop the server.
    messages = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the server)
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "serve.py"), "-c", str(config_path), "--port", str(port)]
        + shlex.split(options),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=messages,
        text=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            messages.seek(0)
            raise SystemExit(f"serve.py stopped: {messages.read().strip()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("serve.py did not answer /healthz within 3 minutes")


def rss_mb(pid: int) -> float:
    """A process's resident memory (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def largest_png(max_pixels: int) -> bytes:
    """A PNG of the most pixels the server accepts (a square), one colour but for a corner."""
    from PIL import Image

    side = math.isqrt(max_pixels)
    pixels = np.full((side, side, 3), 200, np.uint8)
    pixels[:64, :64] = np.arange(64, dtype=np.uint8)[:, None, None] * 4
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def measure_memory(server_pid: int, clients: int, seconds: float, work) -> dict:
    """``drive`` over HTTP while the server's RSS is sampled: idle, peak and settled MB."""
    idle = rss_mb(server_pid)
    peak = idle
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mb(server_pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        measured = drive(clients, seconds, work)
    finally:
        done.set()
        sampler.join()
    time.sleep(3)
    return {**measured, "idle": idle, "peak": peak, "settled": rss_mb(server_pid)}


def memory_part(server, port: int, clients: int, seconds: float, k: int, queries) -> list:
    """The memory table's rows: (workload, measurement, statuses) for small JPEGs, then the
    largest accepted PNGs."""
    import httpx

    base = f"http://127.0.0.1:{port}"
    max_pixels = httpx.get(f"{base}/api/info").json()["max_pixels"]
    big = largest_png(max_pixels)
    side = math.isqrt(max_pixels)
    sessions = [httpx.Client(base_url=base, timeout=120) for _ in range(clients)]
    rows = []
    try:
        for name, images, kind in (
            ("small JPEGs (500 x 375)", queries, "image/jpeg"),
            (f"largest PNG ({side} x {side}, {len(big) // 1024} KB)", [big], "image/png"),
        ):
            statuses: dict[int, int] = {}

            def upload(c, n, images=images, kind=kind, statuses=statuses):
                files = {"image": (f"q{n}", images[n % len(images)], kind)}
                status = sessions[c].post(f"/api/search?k={k}", files=files).status_code
                statuses[status] = statuses.get(status, 0) + 1

            for n in range(4):  # warm-up: the first searches allocate the model's buffers
                upload(0, n)
            statuses.clear()
            rows.append((name, measure_memory(server.pid, clients, seconds, upload), statuses))
    finally:
        for session in sessions:
            session.close()
    return rows


def print_memory(rows: list, clients: int) -> None:
    print(
        f"\nserver memory, {clients} clients uploading over HTTP (RSS, MB; "
        "goal: settled - idle < 100, peak < 2 x idle)"
    )
    print(
        f"{'workload':<34} {'idle':>7} {'peak':>7} {'settled':>8} {'req/s':>7} "
        f"{'p50 ms':>8} {'p99 ms':>8}  statuses"
    )
    for name, m, statuses in rows:
        shown = ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items()))
        print(
            f"{name:<34} {m['idle']:>7.0f} {m['peak']:>7.0f} {m['settled']:>8.0f} "
            f"{m['per_s']:>7.1f} {m['p50']:>8.1f} {m['p99']:>8.1f}  {shown}"
        )
    for name, m, _ in rows:
        growth, ratio = m["settled"] - m["idle"], m["peak"] / m["idle"]
        verdict = "met" if growth < 100 and ratio < 2 else "MISSED"
        print(f"{name}: settled {growth:+.0f} MB, peak {ratio:.2f} x idle: goal {verdict}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", type=Path, help="an embedded run (default: its own)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=10, help="length of each measurement")
    parser.add_argument("--k", type=int, default=10, help="answers per query")
    parser.add_argument(
        "--memory-clients", type=int, default=8, help="concurrent uploaders of the memory part"
    )
    parser.add_argument(
        "--parts",
        default="throughput,memory",
        help="what to measure: throughput (HTTP against in-process), memory, or both",
    )
    parser.add_argument(
        "--serve-options",
        default="",
        help='serve.py options of the memory part\'s server, e.g. "--decoders 8 --max-pixels 40000000"',
    )
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))

    from tfcbir.cli import import_tensorflow, quiet_tensorflow, setup_logging

    quiet_tensorflow()  # TensorFlow's settings as serve.py has them
    setup_logging()
    import_tensorflow()
    import config
    from retrieval.searcher import Searcher

    with tempfile.TemporaryDirectory() as folder:
        config_path = args.config or make_run(Path(folder))
        queries = photos(8)
        if "throughput" in parts:
            searcher = Searcher.open(config.load(config_path), config_path=config_path)
            print(
                f"gallery {searcher.gallery.path.name}: {len(searcher)} images, "
                f"{searcher.gallery.dim}-d; model input {searcher.embedder.image_size}; "
                f"k = {args.k}; {args.clients} clients x {args.seconds:g} s; "
                f"{os.cpu_count()} CPUs shared by clients and server"
            )
            rows = throughput_part(searcher, config_path, queries, args)
            del searcher
            print_throughput(rows)
        if "memory" in parts:
            port = free_port()
            server = start_server(config_path, port, args.serve_options)  # fresh: idle memory
            try:
                rows = memory_part(server, port, args.memory_clients, args.seconds, args.k, queries)
            finally:
                server.terminate()
                server.wait(30)
            print_memory(rows, args.memory_clients)


def throughput_part(searcher, config_path: Path, queries: list[bytes], args) -> list:
    """(workload, in-process measurement, HTTP measurement) of uploads and "more like this"."""
    import httpx

    items = np.random.default_rng(0).permutation(len(searcher))

    def upload_in_process(_c, n):
        return searcher.search_bytes([queries[n % len(queries)]], args.k)[0]

    def similar_in_process(_c, n):
        return searcher.search_gallery([int(items[n % len(items)])], args.k)[0]

    port = free_port()
    server = start_server(config_path, port)
    sessions = [
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) for _ in range(args.clients)
    ]
    try:

        def upload_http(c, n):
            files = {"image": (f"q{n}.jpg", queries[n % len(queries)], "image/jpeg")}
            answer = sessions[c].post(f"/api/search?k={args.k}", files=files)
            answer.raise_for_status()
            return answer.json()

        def similar_http(c, n):
            answer = sessions[c].get(f"/api/similar/{items[n % len(items)]}?k={args.k}")
            answer.raise_for_status()
            return answer.json()

        for n in range(3):  # the same answers both ways
            served, direct = upload_http(0, n), upload_in_process(0, n)
            assert [(r["index"], r["score"]) for r in served["results"]] == [
                (a.index, a.score) for a in direct.answers
            ], "HTTP and in-process answers differ"
            served, direct = similar_http(0, n), similar_in_process(0, n)
            assert [r["index"] for r in served["results"]] == [a.index for a in direct.answers]
        rows = []
        for name, local, remote in (
            ("upload", upload_in_process, upload_http),
            ("similar", similar_in_process, similar_http),
        ):
            drive(args.clients, min(2.0, args.seconds), local)  # warm-up
            measured_local = drive(args.clients, args.seconds, local)
            drive(args.clients, min(2.0, args.seconds), remote)
            measured_remote = drive(args.clients, args.seconds, remote)
            rows.append((name, measured_local, measured_remote))
    finally:
        for session in sessions:
            session.close()
        server.terminate()
        server.wait(30)
    return rows


def print_throughput(rows: list) -> None:
    print(
        f"\n{'workload':<9} {'path':<11} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
    )
    for name, local, remote in rows:
        for path, m in (("in-process", local), ("HTTP", remote)):
            print(
                f"{name:<9} {path:<11} {m['requests']:>8} {m['per_s']:>8.1f} "
                f"{m['p50']:>8.2f} {m['p99']:>8.2f}"
            )
    print()
    for name, local, remote in rows:
        print(
            f"{name}: HTTP / in-process throughput {remote['per_s'] / local['per_s']:.2f}, "
            f"p50 latency +{remote['p50'] - local['p50']:.2f} ms"
        )


if __name__ == "__main__":
    main()
