"""The test key and a launcher for real uvicorn processes (service.launch, as the load benchmark uses)."""

from __future__ import annotations

from pathlib import Path

from service.launch import RunningServer
from service.launch import start_server as _start

API_KEY = "test-key-0123456789abcdef"
HEADERS = {"X-API-Key": API_KEY}


def start_server(workdir: Path, weights: Path, **settings: object) -> RunningServer:
    return _start(workdir, weights, API_KEY, **settings)
