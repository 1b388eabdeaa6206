"""Shared fixtures: one tiny synthetic dataset per session, fixed seeds, two threads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.data.synth import PRESETS, SynthResult, generate

torch.set_num_threads(2)


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
