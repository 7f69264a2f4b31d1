"""Configs are data: a JSON or YAML file becomes one validated, fully defaulted dict.

``load(path)`` reads the file, translates the original system's form (with a warning showing the
new form), validates every key against :mod:`config.schema` and returns the resolved config,
whose ``name`` defaults to the file's stem.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import losses
import nets
from config import legacy
from config.schema import resolve
from config.settings import data_dir, runs_dir
from tfcbir import UserError

__all__ = [
    "load",
    "load_raw",
    "resolve",
    "config_hash",
    "model_hash",
    "normalized_embeddings",
    "data_root",
    "data_dir",
    "runs_dir",
    "run_dir",
]

log = logging.getLogger("tfcbir")


def load_raw(path: str | Path) -> dict:
    """Parse a .json, .yaml or .yml file into a mapping; syntax errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path}: config file not found; give the path of a .json or .yaml file "
            "(see trainings/)"
        )
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(
                f"{path}: line {error.lineno} column {error.colno}: {error.msg}"
            ) from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
            problem = getattr(error, "problem", None) or str(error).split("\n")[0]
            raise UserError(f"{path}: {where}{problem}") from None
    else:
        raise UserError(f"{path}: unknown config format {suffix!r}; use .json, .yaml or .yml")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the file holds {type(raw).__name__}, not a mapping of sections")
    return raw


def load(path: str | Path) -> dict:
    """The resolved config of a file; UserErrors are prefixed with the file's name."""
    path = Path(path)
    raw = load_raw(path)
    try:
        if legacy.is_legacy(raw):
            raw = legacy.translate(raw)
            log.warning(
                "%s is in the original system's form; it was translated to this "
                "equivalent new config:\n%s",
                path,
                json.dumps(raw, indent=2),
            )
        config = resolve(raw)
    except UserError as error:
        raise UserError(f"{path}: {error}") from None
    if config["name"] is None:
        config["name"] = path.stem
    return config


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def config_hash(config: dict) -> str:
    """Identity of what a run trains: everything but the name and the evaluation settings."""
    return _digest({k: v for k, v in config.items() if k not in ("name", "eval", "index")})


def normalized_embeddings(config: dict) -> bool:
    """Whether the run's embeddings are searched as unit vectors by cosine similarity.

    The geometry the model was trained for decides (:func:`losses.geometry`): a loss on angles
    (cosine) is searched by cosine, its embeddings L2-normalised when the head does not do it; a
    distance loss on a head without normalisation is searched by Euclidean distance. Unit vectors
    rank the same by both, so a normalising head is always searched by cosine.
    """
    return losses.geometry(config["loss"]) == "cosine" or nets.is_normalized(
        config["model"]["head"]
    )


def model_hash(config: dict) -> str:
    """Identity of what turns an image into an embedding: the model, the image geometry and
    whether embeddings are normalised for search.

    Keys that only change how a model trains (``nets.TRAINING_ONLY_PARAMS``: its starting
    weights, freezing, dropout) are left out: the trained weights' own hash identifies those. A
    ``hub:`` backbone in a local preset directory counts by its preset's identity
    (``nets.backbone_identity``: the contents of its config and image-converter files), not by
    the folder's path.
    """
    data = config["data"]
    model = {
        k: v
        for k, v in config["model"].items()
        if k not in nets.TRAINING_ONLY_PARAMS and nets.IDENTITY_DEFAULTS.get(k, object()) != v
    }
    model["backbone"] = nets.backbone_identity(model["backbone"])
    text = model.pop("text", None)
    if text is not None and text["tower"] != "none":  # no text tower: the image model's hash
        text = {k: v for k, v in text.items() if k != "freeze"}  # freezing: training only
        text["tower"] = nets.backbone_identity(text["tower"], "model.text.tower")
        model["text"] = text
    return _digest(
        {
            "model": model,
            "image_size": data["image_size"],
            "resize": data["resize"],
            "normalized": normalized_embeddings(config),
        }
    )


def data_root(config: dict) -> Path:
    root = Path(config["data"]["root"]).expanduser()
    return root if root.is_absolute() else data_dir() / root


def run_dir(config: dict) -> Path:
    return runs_dir() / config["name"]
