"""Benchmark: the pretrained-backbone tricks, measured on a backbone pretrained offline.

ImageNet weights cannot be downloaded on the build machines, so the pretrained backbone is made
here, honestly: ``datasets.demo.generate`` draws all 16 shapes (400 images each at 32 x 32 px, the
ablation's data of benchmarks/recipe.py), the first 8 shapes pretrain a ``small_cnn``
(trainings/demo.json's settings, one run, seed ``PRETRAIN_SEED``), and its backbone's weights are
saved to a file (``pretrained_backbone.weights.h5``). The other 8 shapes, classes the backbone has
never seen, are the fine-tuning data: split by images as the ablation's (a quarter of each class
for test; 10 % of the rest held out to select the model, Recall@1, train.py's default), the
fine-tuning config is trainings/demo.json with a shorter schedule (``FINETUNE``) and
``model.weights`` pointing at the file. Settings (``--settings``):

- ``scratch``: the same config from random weights (``model.weights: none``), for reference;
- ``pretrained``: from the pretrained backbone, every layer training from step 1;
- ``freeze_batchnorm``: ``model.freeze_batchnorm: true`` (BatchNorm statistics and scale fixed);
- ``warmup``: ``train.freeze_backbone_steps`` (the head trains alone first);
- ``freeze_batchnorm+warmup``: both.

``train.optimizer.layer_decay`` is for transformer towers (``hub:``); on small_cnn the config is
refused (the benchmark prints the refusal), so it is measured on a tiny ViT made offline: a
keras-hub ``ViTBackbone`` (``VIT``: 32 x 32 px input, 8 px patches, 4 blocks of width 32) with
random weights and its ``ViTImageConverter``, saved as a preset folder (``vit_preset``, used as
``model.backbone: "hub:<folder>"``), is pretrained on the same first 8 shapes (demo.json at
32 px with ``VIT_TRAINING``'s proxy-anchor loss, AdamW and 4,000 steps: under demo.json's own
loss and optimiser the ViT stays at chance; seed ``PRETRAIN_SEED``); its tower's weights are
saved to a file (``pretrained_vit.weights.h5``), and fine-tuning loads it (``model.weights``)
with the same loss and optimiser on the CNN's schedule, and ``backbone_lr_multiplier`` 0.3
(trainings/recipes/finetune_vit.json's):

- ``vit_scratch``: the same fine-tuning from the preset's random weights, for reference;
- ``vit_pretrained``: every block at the backbone's rate;
- ``vit_layer_decay``: the same with ``train.optimizer.layer_decay: 0.75`` (the recipe's).

Each setting runs once per seed (``--seeds``, default 0,1,2; the seed also draws the split and
the training order; the pretrained backbone is the same file for all). The model is the run's
best on the holdout; it is scored on every test query (MAP@R, Recall@1, mAP@10 against the
training images). Printed: mean ± sample standard deviation over the seeds.

    python benchmarks/finetune.py                  # every setting, 3 seeds
    python benchmarks/finetune.py --quick          # smoke run: tiny data, 30 steps
    python benchmarks/finetune.py --settings vit_pretrained,vit_layer_decay   # the ViT part
    python benchmarks/finetune.py --json f.json    # keep every run's numbers

The table and its command are in docs/recipes.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.recipe import (  # noqa: E402 - after the path fix, as the other benchmarks
    BASELINE,
    METRICS,
    add_run_arguments,
    read_json,
    record_run,
    run_config,
    spread,
    train_and_score,
)

DATA = {"classes": 16, "per_class": 400, "size": 32}
QUICK_DATA = {"classes": 16, "per_class": 16, "size": 32}
QUICK_STEPS = 30
PRETRAIN_SEED = 1000
# The fine-tuning schedule (the baseline's, halved): 400 steps, linear decay from step 200.
FINETUNE = {
    "steps": 400,
    "lr_schedule": {"name": "linear", "decay_start": 200},
    "checkpoint_every": 100,
    "validate_every": 100,
}
WARMUP_STEPS = 100  # train.freeze_backbone_steps of the warm-up settings (quick: a third)
CNN_SETTINGS = ("scratch", "pretrained", "freeze_batchnorm", "warmup", "freeze_batchnorm+warmup")
VIT_SETTINGS = ("vit_scratch", "vit_pretrained", "vit_layer_decay")
SETTINGS = CNN_SETTINGS + VIT_SETTINGS
# The tiny ViT (keras_hub.models.ViTBackbone's arguments): 16 patches of 8 px, 4 blocks, so that
# depth matters to layer decay; small enough to train in about a minute on a CPU.
VIT = {
    "image_shape": (32, 32, 3),
    "patch_size": 8,
    "num_layers": 4,
    "num_heads": 2,
    "hidden_dim": 32,
    "mlp_dim": 64,
}
# A ViT from random weights barely moves under demo.json's semi-hard triplet loss and adam at
# 1e-3 in 800 steps (holdout Recall@1 0.12-0.16 over 8 classes, chance 0.125, in trials of
# losses, rates and 4 px patches); a proxy loss, AdamW with a warm-up and 4,000 steps give it
# features worth fine-tuning (holdout Recall@1 about 0.34). Fine-tuning keeps the loss and
# optimiser, on the CNN's schedule (FINETUNE).
VIT_TRAINING = {
    "loss": {"name": "proxy_anchor"},
    "train": {
        "steps": 4000,
        "optimizer": {"name": "adamw", "lr": 0.002, "weight_decay": 0.05},
        "lr_schedule": {"name": "cosine", "warmup_steps": 200, "decay_start": 200},
        "checkpoint_every": 400,
        "validate_every": 400,
    },
}
VIT_BACKBONE_LR_MULTIPLIER = 0.3  # trainings/recipes/finetune_vit.json's
VIT_LAYER_DECAY = 0.75  # trainings/recipes/finetune_vit.json's


def split_shapes(folder: str, data: dict) -> tuple[str, str]:
    """The demo set drawn into ``folder``, its shapes moved into two roots (relative to
    ``folder``): the first half of the classes (pretraining) and the other half (fine-tuning)."""
    from datasets.demo import SHAPES, generate

    drawn = generate(os.path.join(folder, "all_shapes"), **data)
    ordered = [name for name in SHAPES if (drawn / name).is_dir()]  # the generator's order
    half = len(ordered) // 2
    roots = ("pretrain_shapes", "finetune_shapes")
    for root, names in zip(roots, (ordered[:half], ordered[half:])):
        os.makedirs(os.path.join(folder, root), exist_ok=True)
        for name in names:
            shutil.move(str(drawn / name), os.path.join(folder, root, name))
    return roots


def make_vit_preset(folder: str) -> str:
    """The tiny ViT (``VIT``) with random weights (seed ``PRETRAIN_SEED``) and its image
    converter (pixels to [-1, 1]) saved as a keras-hub preset in ``folder``/vit_preset; the
    ``model.backbone`` that loads it (``hub:<folder>``)."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(PRETRAIN_SEED)
    preset = os.path.join(folder, "vit_preset")
    backbone = keras_hub.models.ViTBackbone(**VIT)
    converter = keras_hub.layers.ViTImageConverter(
        image_size=VIT["image_shape"][:2], scale=1 / 127.5, offset=-1.0
    )
    backbone.save_to_preset(preset)
    converter.save_to_preset(preset)
    return f"hub:{preset}"


