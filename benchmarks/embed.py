"""Benchmark: embedding JPEG files (embed.py's path) against the same model on in-memory pixels.

A temporary folder of --images random-ish JPEGs (500 x 375, quality 90: a smooth background,
shapes and grain, about the size of a web photo) is embedded twice with one model, in the same
process, alternating --repeats times (best run of each kept):

- files: ``Embedder.embed_files`` - the code path of ``embed.py``: decode, resize and centre-crop
  on worker threads (``datasets.pipeline.iter_eval_batches``), model forward in this thread;
- memory: ``Embedder.embed_pixels`` on the same images decoded beforehand (uint8 batches), i.e.
  the model forward alone.

It prints both rates (images/s), the ratio files / memory (goal >= 90%: decoding is not the
bottleneck) and, to explain a low ratio, the decode-only rate (all worker threads, no model) and
the ideal rate of a machine whose cores are shared by decode and forward, 1 / (1/decode +
1/forward), which is what the files path can reach when both are limited by the same CPUs.
The two paths' embeddings are checked to agree.

    .venv/bin/python benchmarks/embed.py                          # small_cnn at 64 px
    .venv/bin/python benchmarks/embed.py --model resnet_v1_50     # at 224 px, weights none
    .venv/bin/python benchmarks/embed.py --images 256 --batch-size 32 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {"small_cnn": 64, "resnet_v1_50": 224}  # the input side each model is benchmarked at
PHOTO = (375, 500)  # (height, width) of the generated JPEGs


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` 500 x 375 JPEGs (quality 90) of smooth colour, shapes and grain; their paths."""
    from PIL import Image, ImageDraw

    height, width = PHOTO
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        a, b = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        ramp = (x / width)[..., None] * a + (y / height)[..., None] * b
        pixels = 0.5 * ramp + rng.normal(0, 6, (height, width, 3)).astype(np.float32) + 40
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 8))):
            x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
            x1, y1 = x0 + rng.integers(30, 250), y0 + rng.integers(30, 200)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((int(x0), int(y0), int(x1), int(y1)), fill=colour)
        path = folder / f"{i:05d}.jpg"
        image.save(path, quality=90)
        paths.append(str(path))
    return paths


def make_embedder(model: str):
    import nets
    from retrieval.embedder import Embedder

    side = SIZES[model]
    resize = round(side * 256 / 224)  # the usual evaluation view: resize, then centre-crop
    params = {"backbone": model, "weights": "none", "head": "direct_normalize",
              "embedding_dim": 128}
    network = nets.build_embedding_model(params, (side, side), pretrained=False)
    return Embedder(model=network, image_size=(side, side), resize=(resize, resize),
                    normalized=True, model_id="benchmark", model_step=0, config_hash="benchmark",
                    weights=Path("none"))


def time_files(embedder, paths, batch_size, workers) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    parts = [e for _, e in embedder.embed_files(paths, batch_size=batch_size, workers=workers)]
    return time.perf_counter() - start, np.concatenate(parts)


def time_memory(embedder, pixels, batch_size) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    embeddings = embedder.embed_pixels(pixels, batch_size=batch_size)
    return time.perf_counter() - start, embeddings


def time_decode(embedder, paths, batch_size, workers) -> float:
    from datasets.pipeline import iter_eval_batches

    start = time.perf_counter()
    for _ in iter_eval_batches(paths, image_size=embedder.image_size, resize=embedder.resize,
                               batch_size=batch_size, workers=workers):
        pass
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SIZES), default="small_cnn")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, help="decoding threads (default: the pipeline's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from datasets.images import load_and_fit
    from datasets.pipeline import default_workers

    workers = args.workers or default_workers()
    embedder = make_embedder(args.model)
    n, bs = args.images, args.batch_size
    with tempfile.TemporaryDirectory(prefix="tfcbir-bench-embed-") as folder:
        began = time.perf_counter()
        paths = write_jpegs(Path(folder), n)
        kb = sum(os.path.getsize(p) for p in paths) / n / 1024
        print(f"{n} JPEGs {PHOTO[1]}x{PHOTO[0]} q90 (mean {kb:.0f} KB) written in "
              f"{time.perf_counter() - began:.1f} s; model {args.model} at "
              f"{embedder.image_size[0]} px (resize {embedder.resize[0]}, weights none), "
              f"batch {bs}, {workers} decoding threads, {os.cpu_count()} CPUs")

        start = time.perf_counter()
        pixels = np.stack([load_and_fit(p, embedder.image_size, embedder.resize) for p in paths])
        decode_one = (time.perf_counter() - start) / n
        # Warm-up: trace the forward for a full batch and for the last, shorter one.
        embedder.embed_pixels(pixels[: bs + n % bs or bs], batch_size=bs)
        start = time.perf_counter()
        embedder.embed_pixels(pixels[:bs], batch_size=bs)
        forward_one = (time.perf_counter() - start) / bs

        files, memory, decode = [], [], []
        for _ in range(args.repeats):
            seconds, from_memory = time_memory(embedder, pixels, bs)
            memory.append(seconds)
            seconds, from_files = time_files(embedder, paths, bs, workers)
            files.append(seconds)
            decode.append(time_decode(embedder, paths, bs, workers))
        np.testing.assert_allclose(from_files, from_memory, atol=1e-5)

    rate = {name: n / min(times) for name, times in
            (("files", files), ("memory", memory), ("decode", decode))}
    shared = 1 / (1 / rate["decode"] + 1 / rate["memory"])
    print(f"one image, one thread: decode+resize+crop {1000 * decode_one:.2f} ms, "
          f"forward {1000 * forward_one:.2f} ms (in a batch of {bs})")
    print(f"decode only ({workers} threads, no model): {rate['decode']:8.1f} images/s")
    print(f"memory (forward only):                 {rate['memory']:8.1f} images/s")
    print(f"files (embed.py's path):               {rate['files']:8.1f} images/s")
    print(f"ideal with shared cores 1/(1/decode + 1/forward): {shared:.1f} images/s "
          f"({100 * shared / rate['memory']:.0f}% of memory)")
    print(f"ratio files / memory: {100 * rate['files'] / rate['memory']:.1f}% (best of "
          f"{args.repeats}; goal >= 90%); the two paths' embeddings agree")


if __name__ == "__main__":
    main()
