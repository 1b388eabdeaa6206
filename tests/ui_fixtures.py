"""What the page tests in both browsers serve: synthetic scenes filed by source, as a site files
its collection, and a server whose detector boxes every readable photo. The fixtures are
imported into each browser test module (module scope: one server per browser)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipelines.data.synth import PRESETS, generate
from tests.qc_fixtures import tiny_weights
from tests.service_server import start_server
from tests.uvicorn_process import RunningServer


def synthetic_collection(work: Path) -> Path:
    """A data root holding collection/<source>/<case>/*.jpg (60 scenes, seed 0) and one file that
    is not an image, collection/notes.jpg."""
    ds = generate(PRESETS["tiny"], work / "synth", workers=1)
    root = work / "data"
    shutil.copytree(ds.out_dir / "images", root / "collection")
    (root / "collection" / "notes.jpg").write_bytes(b"not a photo")
    return root


def page_server(work: Path, data_root: Path) -> RunningServer:
    # detector threshold 0: every readable photo gets a box, so every card must draw one; the
    # colour scorer's random weights put about a quarter of the crops over its threshold, so a
    # vote of three on these photos depends on it
    weights = tiny_weights(work / "w", detector_threshold=0.0, colour_threshold=0.5, colour_spread=1.0)
    return start_server(work / "srv", weights,
                        data_roots=data_root, max_wait_ms=20)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return synthetic_collection(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, photos):
    srv = page_server(tmp_path_factory.mktemp("srv"), photos)
    yield srv
    srv.kill()
