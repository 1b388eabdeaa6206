"""Python that lives outside the Python files still names our modules: the snippets the shell
scripts run (`python -c "from ... import ..."` in weights/recipe.sh) and the `python -m`
commands the README and scripts give. No other test imports them, so a moved name broke
`make weights` at its last step, after hours of training, with every test green."""

import importlib
import importlib.util
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = ("pipelines", "models", "service", "tests", "weights")
FROM_IMPORT = re.compile(r"^\s*from ((?:%s)(?:\.\w+)*) import ([\w, ]+)" % "|".join(OURS), re.M)
RUN_MODULE = re.compile(r"python3? -m ((?:%s)(?:\.\w+)+)" % "|".join(OURS))


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / line for line in out.splitlines()]


def test_every_name_the_shell_scripts_import_from_our_modules_exists():
    imports = [(path, m[1], [n.strip() for n in m[2].split(",") if n.strip()])
               for path in _tracked("*.sh", "Makefile", "Dockerfile")
               for m in FROM_IMPORT.finditer(path.read_text())]
    assert any(path.name == "recipe.sh" for path, _, _ in imports), "the pattern no longer finds recipe.sh's imports"
    for path, module, names in imports:
        loaded = importlib.import_module(module)
        missing = [n for n in names if not hasattr(loaded, n)]
        assert not missing, f"{path.relative_to(REPO)}: {module} has no {', '.join(missing)}"


def test_every_module_the_readme_and_scripts_run_with_python_m_exists():
    modules = {m[1]: path for path in _tracked("*.md", "*.sh", "Makefile", "Dockerfile")
               for m in RUN_MODULE.finditer(path.read_text())}
    assert "tests.benchmarks.findings_cost" in modules, "the pattern no longer finds the README's benchmarks"
    gone = {m: str(p.relative_to(REPO)) for m, p in modules.items() if importlib.util.find_spec(m) is None}
    assert not gone, f"python -m names modules that do not exist: {gone}"
