"""Benchmark: the cost of data.augment's presets, per batch and in a training run.

1. Augmentation of one batch: :meth:`datasets.augment.Augmentation.apply` over a batch of decoded
   images in memory (random noise, so nothing is skipped), with the pipeline's generators, for
   today's default (crop + flip), ``none``, ``light`` and ``strong``; at the demo's sizes
   (56 x 56 decoded, 48 x 48 crops, P x K = 8 x 4) and at ImageNet's (256 -> 224, 32 images).
   Printed: milliseconds per batch (best of ``--repeats`` rounds) and the ratio to the default.
2. With ``--train-steps N`` (default 60; 0 skips it): the demo config (trainings/demo.json)
   trained for N steps on a freshly generated demo set with each preset, in a temporary data
   folder; printed: the steps/s over the second half of the run (metrics.csv's step and
   elapsed_s columns) and its ratio to the default, after an unreported warm-up run (the first
   run in a process pays TensorFlow's start-up). The pipeline augments on its own threads while
   TensorFlow trains, so a batch that augments faster than a step trains costs little.

    python benchmarks/augment.py
    python benchmarks/augment.py --train-steps 0 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from datasets.augment import PRESETS, Augmentation  # noqa: E402  (after the path is set)

SETTINGS = {"default": {}, **{name: {"preset": name} for name in PRESETS}}
SIZES = {"demo": ((56, 56), (48, 48), 32), "imagenet": ((256, 256), (224, 224), 32)}


def augmentation_of(setting: dict) -> Augmentation:
    preset = setting.get("preset")
    return Augmentation.from_config(PRESETS[preset]) if preset else Augmentation()


def time_batches(augment: Augmentation, decoded: np.ndarray, size, repeats: int) -> float:
    """Best seconds to augment ``decoded`` ``(B, H, W, 3)`` into one batch, as TrainData does."""
    best = float("inf")
    out = np.empty((len(decoded), *size, 3), np.uint8)
    for step in range(repeats):
        began = time.perf_counter()
        rng = np.random.default_rng([0, step, 1])
        for slot, image in enumerate(decoded):
            image_rng = np.random.default_rng([0, step, 4, slot]) if augment.per_image else None
            out[slot] = augment.apply(image, size, rng, image_rng)
        best = min(best, time.perf_counter() - began)
    return best


def batch_table(repeats: int) -> None:
    print(f"augmentation of one batch (best of {repeats}), ms; ratio to default")
    for label, (decoded_size, size, count) in SIZES.items():
        decoded = np.random.default_rng(0).integers(0, 256, (count, *decoded_size, 3), np.uint8)
        base = None
        for name, setting in SETTINGS.items():
            seconds = time_batches(augmentation_of(setting), decoded, size, repeats)
            base = base or seconds
            print(
                f"  {label:9s} {count} x {decoded_size[0]}->{size[0]}  {name:8s} "
                f"{1000 * seconds:8.2f} ms  {seconds / base:5.2f}x"
            )


def train_demo(steps: int) -> None:
    """Train the demo config for ``steps`` with each setting; print the steps/s."""
    import config
    from datasets.demo import generate
    from training.trainer import train

    with open(os.path.join(ROOT, "trainings", "demo.json")) as handle:
        demo = json.load(handle)
    with tempfile.TemporaryDirectory() as folder:
        os.environ["TFCBIR_DATA_DIR"] = folder
        generate(os.path.join(folder, demo["data"]["root"]))
        print(f"the demo config trained {steps} steps; steps/s over the second half")
        base = None
        warm_up = {"warm-up": {}}  # the first run in a process pays TensorFlow's start-up
        for name, setting in {**warm_up, **SETTINGS}.items():
            raw = json.loads(json.dumps(demo))
            raw["data"]["augment"] = setting or raw["data"]["augment"]  # a preset alone
            raw["train"].update(steps=steps, validate_every=0, checkpoint_every=steps)
            began = time.perf_counter()
            result = train(config.resolve({**raw, "name": f"augment_{name}"}))
            wall = time.perf_counter() - began
            metrics = result.run.read_metrics()
            logged, elapsed = metrics["step"], metrics["elapsed_s"]
            middle = len(logged) // 2
            rate = float((logged[-1] - logged[middle]) / (elapsed[-1] - elapsed[middle]))
            if name in warm_up:
                continue
            base = base or rate
            print(f"  {name:8s} {rate:7.2f} steps/s  {rate / base:5.2f}x  (run {wall:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="rounds per batch timing")
    parser.add_argument("--train-steps", type=int, default=60, help="0: no training runs")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; NumPy {np.__version__}")
    batch_table(args.repeats)
    if args.train_steps:
        from tfcbir.cli import quiet_tensorflow

        quiet_tensorflow()
        train_demo(args.train_steps)


if __name__ == "__main__":
    main()
