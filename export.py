"""Export a run's model for serving without tfcbir: ``python export.py -c <config>``.

``--format savedmodel`` (default) writes a SavedModel whose ``serving_default`` signature takes
encoded images (a batch of JPEG/PNG strings) and returns unit-length embeddings, the run's
preprocessing inside; a dual encoder gets an ``embed_texts`` signature too. ``--format tflite``
writes the image tower (on pixels) as float32 TFLite and a dynamic-range quantised copy, and
prints the quantised model's mean embedding cosine to the float one. The model goes to
<run>/export (or -o), replaced atomically, with export.json beside it. See docs/export.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import config
from tfcbir.cli import add_checkpoint_argument, add_config_argument, import_tensorflow, run

SAMPLE_IMAGES = 32  # test images the quantised TFLite model is measured on


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    import_tensorflow()
    from retrieval import sets
    from retrieval.export import export_model

    cfg = config.load(args.config)
    samples = None
    if args.format == "tflite":
        made = sets.splits(cfg)
        protocol = sets.protocol(cfg, made)
        queries = sets.images(cfg, protocol.queries, made)
        samples = [str(queries.root / path) for path in queries.paths[:SAMPLE_IMAGES]]
    out, info = export_model(
        cfg, args.output, checkpoint=args.checkpoint, fmt=args.format, sample_images=samples
    )
    signatures = ", ".join(info.signatures)
    print(
        f"exported {info.model_id} ({info.format}: {info.image_size[0]}x{info.image_size[1]} "
        f"images -> {info.dim}-d, signatures {signatures})",
        file=sys.stderr,
    )
    if info.text_input == "token_ids":
        print(
            "the text signature takes token ids: the hub tokenizer is not inside", file=sys.stderr
        )
    if info.tflite_quantized_cosine is not None:
        print(
            f"dynamic-range quantised vs float32 TFLite: mean embedding cosine "
            f"{info.tflite_quantized_cosine:.6f}",
            file=sys.stderr,
        )
    print(out)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_argument(parser)
    parser.add_argument(
        "--format",
        choices=("savedmodel", "tflite"),
        default="savedmodel",
        help="savedmodel: encoded images -> embeddings (default); tflite: the image tower on "
        "pixels, float32 and dynamic-range quantised",
    )
    parser.add_argument(
        "-o", "--output", type=Path, help="folder to export into (default: <run>/export)"
    )
    add_checkpoint_argument(parser)
    return parser


if __name__ == "__main__":
    run(main)
