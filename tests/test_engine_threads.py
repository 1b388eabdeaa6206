"""What importing pipelines sets up before torch loads (see pipelines/__init__.py): the
OpenMP spin the engine's speed depends on, and no triton on a host without a GPU driver."""

import os
import subprocess
import sys

import pytest

PROBE = "import os, sys, pipelines; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"


def _probe(env: dict) -> str:
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout


def test_importing_pipelines_sets_a_short_openmp_spin_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert _probe(env).split() == ["1000", "False"]


def test_a_spin_count_already_in_the_environment_wins():
    assert _probe({**os.environ, "GOMP_SPINCOUNT": "50000"}).split() == ["50000", "False"]


GPU_DRIVER = os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/dxg")


@pytest.mark.skipif(GPU_DRIVER, reason="a host with an NVIDIA driver keeps triton")
def test_without_a_gpu_driver_the_engine_loads_without_triton():
    installed = "import importlib.util; print(importlib.util.find_spec('triton') is not None)"
    if subprocess.run([sys.executable, "-c", installed], capture_output=True, text=True, check=True).stdout.strip() != "True":
        pytest.skip("triton is not installed here: nothing to keep out")
    probe = "import sys, pipelines.engine.qc, torchvision.ops; print(sys.modules.get('triton', 'absent'))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "None"
