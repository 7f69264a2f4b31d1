"""Image throughput of foundation backbones against ResNet-50: images/s, forward pass.

Builds, in one process and through tfcbir's own model builder (preprocessing, backbone, identity
head), the embedding models of

- ``resnet_v1_50`` (keras.applications ResNet50, 2048 features), the baseline;
- a ViT-B/16 (``vit_base_patch16_224_imagenet``'s architecture: 12 blocks, 768 wide, 224 px);
- a CLIP ViT-B/32 image tower (``clip_vit_base_patch32``'s vision encoder and projection);

all with random weights: the keras-hub architectures are written here as preset directories
(their configs and image converters, no weights), so nothing is downloaded. Each model embeds
the same random batch; prints the median images/s over ``--batches`` timed batches after a
warm-up, and each model's ratio to ResNet-50.

    python benchmarks/backbones.py [--batch 32] [--size 224] [--batches 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tfcbir.cli import import_tensorflow, quiet_tensorflow  # noqa: E402

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def write_preset(folder: Path, backbone, converter) -> str:
    """A keras-hub preset directory without weights (config and image converter): enough for
    ``model.weights: none``."""
    import keras

    folder.mkdir(parents=True)
    config = keras.saving.serialize_keras_object(backbone)
    for key in ("compile_config", "build_config"):
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    converter.save_to_preset(str(folder))
    return f"hub:{folder}"


def presets(root: Path, size: int) -> dict[str, str]:
    """name -> model.backbone value of the benchmarked architectures."""
    import keras_hub

    models, layers = keras_hub.models, keras_hub.layers
    vit = models.ViTBackbone(
        image_shape=(size, size, 3),
        patch_size=16,
        num_layers=12,
        num_heads=12,
        hidden_dim=768,
        mlp_dim=3072,
    )
    clip = models.CLIPBackbone(
        models.CLIPVisionEncoder(
            patch_size=32,
            hidden_dim=768,
            num_layers=12,
            num_heads=12,
            intermediate_dim=3072,
            image_shape=(size, size, 3),
        ),
        models.CLIPTextEncoder(
            vocabulary_size=49408,
            embedding_dim=512,
            hidden_dim=512,
            num_layers=12,
            num_heads=8,
            intermediate_dim=2048,
            max_sequence_length=77,
        ),
        projection_dim=512,
    )
    clip_scale = [1.0 / (255.0 * s) for s in CLIP_STD]
    clip_offset = [-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    return {
        "resnet_v1_50": "resnet_v1_50",
        "ViT-B/16": write_preset(
            root / "vit_b16",
            vit,
            layers.ViTImageConverter(image_size=(size, size), scale=1 / 127.5, offset=-1.0),
        ),
        "CLIP ViT-B/32": write_preset(
            root / "clip_b32",
            clip,
            layers.CLIPImageConverter(
                image_size=(size, size), scale=clip_scale, offset=clip_offset
            ),
        ),
    }


def throughput(backbone: str, args) -> tuple[float, int, int]:
    """(median images/s, parameters, embedding width) of ``backbone``'s embedding model."""
    import keras
    import numpy as np
    import tensorflow as tf

    import nets

    keras.utils.set_random_seed(0)
    model = nets.build_embedding_model(
        {"backbone": backbone, "weights": "none", "head": "identity"}, (args.size, args.size)
    )
    forward = tf.function(lambda x: model(x, training=False))
    images = np.random.default_rng(0).integers(
        0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8
    )
    images = tf.constant(images)
    for _ in range(2):  # trace, then one warm batch
        forward(images).numpy()
    times = []
    for _ in range(args.batches):
        start = time.perf_counter()
        forward(images).numpy()
        times.append(time.perf_counter() - start)
    return args.batch / float(np.median(times)), model.count_params(), model.output_shape[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=5, help="timed batches per model")
    args = parser.parse_args()
    quiet_tensorflow()
    import_tensorflow()
    import tensorflow as tf

    devices = tf.config.list_physical_devices("GPU") or tf.config.list_physical_devices("CPU")
    print(
        f"forward pass, batch {args.batch}, {args.size} px, random weights, median of "
        f"{args.batches} batches after warm-up; device {devices[0].name}, "
        f"{os.cpu_count()} CPU threads, TF_ENABLE_ONEDNN_OPTS="
        f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS')}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            name: throughput(value, args) for name, value in presets(Path(tmp), args.size).items()
        }
    baseline = results["resnet_v1_50"][0]
    print(f"  {'backbone':<14} {'images/s':>9} {'x ResNet-50':>12} {'parameters':>12} {'dim':>5}")
    for name, (rate, params, dim) in results.items():
        print(f"  {name:<14} {rate:9.1f} {rate / baseline:12.2f} {params:12,} {dim:5}")


if __name__ == "__main__":
    main()
