"""Where tfcbir keeps data and runs: ``data_dir`` from configuration.py, or $TFCBIR_DATA_DIR."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tfcbir import UserError

REPO = Path(__file__).resolve().parent.parent
ENV_VAR = "TFCBIR_DATA_DIR"


def data_dir() -> Path:
    """The data folder: $TFCBIR_DATA_DIR if set, else ``data_dir`` in the repo's configuration.py."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser().resolve()
    path = REPO / "configuration.py"
    if not path.exists():
        raise UserError(
            f"{path} not found: copy configuration_sample.py to configuration.py and "
            f"set data_dir there (or set {ENV_VAR})"
        )
    spec = importlib.util.spec_from_file_location("configuration", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # the user's own Python file: report it in one line
        raise UserError(f"{path}: cannot be loaded ({type(error).__name__}: {error})") from None
    value = getattr(module, "data_dir", None)
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise UserError(
            f"{path}: data_dir is not set; give a folder path, as in configuration_sample.py"
        )
    folder = Path(value).expanduser()
    return (folder if folder.is_absolute() else path.parent / folder).resolve()


def runs_dir() -> Path:
    return data_dir() / "trainings"
