"""The layout's promises (docs/architecture.md), checked on the code itself.

- The import-linter contract in pyproject.toml: each layer imports only from those below it, the
  retrieval core needs no config, retrieval does not import training, no cycles.
- No package imports a script; no private name (``_x``) is imported from another module; no
  function outside benchmarks/ and tests/ is longer than 80 lines.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = [
    "tfcbir",
    "config",
    "datasets",
    "nets",
    "losses",
    "runs",
    "retrieval",
    "training",
    "report",
    "serving",
]
SCRIPTS = sorted(p.stem for p in REPO.glob("*.py") if p.stem not in ("configuration",))
MAX_FUNCTION_LINES = 80


def product_files() -> list[Path]:
    """The Python files of the packages and scripts (not tests, not benchmarks)."""
    files = [REPO / f"{name}.py" for name in SCRIPTS]
    for package in PACKAGES:
        files += sorted((REPO / package).rglob("*.py"))
    return files


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imported_names(tree: ast.Module):
    """(module, name, line) of every ``from module import name`` and ``import module``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                yield node.module, alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno


def lint_imports() -> Path | None:
    found = Path(sys.executable).parent / "lint-imports"
    return found if found.exists() else None


@pytest.mark.skipif(lint_imports() is None, reason="import-linter is not installed")
def test_the_import_contract_holds():
    done = subprocess.run(
        [str(lint_imports()), "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_no_package_imports_a_script():
    project = set(PACKAGES)
    for path in product_files():
        if path.parent == REPO:
            continue
        for module, _name, line in imported_names(parsed(path)):
            top = module.split(".")[0]
            assert top in project or top not in SCRIPTS, f"{path}:{line} imports the script {top}"


def test_private_names_stay_in_their_module():
    project = set(PACKAGES)
    for path in product_files():
        for module, name, line in imported_names(parsed(path)):
            if module.split(".")[0] not in project:
                continue
            private = name if name is not None else module.rsplit(".", 1)[-1]
            assert not (private.startswith("_") and not private.startswith("__")), (
                f"{path.relative_to(REPO)}:{line} imports the private {private} from {module}"
            )


def test_functions_are_short():
    long = []
    for path in product_files():
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines})")
    assert not long, "functions over 80 lines: " + ", ".join(long)


def test_every_retrieval_module_has_a_floor():
    """retrieval/ holds two floors (the core and the run services): a new module must be placed
    on one in the contract, or the layers would not check it."""
    import tomllib

    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in contracts["contracts"] if c["type"] == "layers")["layers"]
    placed = {name.strip() for layer in layers for name in layer.replace("|", ":").split(":")}
    for path in sorted((REPO / "retrieval").glob("*.py")):
        if path.stem != "__init__":
            assert f"retrieval.{path.stem}" in placed, f"{path.name} is on no floor"
