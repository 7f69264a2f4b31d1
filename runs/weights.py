"""Which weights a run is searched with, and the identity (``model_id``) galleries record.

Resolved once per command by :func:`model_source`: an explicit ``--checkpoint`` (a
``.weights.h5`` file or a training checkpoint ``ckpt-<step>.h5``), else the run's
``best.weights.h5``, else, for a model complete without training (``nets.pretrained_model``: a
``hub:`` preset as it is), zero-shot. A dual encoder's identity covers both towers (the hash of
both weights files), so a gallery is only ever searched with the text tower trained with its
image tower.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import nets
from nets.catalog import hub_directory
from runs import checkpoint as ckpt
from runs.folder import RunFolder
from tfcbir import UserError
from tfcbir.files import hash_file

WEIGHTS_SUFFIX = ".weights.h5"


@dataclass(frozen=True)
class ModelSource:
    """Where a run's model comes from, worked out once (:func:`model_source`)."""

    run: RunFolder
    zero_shot: bool  # the pretrained preset as it is: no weights file
    weights: Path | None  # the image tower's .weights.h5, or a checkpoint holding both towers
    text_weights: Path | None  # a dual encoder's text tower beside a .weights.h5, else None
    model_id: str
    step: int  # of best.json for the run's best weights; 0 for a given file (a checkpoint's own)

    @property
    def is_checkpoint(self) -> bool:
        """Whether ``weights`` is a training checkpoint (``ckpt-<step>.h5``)."""
        return self.weights is not None and not self.weights.name.endswith(WEIGHTS_SUFFIX)


def has_text_tower(config: dict) -> bool:
    return config["model"]["text"]["tower"] != "none"


def is_zero_shot(config: dict, checkpoint: str | Path | None = None, run=None) -> bool:
    """Whether the run is searched with its pretrained preset as it is: no weights were asked
    for, the run has no trained ones, and its model needs none (``nets.pretrained_model``: a
    ``hub:`` image tower with its preset's weights, a head without weights, the same preset's
    text tower)."""
    if checkpoint is not None or not nets.pretrained_model(config["model"]):
        return False
    return not (run or RunFolder.of(config)).best_weights.exists()


def pretrained_model_id(config: dict) -> str:
    """The ``model_id`` of a zero-shot model: ``pretrained-`` and a hash of its preset's
    identity, the preset's name and the keras-hub version for a named preset (its weights are a
    fixed version of keras-hub's registry), or every file's contents for a local folder."""
    towers = dict.fromkeys([config["model"]["backbone"], config["model"]["text"]["tower"]])
    parts = [_preset_identity(tower) for tower in towers if nets.is_hub(tower)]
    joined = json.dumps(parts, sort_keys=True)
    return "pretrained-" + hashlib.sha256(joined.encode()).hexdigest()[:16]


def _preset_identity(tower: str) -> dict:
    preset = nets.hub_preset(tower).strip()
    folder = hub_directory(preset)
    if folder is None:
        try:
            version = importlib.metadata.version("keras-hub")
        except importlib.metadata.PackageNotFoundError:
            version = "absent"
        return {"preset": preset, "keras_hub": version}
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model.backbone: {tower}: no such preset directory")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hash_file(p) for p in files}


def text_weights_for(weights: Path) -> Path:
    """The text tower's file beside an image tower's ``X.weights.h5``: ``X.text.weights.h5``."""
    return weights.with_name(weights.name[: -len(WEIGHTS_SUFFIX)] + ".text" + WEIGHTS_SUFFIX)


def weights_files(
    config: dict, checkpoint: str | Path | None = None, run=None
) -> tuple[Path, Path | None]:
    """The files holding the run's model: the image tower's weights (or a training checkpoint,
    which holds both towers) and, for a dual encoder saved as weights files, the text tower's
    (else None). Default: the run's best weights. UserError when a file is missing."""
    run = run or RunFolder.of(config)
    if checkpoint is None:
        weights = run.best_weights
        if not weights.exists():
            zero_shot = (
                "; or search with the preset as it is (zero-shot: model.weights: pretrained, "
                "model.head: identity_normalize, and a text tower of the same preset)"
                if nets.is_hub(config["model"]["backbone"])
                else ""
            )
            raise UserError(
                f"{run.path} has no trained model yet; train it first: "
                f"python train.py -c <config> (run {config['name']}){zero_shot}"
            )
    else:
        weights = Path(checkpoint)
        if not weights.is_file():
            raise UserError(
                f"--checkpoint {weights}: no such file; give a .weights.h5 file or "
                f"a checkpoint from {run.checkpoints}"
            )
    if not has_text_tower(config) or not weights.name.endswith(WEIGHTS_SUFFIX):
        return weights, None
    text = text_weights_for(weights)
    if not text.is_file():
        raise UserError(
            f"{text}: the text tower's weights are missing beside {weights.name}; train the run "
            "(train.py writes both), or give a training checkpoint ckpt-<step>.h5"
        )
    return weights, text


def model_id(weights: Path, text_weights: Path | None) -> str:
    """The identity galleries record: the hash of the weights file, or, for a dual encoder
    saved as two files, the hash of both hashes."""
    if text_weights is None:
        return hash_file(weights)
    joined = f"{hash_file(weights)}+{hash_file(text_weights)}"
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def model_source(config: dict, checkpoint: str | Path | None = None) -> ModelSource:
    """The weights ``config``'s run is used with: ``checkpoint`` if given, else the run's best
    weights, else (a model complete without training) its pretrained preset. UserError when
    none exists."""
    run = RunFolder.of(config)
    if is_zero_shot(config, checkpoint, run):
        return ModelSource(run, True, None, None, pretrained_model_id(config), 0)
    weights, text_weights = weights_files(config, checkpoint, run)
    step = int((run.best() or {}).get("step", 0)) if checkpoint is None else 0
    return ModelSource(run, False, weights, text_weights, model_id(weights, text_weights), step)


def expected_model_id(config: dict, checkpoint: str | Path | None = None) -> str:
    """The ``model_id`` that :func:`model_source` gives, with the messages of a command that
    checks galleries: of ``checkpoint``, else of the run's best weights, else, for a model
    complete without training, of its pretrained preset (:func:`pretrained_model_id`). A run
    without any of them is refused (UserError): no gallery can be checked against a model that
    does not exist."""
    run = RunFolder.of(config)
    if is_zero_shot(config, checkpoint, run):
        return pretrained_model_id(config)
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise UserError(
                f"--checkpoint {checkpoint}: no such file; give the weights the galleries were "
                "embedded with"
            )
    elif not run.best_weights.is_file():
        raise UserError(
            f"{run.path} has no trained model ({run.best_weights.name}), so its galleries "
            f"cannot be checked; train it first: python train.py -c <config> (run "
            f"{config['name']}), or give the weights the galleries were embedded with: "
            "--checkpoint <file>"
        )
    return model_id(*weights_files(config, checkpoint, run))


def read_checkpoint(path: Path) -> ckpt.Checkpoint:
    """A training checkpoint given as weights; a file that is none is a UserError."""
    try:
        return ckpt.read(path)
    except (OSError, KeyError, ValueError) as error:
        raise UserError(f"{path}: not a tfcbir checkpoint ({error})") from None
