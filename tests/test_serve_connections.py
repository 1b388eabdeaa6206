"""`cervixqc serve` against clients that open connections and never finish a request's headers
(service/connections.py): with uvicorn alone they held open files until the service answered
nothing, not even /healthz, and asyncio's accept loop logged thousands of lines a second."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.service_server import API_KEY
from tests.uvicorn_process import free_port

REPO = Path(__file__).resolve().parents[1]
SOFT, HARD = 200, 400  # open files: the service starts under a soft limit below its hard one
TIMEOUT_S = 1.5  # CERVIXQC_HEADER_TIMEOUT_S: room for a loaded CI machine's timers either side


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("serve-connections")
    port = free_port()
    env = {**os.environ, "CERVIXQC_API_KEYS": API_KEY, "CERVIXQC_STATE_DIR": str(work / "state"),
           "CERVIXQC_WEIGHTS_DIR": str(REPO / "weights"), "CERVIXQC_HEADER_TIMEOUT_S": str(TIMEOUT_S)}
    log = work / "serve.log"
    with open(log, "wb") as out:  # exec: the limits are the server's own, under the same pid
        proc = subprocess.Popen(["bash", "-c", f"ulimit -Sn {SOFT} && ulimit -Hn {HARD} && exec {sys.executable} "
                                 f"-m service.cli serve --host 127.0.0.1 --port {port}"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield port, proc, log
    finally:
        proc.terminate()
        proc.wait(60)


def _open(port: int, first: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if first:
        s.sendall(first)
    return s


def _read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes (raises socket.timeout if it never does)."""
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_half_sent_headers_get_a_json_408_and_a_silent_connection_is_closed(served):
    port, _, _ = served
    half, silent = _open(port, b"GET /healthz HTTP/1.1\r\nHo"), _open(port)
    start = time.monotonic()
    answer = _read_all(half)
    assert TIMEOUT_S * 0.9 <= time.monotonic() - start < TIMEOUT_S + 5
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower(), answer
    assert json.loads(body)["error"]["code"] == "header_timeout"
    assert _read_all(silent) == b""  # nothing was asked, so nothing is answered
    half.close(), silent.close()
    # the same for a kept-alive connection's second request (its first byte arms the deadline)
    kept = _open(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    first = kept.recv(65536)
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHo")
    both = first + _read_all(kept)  # the first answer's body may come in the second read
    assert both.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in both, both[:300]
    kept.close()


def test_slow_headers_inside_the_deadline_a_slow_body_and_kept_alive_connections_are_never_cut(served):
    port, _, _ = served
    s = _open(port)
    for part in (b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):  # headers in 0.6 s of a 1.5 s deadline
        s.sendall(part)
        time.sleep(0.3)
    assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    time.sleep(TIMEOUT_S + 0.5)  # idle between requests: uvicorn's keep-alive (5 s) governs, not the deadline
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    s.close()
    # headers complete, body late: the request is the app's (UPLOAD_IDLE_TIMEOUT_S), not a header timeout
    body = b'{"paths": []}'
    s = _open(port, b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nX-API-Key: " + API_KEY.encode()
              + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    time.sleep(TIMEOUT_S * 2)
    s.sendall(body)
    answer = _read_all(s)
    assert not answer.startswith(b"HTTP/1.1 408 ") and b"header_timeout" not in answer, answer[:300]
    s.close()


def test_more_half_open_connections_than_open_files_pass_and_the_log_stays_short(served):
    port, proc, log = served
    limits = Path(f"/proc/{proc.pid}/limits").read_text()
    assert [line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")] == [
        [str(HARD), str(HARD)]]  # the soft limit raised to the hard one
    before = log.read_text().count("out of system resource")
    held = [_open(port, b"GET /healthz HTTP/1.1\r\nHo") for _ in range(HARD + 50)]
    try:
        start = time.monotonic()
        r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=TIMEOUT_S * 10)
        assert r.status_code == 200 and time.monotonic() - start < TIMEOUT_S * 10
    finally:
        for s in held:
            s.close()
    # the accept loop's error, once per pending connection on every try, held to one line per 10 s
    assert 1 <= log.read_text().count("out of system resource") - before <= 2, log.read_text()[-2000:]
