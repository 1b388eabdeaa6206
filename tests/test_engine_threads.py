"""The OpenMP spin setting the engine's speed depends on (see pipelines/__init__.py)."""

import os
import subprocess
import sys

PROBE = "import os, sys, pipelines; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"


def _probe(env: dict) -> str:
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout


def test_importing_pipelines_sets_a_short_openmp_spin_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert _probe(env).split() == ["1000", "False"]


def test_a_spin_count_already_in_the_environment_wins():
    assert _probe({**os.environ, "GOMP_SPINCOUNT": "50000"}).split() == ["50000", "False"]
