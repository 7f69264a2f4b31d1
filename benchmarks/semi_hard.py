"""Benchmark: our semi_hard_triplet (O(B^2) memory) against tensorflow-addons' O(B^3) formulation.

Prints forward + backward time (median of --repeats runs after a warm-up run, inside one
tf.function) and peak memory at B = 128, 512, 1024, 4096 (D = 128, P x K = B/4 x 4), with the
ratios addons / ours.

Memory: each case runs in a fresh Python process and reports how far its peak resident set size
(``ru_maxrss``) rose above its resident size just before the first loss call. On CPU TensorFlow
keeps no allocator statistics (``tf.config.experimental.get_memory_info("CPU:0")`` raises
"Allocator stats not available"), so the process's RSS is the honest measure; it includes
TensorFlow's own buffers for tracing and the gradient.

The addons version is skipped where its estimated peak, ADDONS_TILES tensors of B^3 float32 (it
tiles the B x B distance matrix B times, and its mask and gradient are as large), exceeds
--max-gb: 1024 needs ~4.3 GB per tile.

    .venv/bin/python benchmarks/semi_hard.py            # B = 128, 512, 1024, 4096: a few minutes
    .venv/bin/python benchmarks/semi_hard.py --quick    # B = 128, 512, two repeats
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADDONS = "addons_semi_hard"
# Peak memory of the addons formulation in B^3 float32 tensors: 3.7 at B = 256 and 3.4 at
# B = 512, measured with this script (forward + backward: the tile, its masks, their gradients).
ADDONS_TILES = 4


# --- tensorflow-addons' TripletSemiHardLoss (distance_metric "L2"), as written there ----------


def addons_semi_hard_loss(labels, embeddings, margin=1.0):
    import tensorflow as tf

    def masked_maximum(data, mask, dim=1):
        axis_minimums = tf.math.reduce_min(data, dim, keepdims=True)
        return tf.math.reduce_max((data - axis_minimums) * mask, dim, keepdims=True) + axis_minimums

    def masked_minimum(data, mask, dim=1):
        axis_maximums = tf.math.reduce_max(data, dim, keepdims=True)
        return tf.math.reduce_min((data - axis_maximums) * mask, dim, keepdims=True) + axis_maximums

    squared = tf.math.add(
        tf.math.reduce_sum(tf.math.square(embeddings), axis=[1], keepdims=True),
        tf.math.reduce_sum(tf.math.square(tf.transpose(embeddings)), axis=[0], keepdims=True),
    ) - 2.0 * tf.matmul(embeddings, tf.transpose(embeddings))
    squared = tf.math.maximum(squared, 0.0)
    error_mask = tf.math.less_equal(squared, 0.0)
    pdist_matrix = tf.math.sqrt(squared + tf.cast(error_mask, tf.float32) * 1e-16)
    pdist_matrix *= tf.cast(tf.math.logical_not(error_mask), tf.float32)
    pdist_matrix *= tf.ones_like(pdist_matrix) - tf.linalg.diag(tf.ones([tf.shape(labels)[0]]))

    labels = tf.reshape(labels, [-1, 1])
    adjacency = tf.math.equal(labels, tf.transpose(labels))
    adjacency_not = tf.math.logical_not(adjacency)
    batch_size = tf.size(labels)
    pdist_matrix_tile = tf.tile(pdist_matrix, [batch_size, 1])  # (B * B, B)
    mask = tf.math.logical_and(
        tf.tile(adjacency_not, [batch_size, 1]),
        tf.math.greater(pdist_matrix_tile, tf.reshape(tf.transpose(pdist_matrix), [-1, 1])),
    )
    mask_final = tf.transpose(
        tf.reshape(
            tf.math.greater(tf.math.reduce_sum(tf.cast(mask, tf.float32), 1, keepdims=True), 0.0),
            [batch_size, batch_size],
        )
    )
    adjacency_not = tf.cast(adjacency_not, tf.float32)
    mask = tf.cast(mask, tf.float32)
    negatives_outside = tf.transpose(
        tf.reshape(masked_minimum(pdist_matrix_tile, mask), [batch_size, batch_size])
    )
    negatives_inside = tf.tile(masked_maximum(pdist_matrix, adjacency_not), [1, batch_size])
    semi_hard_negatives = tf.where(mask_final, negatives_outside, negatives_inside)
    loss_mat = margin + pdist_matrix - semi_hard_negatives
    mask_positives = tf.cast(adjacency, tf.float32) - tf.linalg.diag(tf.ones([batch_size]))
    return tf.math.truediv(
        tf.math.reduce_sum(tf.math.maximum(loss_mat * mask_positives, 0.0)),
        tf.math.reduce_sum(mask_positives),
    )


def addons_estimate_gb(B: int) -> float:
    return ADDONS_TILES * 4 * B**3 / 1e9


# --- one case, in a fresh process -------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_case(name: str, B: int, D: int, repeats: int) -> dict:
    """Time forward + backward of loss ``name`` at batch B; measure the peak RSS growth."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import tensorflow as tf

    import losses

    P, K = B // 4, 4
    rng = np.random.default_rng(0)
    labels = tf.constant(rng.permutation(np.repeat(np.arange(P), K)).astype(np.int32))
    x = rng.normal(size=(B, D)).astype(np.float32)
    embeddings = tf.constant(x / np.linalg.norm(x, axis=1, keepdims=True))
    loss = addons_semi_hard_loss if name == ADDONS else losses.get({"name": name}, num_classes=P)

    @tf.function
    def step(labels, embeddings):
        with tf.GradientTape() as tape:
            tape.watch(embeddings)
            value = loss(labels, embeddings)
        sources = [embeddings, *getattr(loss, "trainable_variables", [])]
        return value, tape.gradient(value, sources)

    before_mb = _rss_mb()
    times = []
    for i in range(repeats + 1):  # the first run traces and warms up
        start = time.perf_counter()
        value, grads = step(labels, embeddings)
        float(value), [g.numpy() for g in grads]  # wait for the result
        if i:
            times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "name": name,
        "B": B,
        "ms": 1000 * statistics.median(times),
        "peak_mb": max(peak_mb - before_mb, 0.0),
        "loss": float(value),
    }