def vit_config(backbone: str) -> dict:
    """The ViT's pretraining config: the baseline (trainings/demo.json) on the tiny ViT (its
    32 px input: crops of 36 px images; the preset's random weights), with ``VIT_TRAINING``'s
    loss, optimiser and schedule."""
    raw = copy.deepcopy(read_json(BASELINE))
    size = VIT["image_shape"][0]
    raw["data"].update(image_size=[size, size], resize=[size + 4, size + 4])
    raw["model"].update(backbone=backbone, weights="pretrained")
    raw["loss"] = copy.deepcopy(VIT_TRAINING["loss"])
    raw["train"].update(copy.deepcopy(VIT_TRAINING["train"]))
    return raw


def pretrain(folder: str, root: str, steps: int | None, raw: dict, name: str, saved: str) -> str:
    """Train ``raw`` on ``root`` as run ``name`` and save its best weights' backbone to
    ``folder``/``saved``; the file's path."""
    import config
    import nets
    from training.trainer import train

    raw = run_config(raw, name=name, seed=PRETRAIN_SEED, root=root, steps=steps)
    path = os.path.join(folder, "configs", f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(raw, handle, indent=1)
    resolved = config.load(path)
    began = time.perf_counter()
    result = train(resolved, restart=True)
    model = nets.build_embedding_model(
        resolved["model"], tuple(resolved["data"]["image_size"]), pretrained=False
    )
    model.load_weights(result.run.best_weights)
    weights = os.path.join(folder, saved)
    model.get_layer("backbone").save_weights(weights)
    backbone = raw["model"]["backbone"]  # named when a hub: preset (small_cnn's line as before)
    shown = f" {os.path.basename(backbone)}" if backbone.startswith("hub:") else ""
    print(
        f"pretrained{shown} on {root} "
        f"({len(os.listdir(os.path.join(folder, root)))} classes): "
        f"{result.step} steps, {time.perf_counter() - began:.0f} s, backbone saved",
        flush=True,
    )
    return weights


def setting_config(name: str, weights: str, quick: bool, vit: str | None = None) -> dict:
    """The baseline with the fine-tuning schedule and the setting's keys; for the ``vit_``
    settings, on the ViT preset ``vit`` (a ``hub:`` backbone) with ``weights`` its tower's."""
    if name in VIT_SETTINGS:
        raw = vit_config(vit)
        raw["train"].update(copy.deepcopy(FINETUNE))
        raw["model"]["weights"] = "pretrained" if name == "vit_scratch" else weights
        raw["train"]["optimizer"]["backbone_lr_multiplier"] = VIT_BACKBONE_LR_MULTIPLIER
        if name == "vit_layer_decay":
            raw["train"]["optimizer"]["layer_decay"] = VIT_LAYER_DECAY
        return raw
    raw = copy.deepcopy(read_json(BASELINE))
    raw["train"].update(copy.deepcopy(FINETUNE))
    raw["model"]["weights"] = "none" if name == "scratch" else weights
    tricks = [] if name in ("scratch", "pretrained") else name.split("+")
    if "freeze_batchnorm" in tricks:
        raw["model"]["freeze_batchnorm"] = True
    if "warmup" in tricks:
        raw["train"]["freeze_backbone_steps"] = QUICK_STEPS // 3 if quick else WARMUP_STEPS
    return raw


def layer_decay_refusal(weights: str) -> str:
    """What the config check says of ``train.optimizer.layer_decay`` on small_cnn."""
    import config
    from tfcbir import UserError

    raw = setting_config("pretrained", weights, quick=False)
    raw["train"]["optimizer"]["layer_decay"] = 0.75
    try:
        config.resolve(raw)
    except UserError as error:
        return str(error)
    return "accepted"


def pretrained_backbones(args, folder: str, roots: tuple[str, str]) -> dict:
    """The pretrained files the settings need: ``cnn`` (small_cnn's backbone weights file),
    ``vit_preset`` (the random ViT's ``hub:`` backbone) and ``vit`` (its tower's weights file
    once pretrained; "pretrained", the preset's random weights, when only vit_scratch runs)."""
    steps = QUICK_STEPS if args.quick else None
    made: dict[str, str] = {}
    if any(name in CNN_SETTINGS for name in args.settings):
        made["cnn"] = pretrain(
            folder,
            roots[0],
            steps,
            read_json(BASELINE),
            "pretrain",
            "pretrained_backbone.weights.h5",
        )
        print(f"layer_decay 0.75 on small_cnn: {layer_decay_refusal(made['cnn'])}", flush=True)
    if any(name in VIT_SETTINGS for name in args.settings):
        made["vit_preset"] = make_vit_preset(folder)
        made["vit"] = "pretrained"  # vit_scratch: the preset's random weights
    if any(name in VIT_SETTINGS[1:] for name in args.settings):
        raw = vit_config(made["vit_preset"])
        made["vit"] = pretrain(
            folder, roots[0], steps, raw, "pretrained_vit", "pretrained_vit.weights.h5"
        )
    return made


def run_all(args, folder: str) -> dict[str, list[dict]]:
    os.environ["TFCBIR_DATA_DIR"] = folder
    roots = split_shapes(folder, QUICK_DATA if args.quick else DATA)
    steps = QUICK_STEPS if args.quick else None
    made = pretrained_backbones(args, folder, roots)
    results: dict[str, list[dict]] = {}
    for name in args.settings:
        weights = made["vit" if name in VIT_SETTINGS else "cnn"]
        for seed in args.seeds:
            raw = run_config(
                setting_config(name, weights, args.quick, made.get("vit_preset")),
                name=f"{name.replace('+', '-')}_seed{seed}",
                seed=seed,
                root=roots[1],
                steps=steps,
            )
            scores = train_and_score(raw, folder, rerank=False)
            record_run(results, name, seed, scores, args.json)
            shown = ", ".join(f"{key} {scores[key]:.3f}" for key in METRICS)
            print(f"  {name} seed {seed}: {shown}, {scores['seconds']:.0f} s", flush=True)
    return results


def table(results: dict[str, list[dict]]) -> list[str]:
    lines = [
        "| fine-tuning | seeds | holdout Recall@1 | MAP@R | Recall@1 | mAP@10 | train s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in results.items():
        cells = [spread([run[key] for run in runs]) for key in METRICS]
        holdout = spread([run["holdout"] for run in runs])
        seconds = sum(run["seconds"] for run in runs) / len(runs)
        lines.append(f"| {name} | {len(runs)} | {holdout} | {' | '.join(cells)} | {seconds:.0f} |")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, SETTINGS)
    args = parser.parse_args(argv)
    args.settings = [name.strip() for name in args.settings.split(",") if name.strip()]
    unknown = [name for name in args.settings if name not in SETTINGS]
    if unknown:
        parser.error(f"--settings: unknown {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    args.seeds = [int(seed) for seed in args.seeds.split(",")]
    return args


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    args = parse_args(argv)
    from tfcbir.cli import quiet_tensorflow

    quiet_tensorflow()
    command = "python benchmarks/finetune.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{command.strip()}\n{os.cpu_count()} CPUs", flush=True)
    if args.data_dir:
        results = run_all(args, os.path.abspath(args.data_dir))
    else:
        with tempfile.TemporaryDirectory() as folder:
            results = run_all(args, folder)
    print(f"\n$ {command.strip()}")
    print("\n".join(table(results)))
    return results


if __name__ == "__main__":
    main()
