"""The test key and a launcher for real uvicorn processes (tests.uvicorn_process, as the load benchmark uses)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.uvicorn_process import RunningServer
from tests.uvicorn_process import start_server as _start

API_KEY = "test-key-0123456789abcdef"
HEADERS = {"X-API-Key": API_KEY}


def start_server(workdir: Path, weights: Path, **settings: object) -> RunningServer:
    return _start(workdir, weights, API_KEY, **settings)


def sign_in(client: httpx.Client, key: str = API_KEY, next_url: str = "") -> httpx.Response:
    """The pages' sign-in as a browser does it: the form's token, then the key."""
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/ui/login").text).group(1)
    return client.post("/ui/login", data={"api_key": key, "csrf": token, "next": next_url})
