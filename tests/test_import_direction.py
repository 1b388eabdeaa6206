"""Imports point one way, service -> pipelines -> models: a model never reads files or HTTP
settings, and the training and batch commands run without the web stack."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"models": ("pipelines", "service"), "pipelines": ("service",)}


def _imported_packages(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_never_import_the_layers_above(package):
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in sorted(_imported_packages(path) & set(FORBIDDEN[package]))
    ]
    assert not offenders, offenders


def test_serve_without_weights_is_a_clear_error_not_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--weights", str(tmp_path / "none")],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 2
    assert "--weights: no weights in" in r.stderr and "the folder does not exist" in r.stderr
    assert "Traceback" not in r.stderr
