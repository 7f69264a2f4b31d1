"""Benchmark: reading a Stanford Online Products sized archive (120,053 listed images).

Writes, once, a tree in SOP's layout with the archive's sizes (Ebay_train.txt: 59,551 images of
11,318 classes, Ebay_test.txt: 60,502 of 11,316, in 12 super-class folders) of empty files
(reading the lists never opens an image), then times:

- ours: ``datasets.lists.load_splits`` on it (parse both lists, check every listed file exists
  with one directory listing per folder, build the split);
- per-file stat: the same parse, with the existence check done the common way, one
  ``os.path.isfile`` per listed image (what the CSV reader did before).

Each is timed cold-ish (a first run) and warm (best of --repeat); the page cache is not dropped,
so "cold" only means the first read in this process.

    python benchmarks/lists.py                  # in a temporary folder, removed afterwards
    python benchmarks/lists.py --dir /tmp/sop   # keep (or reuse) the tree there
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SUPER_CLASSES = [
    "bicycle",
    "cabinet",
    "chair",
    "coffee_maker",
    "fan",
    "kettle",
    "lamp",
    "mug",
    "sofa",
    "stapler",
    "table",
    "toaster",
]
SIZES = {"Ebay_train.txt": (11318, 59551), "Ebay_test.txt": (11316, 60502)}


def make_tree(folder: Path) -> Path:
    """SOP's layout with its sizes; every class has 2 or more images, as in the archive."""
    folder = folder / "Stanford_Online_Products"
    if (folder / "Ebay_test.txt").is_file():
        return folder
    rng = np.random.default_rng(0)
    for name in SUPER_CLASSES:
        (folder / f"{name}_final").mkdir(parents=True, exist_ok=True)
    image_id, class_id = 0, 0
    for list_name, (n_classes, n_images) in SIZES.items():
        counts = np.full(n_classes, 2)
        extra = rng.multinomial(n_images - 2 * n_classes, np.ones(n_classes) / n_classes)
        counts += extra
        lines = ["image_id class_id super_class_id path"]
        for count in counts:
            class_id += 1
            super_id = 1 + class_id % len(SUPER_CLASSES)
            for j in range(count):
                image_id += 1
                relative = f"{SUPER_CLASSES[super_id - 1]}_final/{class_id}_{j}.JPG"
                (folder / relative).touch()
                lines.append(f"{image_id} {class_id} {super_id} {relative}")
        (folder / list_name).write_text("\n".join(lines) + "\n")
    return folder


def ours(folder: Path):
    from datasets.lists import load_splits

    splits = load_splits(folder, {"by": "auto"}, seed=0)
    return len(splits.train), len(splits.test)


def per_file_stat(folder: Path):
    """Parse like ours, then one os.path.isfile per listed path."""
    counts = []
    for name in SIZES:
        with open(folder / name) as handle:
            next(handle)
            rows = [line.split() for line in handle if line.strip()]
        kept = [r for r in rows if os.path.isfile(os.path.join(folder, r[3]))]
        counts.append(len(kept))
    return tuple(counts)


def timed(fn, folder: Path, repeat: int) -> tuple[float, float, tuple]:
    start = time.perf_counter()
    result = fn(folder)
    first = time.perf_counter() - start
    best = first
    for _ in range(repeat - 1):
        start = time.perf_counter()
        fn(folder)
        best = min(best, time.perf_counter() - start)
    return first, best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, help="where to write (or find) the tree; kept")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="tfcbir-sop-"))
    try:
        start = time.perf_counter()
        folder = make_tree(base)
        print(f"tree: {folder} (ready in {time.perf_counter() - start:.1f} s)")
        first, best, found = timed(ours, folder, args.repeat)
        print(f"ours:          first {first:.3f} s, best {best:.3f} s -> {found} images")
        b_first, b_best, b_found = timed(per_file_stat, folder, args.repeat)
        print(f"per-file stat: first {b_first:.3f} s, best {b_best:.3f} s -> {b_found} images")
        assert found == b_found == (59551, 60502), (found, b_found)
        print(f"per-file stat / ours: {b_best / best:.2f}x (best of {args.repeat})")
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
