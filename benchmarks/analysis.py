"""Benchmark: the analysis report of a large gallery, against evaluation.py's work on it.

A synthetic gallery (N unit embeddings of D dimensions around C noisy class centres, in memory,
no images) goes through the whole report, :class:`report.build.Report` with its default samples
(t-SNE of 5,000 points; agglomerative, DBSCAN, HDBSCAN and silhouettes on 5,000; k-means on all
N; 10,000 leave-one-out queries; no thumbnails, there are no images). Each part's time is
printed, then the total against the baseline measured in the same run: the retrieval metrics of
``evaluation.py -t 10000`` (the same 10,000 queries against the whole set, NMI left out).

    python benchmarks/analysis.py                      # 100,000 x 128, 1,000 classes
    python benchmarks/analysis.py --n 20000 --classes 200
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_gallery(n: int, n_classes: int, dim: int, seed: int = 0):
    """benchmarks/evaluation.py's synthetic embeddings (:func:`make_data`) as a Gallery."""
    from benchmarks.evaluation import make_data
    from retrieval.gallery import Gallery

    embeddings, labels = make_data(n, n_classes, dim, seed)
    labels = labels.astype(np.int64)
    return Gallery(
        path=Path("synthetic.h5"),
        embeddings=embeddings,
        labels=labels,
        paths=[f"class{label}/{i}.jpg" for i, label in enumerate(labels)],
        classes=[f"class{c}" for c in range(n_classes)],
        normalized=True,
        model_id="synthetic",
        model_step=0,
        config_hash="synthetic",
        items_hash="synthetic",
        created="",
        version="",
        data_root="",
        split="test",
        gallery_id="synthetic",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()

    from report.build import Limits, Report, Space
    from report.clustering import sample_indices
    from retrieval.metrics import evaluate

    gallery = make_gallery(args.n, args.classes, args.dim)
    limits = Limits(thumbnails=0)
    print(
        f"{args.n:,} x {args.dim} unit embeddings of {args.classes:,} classes; report samples: "
        f"{limits.map_points:,} map points, {limits.cluster_points:,} clustered, "
        f"{limits.queries:,} queries; {os.cpu_count()} CPUs",
        flush=True,
    )
    space = Space(
        slug="synthetic",
        kind="trained",
        title="synthetic",
        embeddings=gallery.embeddings,
        normalized=True,
    )
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        result = Report(
            {"name": "synthetic", "data": {"root": folder}},
            gallery,
            [space],
            Path(folder),
            limits=limits,
            show_progress=False,
        ).write()
        report_seconds = time.perf_counter() - start
    print(f"  {'part':<36} {'wall':>8}   {'CPU (all threads)':>8}")
    for part, seconds in result["seconds"].items():
        print(f"  {part:<36} {seconds:8.1f} s {result['cpu_seconds'][part]:8.1f} s")
    cpu = sum(result["cpu_seconds"].values())
    print(f"report: {report_seconds:.1f} s in all ({cpu:.1f} s CPU)", flush=True)

    # The report's own query sample (every image when the set is smaller).
    queries = sample_indices(args.n, limits.queries, seed=2)
    cpu_start = time.process_time()
    start = time.perf_counter()
    evaluate(
        gallery.embeddings[queries],
        gallery.labels[queries],
        gallery.embeddings,
        gallery.labels,
        normalized=True,
        exclude=queries,
        nmi=False,
    )
    baseline = time.perf_counter() - start
    baseline_cpu = time.process_time() - cpu_start
    print(
        f"baseline, evaluation.py -t {len(queries)} (no NMI): {baseline:.1f} s "
        f"({baseline_cpu:.1f} s CPU)"
    )
    print(
        f"report / evaluation: {report_seconds / baseline:.2f}x wall, {cpu / baseline_cpu:.2f}x CPU"
    )
    model = result["models"][0]
    print(
        f"numbers: Recall@1 {model['retrieval']['recall@1']:.3f}, k-means NMI "
        f"{model['clustering']['k-means']['NMI']:.3f} ({model['clustering']['k-means']['parameters']['iterations']} iterations)"
    )


if __name__ == "__main__":
    main()
