"""Benchmark: the latency of one text query (encode the words + search the gallery) against the
search alone, on a gallery of N random unit vectors (default 100,000), top-10, exact search.

Each query is answered as ``cbir.py --text`` answers it: the text tower's tokenizer, the text
tower (compiled, as retrieval.embedder.TextEncoder runs it), then ExactIndex.search for the top
10. The text tower is the from-scratch one of trainings/demo_text.json (random weights: the time
does not depend on them), or, with ``--preset FOLDER``, a keras-hub CLIP or SigLIP preset saved
locally (nothing is downloaded). Queries are one at a time, after a warm-up; p50 and p99 over
``--queries`` of them, for both the whole query and the search alone, measured alternately in
the same run so that other load on the machine hits both alike.

    python benchmarks/text_query.py                      # 100k x 64 (the demo's dimension)
    python benchmarks/text_query.py --dim 512            # CLIP ViT-B/32's embedding size
    python benchmarks/text_query.py --preset /models/clip_vit_base_patch32
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

K = 10
COLOURS = ("red", "blue", "green", "yellow", "pink", "purple", "white", "grey")
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "heart", "arrow")
SIZES = ("small", "medium", "large")
PLACES = ("at the top left", "in the centre", "on the right", "at the bottom")


def captions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        f"a {rng.choice(SIZES)} {rng.choice(COLOURS)} {rng.choice(SHAPES)} {rng.choice(PLACES)}"
        for _ in range(n)
    ]


def text_encoder(preset: str | None, dim: int):
    """A TextEncoder as cbir.py uses it: the demo's scratch tower or a local preset's."""
    import keras

    import nets
    from datasets.tokenizer import WordTokenizer
    from retrieval.embedder import TextEncoder

    keras.utils.set_random_seed(0)
    if preset:
        tower = nets.build_text_tower({"tower": f"hub:{preset}"}, None)
    else:
        tokenizer = WordTokenizer.build(captions(2000, 1), vocab_size=10000, max_length=16)
        params = {"tower": "scratch", "width": 128, "layers": 2, "heads": 4, "max_length": 16}
        tower = nets.build_text_tower(params, dim, tokenizer=tokenizer)
    return TextEncoder(tower, model_id="", model_step=0, config_hash="", towers={})


def percentiles(times: list[float]) -> tuple[float, float]:
    ms = np.array(times) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="gallery size (100000)")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimension (64)")
    parser.add_argument("--queries", type=int, default=300, help="timed queries (300)")
    parser.add_argument("--preset", help="a local keras-hub CLIP/SigLIP preset folder")
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from tfcbir.cli import import_tensorflow, quiet_tensorflow

    quiet_tensorflow()
    import_tensorflow()
    from retrieval.search import ExactIndex

    encoder = text_encoder(args.preset, args.dim)
    dim = encoder.dim
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((args.n, dim), dtype=np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    index = ExactIndex(gallery, normalized=True)
    texts = captions(args.queries + 20, seed=2)

    for text in texts[:20]:  # warm-up: tracing, caches
        index.search(encoder.embed([text]), K)
    whole, search_only = [], []
    for text in texts[20:]:
        start = time.perf_counter()
        query = encoder.embed([text])
        index.search(query, K)
        whole.append(time.perf_counter() - start)
        start = time.perf_counter()
        index.search(query, K)
        search_only.append(time.perf_counter() - start)

    tower = f"hub:{args.preset}" if args.preset else "scratch (the demo's: width 128, 2 blocks)"
    print(
        f"text query latency: {args.n:,} x {dim} gallery (random unit vectors), top-{K}, exact "
        f"search, text tower {tower}, {args.queries} queries one at a time"
    )
    (w50, w99), (s50, s99) = percentiles(whole), percentiles(search_only)
    print(f"{'':<22} {'p50 ms':>8} {'p99 ms':>8}")
    print(f"{'encode + search':<22} {w50:>8.2f} {w99:>8.2f}")
    print(f"{'search alone':<22} {s50:>8.2f} {s99:>8.2f}")
    print(f"{'encode (difference)':<22} {w50 - s50:>8.2f} {w99 - s99:>8.2f}")
    print(f"ratio (encode + search) / search: p50 {w50 / s50:.2f}x, p99 {w99 / s99:.2f}x")


if __name__ == "__main__":
    main()
