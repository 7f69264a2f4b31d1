"""Benchmark: every registered loss, forward + backward time and peak memory, against the
tensorflow-addons O(B^3) semi-hard triplet loss as the baseline.

B = 256 and 1024 (D = 128, P x K = B/4 x 4; proxy losses get P classes), median of --repeats runs
after a warm-up, each case in a fresh process (see benchmarks/semi_hard.py for how memory is
measured). Ratios are loss / baseline; the baseline is skipped where it would need more than
--max-gb (B = 1024: ~17 GB), and its ratios then read "-".

    .venv/bin/python benchmarks/losses.py            # a few minutes
    .venv/bin/python benchmarks/losses.py --quick    # B = 256 only, one repeat
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before benchmarks/, whose losses.py is this file

from semi_hard import (  # noqa: E402  (benchmarks/ is on the path when run as a script)
    ADDONS,
    MEMORY_NOTE,
    addons_estimate_gb,
    measure,
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-gb", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="B = 256 only, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [256], 1

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's start-up lines out
    import losses

    names = losses.image_loss_names()  # image-text losses take two towers: not comparable
    print(
        f"forward + backward, D = {args.dim}, P x K = B/4 x 4, median of {args.repeats} after "
        f"a warm-up; ratios = loss / addons O(B^3) semi-hard; {MEMORY_NOTE}"
    )
    header = f"{'loss':<24}" + "".join(
        f" | B={B:<5} {'ms':>8} {'MB':>6} {'time x':>7} {'mem x':>6}" for B in args.sizes
    )
    print(header)
    print("-" * len(header))

    baseline = {}
    for B in args.sizes:
        if addons_estimate_gb(B) <= args.max_gb:
            baseline[B] = measure(ADDONS, B, args.dim, args.repeats)

    def cells(result, B):
        if "error" in result:
            return f" | {'failed':>30}"
        base = baseline.get(B, {})
        if "ms" in base:
            ratios = (
                f"{result['ms'] / base['ms']:>7.3f} "
                f"{result['peak_mb'] / max(base['peak_mb'], 1.0):>6.3f}"
            )
        else:
            ratios = f"{'-':>7} {'-':>6}"
        return f" | {'':<7} {result['ms']:>8.1f} {result['peak_mb']:>6.0f} {ratios}"

    row = f"{'addons semi-hard O(B^3)':<24}"
    for B in args.sizes:
        if B in baseline:
            row += cells(baseline[B], B)
        else:
            row += f" | {'skipped: ~' + format(addons_estimate_gb(B), '.0f') + ' GB':>30}"
    print(row, flush=True)
    for name in names:
        row = f"{name:<24}"
        for B in args.sizes:
            row += cells(measure(name, B, args.dim, args.repeats), B)
        print(row, flush=True)


if __name__ == "__main__":
    main()
