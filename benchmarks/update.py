"""Benchmark: an incremental gallery update against a full embedding, on --items images.

A temporary data set of --items tiny PNGs (--size px, in 100 class folders; 997 distinct
images repeated, so that writing them takes seconds) is embedded whole
with ``retrieval.embedder.embed_images``; then --change of the items (default 1%: a third
removed, a third rewritten with new pixels, a third added) are touched and the gallery is
brought up to date with ``retrieval.embedder.update_gallery`` (and again with ``verify``, which
hashes every file). The embedder is a stand-in with embed.py's file path (decode, resize and
crop on worker threads, ``datasets.pipeline.iter_eval_batches``) and a fixed random projection
for a model, so the times are those of the files and the gallery, not of a network: with a
real model the full embedding grows by the model's time per image and the update by that
times the changed items only. With --index (a FAISS factory string, faiss-cpu installed) the
index is built once and then made to follow (``retrieval.faiss_index.update_index``).

It prints each time and the ratio full / update. An update still does a little work per item
of the gallery (one ``stat`` of every file, the list's and the gallery's bookkeeping, the
rewrite of the HDF5 file with the kept embeddings copied): the part that does not grow with
the change.

Measured (2 shared CPU cores, the defaults: 100,000 16 x 16 PNGs, 128-d, ``--index
IVF256,Flat``): full embedding 28.1 s, update of 1% (333 added, 333 rewritten, 333 removed)
5.2 s, ratio 5.4x; the index followed in place in 1.65 s (built in 6.7 s). A first update with
verify of a gallery without hashes 20.0 s (everything embedded again), a second one 3.6 s
(hashes every file, embeds nothing). The stand-in model costs almost nothing (28 s for 100,000
tiny images is decoding), so 5.4x is the floor: a real model adds its time per image to each of
the 100,000 images of the full embedding and to the 666 of the update only. A profile at 50,000
items puts the update's per-item part at about 27 us an item (``stat`` 5 us, reading and
writing the gallery 6 us, the plan 2 us, the rest list and index bookkeeping).

    .venv/bin/python benchmarks/update.py                      # 100,000 items, 1% changed
    .venv/bin/python benchmarks/update.py --items 10000 --index IVF256,Flat
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSES = 100


class ProjectionEmbedder:
    """embed.py's file path with a fixed random projection of the pixels as the "model"."""

    model_id, config_hash, model_step, normalized = "projection", "bench", 0, True
    towers = {"image_tower": "projection", "text_tower": "none"}

    def __init__(self, size: int, dim: int):
        self.image_size, self.dim = (size, size), dim
        self.projection = np.random.default_rng(0).standard_normal((size * size * 3, dim))

    def gallery_identity(self, images):
        from retrieval.gallery import GalleryIdentity, items_hash

        return GalleryIdentity(
            self.model_id,
            self.config_hash,
            items_hash(images.paths, images.labels, images.classes),
            self.model_step,
        )

    def embed_files(self, paths, *, batch_size=64, on_error=None, workers=None):
        from datasets.pipeline import iter_eval_batches
        from retrieval.search import unit_rows

        for indices, images in iter_eval_batches(
            paths,
            image_size=self.image_size,
            resize=None,
            batch_size=batch_size,
            on_error=on_error,
            workers=workers,
        ):
            flat = images.reshape(len(images), -1).astype(np.float32)
            yield indices, unit_rows((flat @ self.projection).astype(np.float32))


DISTINCT = 997  # PNGs encoded once; file i holds number i % DISTINCT (writing stays fast)


def encoded_png(seed: int, size: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_data(root: Path, items: int, size: int) -> None:
    pngs = [encoded_png(seed, size) for seed in range(DISTINCT)]
    for c in range(CLASSES):
        (root / f"c{c:03d}").mkdir(parents=True)
    for i in range(items):
        (root / f"c{i % CLASSES:03d}" / f"{i:07d}.png").write_bytes(pngs[i % DISTINCT])


def image_list(root: Path):
    from datasets.image_list import ImageList

    classes = sorted(p.name for p in root.iterdir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(f.name for f in (root / name).iterdir())
        paths += [f"{name}/{file}" for file in files]
        labels += [label] * len(files)
    return ImageList(root, paths, np.array(labels), classes)


def touch_share(root: Path, items: int, share: float, size: int) -> tuple[int, int, int]:
    """Remove, rewrite and add a third of ``share`` of the items each; the three counts."""
    third = max(1, round(items * share / 3))
    chosen = np.random.default_rng(1).choice(items, 2 * third, replace=False)
    for i in chosen[:third]:
        (root / f"c{i % CLASSES:03d}" / f"{i:07d}.png").unlink()
    for i in chosen[third:]:  # new pixels
        path = root / f"c{i % CLASSES:03d}" / f"{i:07d}.png"
        path.write_bytes(encoded_png(10**8 + int(i), size))
    for i in range(items, items + third):
        path = root / f"c{i % CLASSES:03d}" / f"{i:07d}.png"
        path.write_bytes(encoded_png(2 * 10**8 + i, size))
    return third, third, third


def timed(run):
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--change", type=float, default=0.01, help="share of items touched")
    parser.add_argument("--size", type=int, default=16, help="image side in pixels")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--index", help="a FAISS factory string to build and then update")
    args = parser.parse_args(argv)

    from retrieval.embedder import embed_images, update_gallery
    from retrieval.gallery import read_gallery

    embedder = ProjectionEmbedder(args.size, args.dim)
    folder = Path(tempfile.mkdtemp(prefix="tfcbir-update-"))
    try:
        root, out = folder / "data", folder / "test.h5"
        seconds, _ = timed(lambda: write_data(root, args.items, args.size))
        print(f"wrote {args.items:,} {args.size}x{args.size} PNGs in {seconds:.1f} s")
        full, _ = timed(
            lambda: embed_images(
                embedder, image_list(root), out, split="test", batch_size=args.batch_size
            )
        )
        print(f"full embedding of {args.items:,} images: {full:.1f} s")
        if args.index:
            from retrieval.faiss_index import build_index

            built, _ = timed(lambda: build_index(read_gallery(out), args.index))
            print(f"index {args.index} built in {built:.1f} s")
        removed, rewritten, added = touch_share(root, args.items, args.change, args.size)
        print(f"touched {args.change:.1%}: {removed} removed, {rewritten} rewritten, {added} added")
        update, report = timed(
            lambda: update_gallery(
                embedder, image_list(root), out, split="test", batch_size=args.batch_size
            )
        )
        print(f"update ({report.summary()}): {update:.2f} s")
        print(f"full / update: {full / update:.1f}x")
        if args.index:
            from retrieval.faiss_index import update_index

            seconds, (_, line) = timed(lambda: update_index(read_gallery(out), report, args.index))
            print(f"{line}: {seconds:.2f} s (build: {built:.1f} s)")
        verify, report = timed(
            lambda: update_gallery(
                embedder, image_list(root), out, split="test", verify=True, batch_size=256
            )
        )
        print(
            f"update with verify (hashes every file; the gallery had none, so this first one "
            f"embeds everything again: {report.summary()}): {verify:.1f} s"
        )
        again, report = timed(
            lambda: update_gallery(embedder, image_list(root), out, split="test", verify=True)
        )
        print(f"a second update with verify ({report.summary()}): {again:.2f} s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