def measure(name: str, B: int, D: int, repeats: int) -> dict:
    """run_case in a fresh Python process (peak RSS is per process)."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        name,
        str(B),
        str(D),
        str(repeats),
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"name": name, "B": B, "error": f"exit {done.returncode}: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


MEMORY_NOTE = (
    "memory: peak RSS growth of a fresh process over its size before the first loss "
    "call (ru_maxrss; TF has no CPU allocator stats)"
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 1024, 4096])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--max-gb",
        type=float,
        default=8.0,
        help="skip the O(B^3) version above this estimated peak",
    )
    parser.add_argument("--quick", action="store_true", help="B = 128, 512; 2 repeats")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, B, D, repeats = args.child
        print(json.dumps(run_case(name, int(B), int(D), int(repeats))))
        return
    if args.quick:
        args.sizes, args.repeats = [128, 512], 2

    print(
        f"semi_hard_triplet forward + backward, D = {args.dim}, P x K = B/4 x 4, "
        f"median of {args.repeats} after a warm-up; {MEMORY_NOTE}"
    )
    print(
        f"{'B':>6} | {'ours ms':>9} {'ours MB':>9} | {'addons ms':>10} {'addons MB':>10} | "
        f"{'time x':>7} {'memory x':>8}"
    )
    for B in args.sizes:
        ours = measure("semi_hard_triplet", B, args.dim, args.repeats)
        if "error" in ours:
            print(f"{B:>6} | ours failed: {ours['error']}")
            continue
        row = f"{B:>6} | {ours['ms']:>9.1f} {ours['peak_mb']:>9.0f} | "
        if addons_estimate_gb(B) > args.max_gb:
            row += (
                f"skipped: needs ~{addons_estimate_gb(B):.0f} GB "
                f"({ADDONS_TILES} x B^3 float32) > --max-gb {args.max_gb:g}"
            )
        else:
            addons = measure(ADDONS, B, args.dim, args.repeats)
            if "error" in addons:
                row += f"failed: {addons['error']}"
            else:
                same = abs(addons["loss"] - ours["loss"]) <= 1e-5 * max(1.0, abs(ours["loss"]))
                row += (
                    f"{addons['ms']:>10.1f} {addons['peak_mb']:>10.0f} | "
                    f"{addons['ms'] / ours['ms']:>7.1f} "
                    f"{addons['peak_mb'] / max(ours['peak_mb'], 1.0):>8.1f}"
                )
                row += "" if same else f"  (losses differ: {ours['loss']} vs {addons['loss']})"
        print(row, flush=True)


if __name__ == "__main__":
    main()
