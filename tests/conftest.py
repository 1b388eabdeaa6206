"""Shared fixtures: one tiny synthetic dataset per session, fixed seeds, two threads, and a
cache of OpenVINO conversions of the session's own (not the user's ~/.cache)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipelines.data.synth import PRESETS, SynthResult, generate

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def openvino_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Engines started by the tests, in process or as services, convert models into a folder
    of this session's: the first engine on the bundled weights pays the conversion. One folder
    for both xdist workers (their base folders' parent): each worker converted the bundled and
    the seeded tiny weights again, 10-20 s of both cores a time. The cache's own work folders
    and renames make two converting processes safe (`openvino_runtime.converted`)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / "openvino-cache"
    folder.mkdir(exist_ok=True)
    os.environ["CERVIXQC_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    """The `tiny` preset, seed 0, rendered in-process (no worker start-up cost)."""
    out = tmp_path_factory.mktemp("tiny")
    return generate(PRESETS["tiny"], out, workers=1)


@pytest.fixture()
def write_csv(tmp_path: Path):
    def _write(name: str, text: str) -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return _write
