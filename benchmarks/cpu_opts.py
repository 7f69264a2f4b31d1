"""oneDNN on the CPU: a ResNet50 training step at 64 px with TF_ENABLE_ONEDNN_OPTS=1 against =0.

Each setting runs in a fresh process (TensorFlow reads the variable when it starts); prints the
median step time of each and the ratio, and the largest difference in the loss after the same
steps (oneDNN reorders floating-point sums, so results may differ within tolerance).

    python benchmarks/cpu_opts.py [--steps 8] [--batch 16] [--size 64] [--backbone resnet_v1_50]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys, time
import numpy as np, tensorflow as tf, keras
sys.path.insert(0, {repo!r})
import losses, nets
keras.utils.set_random_seed(0)
model = nets.build_embedding_model({{"backbone": {backbone!r}, "weights": "none",
    "head": "direct_normalize", "embedding_dim": 128}}, ({size}, {size}))
loss_fn = losses.get({{"name": "semi_hard_triplet", "margin": 0.2}})
optimizer = keras.optimizers.Adam(1e-4)
rng = np.random.default_rng(0)
images = rng.integers(0, 256, ({batch}, {size}, {size}, 3)).astype("uint8")
labels = np.repeat(np.arange({batch} // 2), 2).astype("int32")

@tf.function
def step(x, y):
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss

initial = float(step(images, labels))  # traces and warms up; the loss before any update
times, losses_seen = [], []
for _ in range({steps}):
    t = time.perf_counter()
    losses_seen.append(float(step(images, labels)))
    times.append(time.perf_counter() - t)
print(json.dumps({{"median_s": float(np.median(times)), "initial": initial}}))
"""


def measure(onednn: str | None, args) -> dict:
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn or "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    if onednn is None:  # TensorFlow's own default
        del env["TF_ENABLE_ONEDNN_OPTS"]
    code = CHILD.format(
        repo=str(REPO), backbone=args.backbone, size=args.size, batch=args.batch, steps=args.steps
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--backbone", default="resnet_v1_50")
    args = parser.parse_args()
    print(
        f"{args.backbone} training step, batch {args.batch}, {args.size} px, "
        f"median of {args.steps} steps after warm-up"
    )
    default, off, on = measure(None, args), measure("0", args), measure("1", args)
    print(f"  unset (TF's default)     {default['median_s'] * 1000:8.1f} ms/step")
    print(f"  TF_ENABLE_ONEDNN_OPTS=0  {off['median_s'] * 1000:8.1f} ms/step")
    print(f"  TF_ENABLE_ONEDNN_OPTS=1  {on['median_s'] * 1000:8.1f} ms/step  (tfcbir's setting)")
    print(f"  speed-up with oneDNN: {off['median_s'] / on['median_s']:.2f}x")
    first = abs(off["initial"] - on["initial"]) / abs(off["initial"])
    print(f"  relative difference of the loss before any update: {first:.1e}")


if __name__ == "__main__":
    main()
