"""Benchmark: embedding JPEG files (embed.py's path) against the same model on in-memory pixels.

A temporary folder of --images random-ish JPEGs (500 x 375, quality 90: a colour ramp, shapes and
grain, about the size of a web photo) is embedded with one model in one process, each way
--repeats times in turn (the fastest run of each is kept):

- memory: ``Embedder.embed_pixels`` on the images decoded beforehand (uint8 batches): the model
  forward alone;
- files: ``Embedder.embed_files``, embed.py's path: decode, resize and centre-crop on worker
  threads (``datasets.pipeline.iter_eval_batches``) while the model runs in this thread;
- gallery: ``retrieval.embedder.embed_images``, the same plus the HDF5 gallery writes;
- decode: ``iter_eval_batches`` alone, no model.

It prints images/s, process CPU time per image and CPUs busy (CPU time / wall time) of each, the
ratio files / memory (goal >= 90%: decoding is not the bottleneck), and why it is lower: how long
the model waited for decoded batches (overlap), and the share of the CPU time that decoding
takes, which caps the ratio at forward / (decode + forward) once no CPU is idle. Files and memory
embeddings are checked to agree.

    .venv/bin/python benchmarks/embed.py                          # small_cnn at 64 px
    .venv/bin/python benchmarks/embed.py --model resnet_v1_50     # at 224 px, weights none
    .venv/bin/python benchmarks/embed.py --images 256 --batch-size 32 --repeats 2 --workers 4
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
        grain = rng.standard_normal((height, width, 3), dtype=np.float32)
        pixels = 0.5 * ramp + 6 * grain + 40
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
    params = {
        "backbone": model,
        "weights": "none",
        "head": "direct_normalize",
        "embedding_dim": 128,
    }
    network = nets.build_embedding_model(params, (side, side), pretrained=False)
    return Embedder(
        model=network,
        image_size=(side, side),
        resize=(resize, resize),
        normalized=True,
        model_id="benchmark",
        model_step=0,
        config_hash="benchmark",
        weights=Path("none"),
    )


def measure(run) -> tuple[float, float, object]:
    """Wall and process CPU seconds of ``run()``, and its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SIZES), default="small_cnn")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, help="decoding threads (default: the pipeline's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from tfcbir.cli import quiet_tensorflow

    quiet_tensorflow()  # TensorFlow's settings as embed.py has them
    from datasets.images import load_and_fit
    from datasets.lists import ImageList
    from datasets.pipeline import default_workers, iter_eval_batches
    from retrieval import embedder as embedder_module
    from retrieval.embedder import embed_images

    workers = args.workers or default_workers()
    cores = default_workers()
    embedder = make_embedder(args.model)
    n, bs = args.images, args.batch_size
    with tempfile.TemporaryDirectory(prefix="tfcbir-bench-embed-") as folder:
        folder = Path(folder)
        began = time.perf_counter()
        paths = write_jpegs(folder, n)
        kb = sum(os.path.getsize(p) for p in paths) / n / 1024
        print(
            f"{n} JPEGs {PHOTO[1]}x{PHOTO[0]} q90 (mean {kb:.0f} KB, written in "
            f"{time.perf_counter() - began:.0f} s); {args.model} at {embedder.image_size[0]} px "
            f"(resize {embedder.resize[0]}, weights none), batch {bs}, {workers} decoding "
            f"threads, {cores} CPUs"
        )
        images = ImageList(folder, [Path(p).name for p in paths], np.zeros(n), ["image"])
        pixels = np.stack([load_and_fit(p, embedder.image_size, embedder.resize) for p in paths])
        # Warm-up: trace the forward for a full batch and for the last, shorter one.
        embedder.embed_pixels(pixels[: bs + (n % bs or bs)], batch_size=bs)

        def memory():
            return embedder.embed_pixels(pixels, batch_size=bs)

        waits: list[float] = []  # seconds embed_files waited for each decoded batch

        def timed_batches(*args, **kwargs):
            batches = iter_eval_batches(*args, **kwargs)
            while True:
                start = time.perf_counter()
                batch = next(batches, None)
                waits.append(time.perf_counter() - start)
                if batch is None:
                    return
                yield batch

        def files():
            waits.clear()
            embedder_module.iter_eval_batches = timed_batches
            try:
                found = embedder.embed_files(paths, batch_size=bs, workers=workers)
                result = np.concatenate([embeddings for _, embeddings in found])
            finally:
                embedder_module.iter_eval_batches = iter_eval_batches
            return result

        def gallery():
            out = folder / "gallery.h5"
            out.unlink(missing_ok=True)
            embed_images(embedder, images, out, split="bench", batch_size=bs)

        def decode():
            size, resize = embedder.image_size, embedder.resize
            for _ in iter_eval_batches(
                paths, image_size=size, resize=resize, batch_size=bs, workers=workers
            ):
                pass

        runs = {"memory": memory, "files": files, "gallery": gallery, "decode": decode}
        best = {name: (np.inf, np.inf) for name in runs}
        results, files_waits = {}, []
        for _ in range(args.repeats):
            for name, run in runs.items():
                wall, cpu, results[name] = measure(run)
                if (wall, cpu) < best[name]:
                    best[name] = (wall, cpu)
                    files_waits = list(waits) if name == "files" else files_waits
        np.testing.assert_allclose(results["files"], results["memory"], atol=1e-5)

    rate = {name: n / wall for name, (wall, _) in best.items()}
    cpu_ms = {name: 1000 * cpu / n for name, (_, cpu) in best.items()}
    labels = {
        "decode": f"decode only ({workers} threads, no model)",
        "memory": "memory: forward only (pre-decoded uint8)",
        "files": "files: Embedder.embed_files",
        "gallery": "gallery: embed_images (+ HDF5 writes)",
    }
    print(f"{'':44} {'images/s':>9} {'CPU ms/image':>13} {'CPUs busy':>10}")
    for name in ("decode", "memory", "files", "gallery"):
        busy = cpu_ms[name] * rate[name] / 1000
        print(f"{labels[name]:44} {rate[name]:9.1f} {cpu_ms[name]:13.2f} {busy:10.2f}")
    # Decode and forward share the CPUs: once they are all busy (or the machine is shared),
    # files can reach only forward / (decode + forward) of the memory rate.
    decode_ms, forward_ms = cpu_ms["decode"], cpu_ms["memory"]
    print(
        f"decode is {100 * decode_ms / (decode_ms + forward_ms):.0f}% of the CPU time per image; "
        f"with no idle CPU left files can reach {forward_ms:.2f} / ({decode_ms:.2f} + "
        f"{forward_ms:.2f}) = {100 * forward_ms / (decode_ms + forward_ms):.0f}% of memory"
    )
    # Overlap: how long the model waited for decoded batches in the best files run.
    first, rest = files_waits[0], sum(files_waits[1:])
    busy = best["files"][0] - first - rest
    print(
        f"files: the model waited {rest:.2f} s for decoded batches after the first one "
        f"({first:.2f} s to fill the pipeline); the other {busy:.2f} s it ran the forward "
        f"(alone: {best['memory'][0]:.2f} s; slower by the CPU time decoding, or other "
        "programs, took from it)"
    )
    print(
        f"ratio files / memory: {100 * rate['files'] / rate['memory']:.1f}%, gallery / memory: "
        f"{100 * rate['gallery'] / rate['memory']:.1f}% (best of {args.repeats}; goal >= 90%); "
        "files and memory embeddings agree"
    )
    # CPU time per image hardly depends on what else runs on the machine; wall time does.
    print(
        f"CPU-time ratio (memory / files CPU ms per image, robust to a busy machine): "
        f"{100 * cpu_ms['memory'] / cpu_ms['files']:.1f}%"
    )


if __name__ == "__main__":
    main()
