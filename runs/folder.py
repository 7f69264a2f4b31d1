"""A run's folder, ``<data_dir>/trainings/<name>/``, and what may change when it resumes.

config.json        the resolved config the run was started with
checkpoints/       ckpt-<step>.h5, the newest few
best.weights.h5    the embedding model's best weights (by validation Recall@1)
best.text.weights.h5   a dual encoder's text tower, saved with them
text_tokenizer.json    a scratch text tower's tokenizer (datasets.tokenizer), made at the start
best.json          step and score of those weights; with train.ema, "weights": "ema" or "raw"
                   (whether they are the moving average or the raw weights)
metrics.csv        step, loss, learning rate, steps/s, validation Recall@1 (and, for a dual
                   encoder, the epoch, the image-text loss's logit scale and its parts)
logs/              TensorBoard event files
embeddings/        <set>.h5 galleries (and <set>.<index>.faiss), written by embed.py
evaluation/        evaluation.py's JSON results
queries/           test.py's and cbir.py's pictures
analysis/          analysis.py's reports
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np

import config as cfg
from config.schema import RESUMABLE_CHANGES, resolve
from tfcbir import UserError
from tfcbir.files import write_json

log = logging.getLogger("tfcbir")

CSV_FIELDS = ["step", "loss", "lr", "steps_per_s", "val_recall@1", "elapsed_s"]
# A dual encoder's extra columns: epochs of its training pairs, the logit scale, the two terms.
DUAL_CSV_FIELDS = [*CSV_FIELDS, "epoch", "logit_scale", "pair_loss", "image_loss"]


class RunFolder:
    """Every path of a run's folder; :meth:`of` finds the folder of a config."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config_file = self.path / "config.json"
        self.checkpoints = self.path / "checkpoints"
        self.logs = self.path / "logs"
        self.metrics = self.path / "metrics.csv"
        self.best_weights = self.path / "best.weights.h5"
        self.best_text_weights = self.path / "best.text.weights.h5"
        self.text_tokenizer = self.path / "text_tokenizer.json"
        self.best_info = self.path / "best.json"
        self.embeddings = self.path / "embeddings"
        self.evaluation = self.path / "evaluation"
        self.queries = self.path / "queries"
        self.analyses = self.path / "analysis"
        self.export = self.path / "export"  # export.py's model for serving without tfcbir

    @classmethod
    def of(cls, config: dict) -> RunFolder:
        """The folder of ``config``'s run: ``<data_dir>/trainings/<name>``."""
        return cls(cfg.run_dir(config))

    def gallery(self, set_name: str) -> Path:
        """The gallery of the set ``set_name`` (train, test, all, query, gallery)."""
        return self.embeddings / f"{set_name}.h5"

    def analysis(self, name: str) -> Path:
        """The folder of the analysis report ``name``."""
        return self.analyses / name

    def saved_config(self) -> dict | None:
        if not self.config_file.exists():
            return None
        return json.loads(self.config_file.read_text())

    def prepare(self, config: dict, restart: bool) -> None:
        """Start a new run or check that ``config`` may resume the one found here."""
        if restart:
            for path in (self.checkpoints, self.logs):
                shutil.rmtree(path, ignore_errors=True)
            for path in (
                self.metrics,
                self.best_weights,
                self.best_text_weights,
                self.text_tokenizer,
                self.best_info,
            ):
                path.unlink(missing_ok=True)
        saved = None if restart else self.saved_config()
        if saved is not None:
            saved = _with_new_defaults(saved)
            changed = [key for key in diff(saved, config) if not _resumable(key)]
            if changed:
                key = changed[0]
                raise UserError(
                    f"{key} changed since the run in {self.path} started "
                    f"({_show(saved, key)} -> {_show(config, key)}); run with --restart to start "
                    "over, or give the config another name"
                )
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.config_file, config)

    def best(self) -> dict | None:
        return json.loads(self.best_info.read_text()) if self.best_info.exists() else None

    def write_best(self, info: dict) -> None:
        write_json(self.best_info, info)

    def read_metrics(self) -> dict[str, np.ndarray] | None:
        """The columns of metrics.csv (:data:`CSV_FIELDS`) as float64 arrays (R,), one value per
        row, NaN where a row has none (validation Recall@1 is only measured every
        ``train.validate_every`` steps), and ``val_map@r`` when the run was selected on MAP@R
        (``train.validation.metric``); None when the run has no metrics.csv."""
        if not self.metrics.is_file():
            return None
        with open(self.metrics, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            names = CSV_FIELDS + [f for f in ["val_map@r"] if f in (reader.fieldnames or [])]
        return {
            name: np.array([_number(row.get(name)) for row in rows], dtype=np.float64)
            for name in names
        }

    def open_metrics(self, resume_step: int, fields: list[str] = CSV_FIELDS):
        """The CSV log with columns ``fields``, opened for appending; rows after
        ``resume_step`` are dropped (redone)."""
        rows = []
        if self.metrics.exists() and resume_step > 0:
            with open(self.metrics, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= resume_step]
        handle = open(self.metrics, "w", newline="")  # noqa: SIM115 - closed by the trainer
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        handle.flush()
        return handle, writer


def _number(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):  # an empty cell, or a row cut short by a crash
        return float("nan")


def _with_new_defaults(saved: dict) -> dict:
    """A run's saved config with the keys a newer tfcbir added, at their defaults, so that
    resuming an older run does not count them as changes."""
    try:
        return resolve(saved)
    except UserError:  # keys this version no longer knows: compare as saved
        return saved


def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)


def diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Key paths whose values differ between two nested configs."""
    keys = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}.{key}" if prefix else key
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += diff(a, b, path)
        elif a != b:
            keys.append(path)
    return keys


def _show(config: dict, key: str) -> str:
    value = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return json.dumps(value)
