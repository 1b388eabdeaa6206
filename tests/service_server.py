"""The test key and a launcher for real uvicorn processes (tests.uvicorn_process, as the load benchmark uses)."""

from __future__ import annotations

from pathlib import Path

from tests.uvicorn_process import RunningServer
from tests.uvicorn_process import start_server as _start

API_KEY = "test-key-0123456789abcdef"
HEADERS = {"X-API-Key": API_KEY}


def start_server(workdir: Path, weights: Path, **settings: object) -> RunningServer:
    return _start(workdir, weights, API_KEY, **settings)
