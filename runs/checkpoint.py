"""Checkpoints: every variable of a run (model, optimiser, loss) and its step, in one HDF5 file.

Saving writes a temporary file, syncs it and renames it to ``ckpt-<step>.h5``, so a crash while saving never
leaves a checkpoint that cannot load: the newest complete file wins, and an unreadable one is
passed over with a warning.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from tfcbir import UserError
from tfcbir.files import atomic_output

log = logging.getLogger("tfcbir")
FORMAT = 1
_NAME = re.compile(r"ckpt-(\d+)\.h5$")


@dataclass
class Checkpoint:
    path: Path
    step: int
    groups: dict[str, list[np.ndarray]]
    meta: dict = field(default_factory=dict)


def _values(variables) -> list[np.ndarray]:
    return [np.asarray(v.numpy() if hasattr(v, "numpy") else v) for v in variables]


def save(folder: Path, step: int, groups: dict[str, list], meta: dict, keep: int) -> Path:
    """Write ``ckpt-<step>.h5`` with each group's variables; keep the ``keep`` newest files."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"ckpt-{step:08d}.h5"
    with atomic_output(final) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["step"] = step
        f.attrs["meta"] = json.dumps(meta)
        for name, variables in groups.items():
            group = f.create_group(name)
            for i, value in enumerate(_values(variables)):
                group.create_dataset(f"{i:05d}", data=value)
    for old in list_checkpoints(folder)[keep:]:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files in ``folder``, newest step first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def read(path: Path) -> Checkpoint:
    with h5py.File(path, "r") as f:
        groups = {name: [f[name][key][()] for key in sorted(f[name])] for name in f}
        return Checkpoint(path, int(f.attrs["step"]), groups, json.loads(f.attrs["meta"]))


def latest(folder: Path) -> Checkpoint | None:
    """The newest checkpoint that reads back; unreadable ones are reported and skipped."""
    for path in list_checkpoints(folder):
        try:
            return read(path)
        except (OSError, KeyError, ValueError) as error:
            log.warning("checkpoint %s cannot be read (%s); trying an older one", path, error)
    return None


def restore(variables, values: list[np.ndarray], what: str, path: Path) -> None:
    """Assign saved values to variables, refusing a checkpoint of another architecture."""
    variables = list(variables)
    if len(variables) != len(values) or any(
        tuple(v.shape) != tuple(a.shape) for v, a in zip(variables, values)
    ):
        raise UserError(
            f"{path}: its {what} does not fit the model built from the config "
            "(the config changed?); run with --restart to start over"
        )
    for variable, value in zip(variables, values):
        variable.assign(value)
