"""Start the service as its own uvicorn process on a loopback port and wait until ready:
what the load benchmark and the tests do, so both talk to the service as production does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


_WORKER_PORTS = 1000
_next_port = 0


def free_port() -> int:
    """A loopback port that no other test worker can be handed.

    `make test` runs the suite in two pytest-xdist workers. A port from binding to 0 is only free
    until someone binds it, and a server that lost that race would leave its readiness poll
    answered by the other worker's server. So each worker counts through a range of its own
    below the kernel's ephemeral ports (32768 up, where bind-to-0 and outgoing connections draw),
    skipping ports something else holds; a run without workers binds to 0 as before."""
    global _next_port
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    base = 20000 + int(worker[2:]) * _WORKER_PORTS
    for _ in range(_WORKER_PORTS):
        port, _next_port = base + _next_port, (_next_port + 1) % _WORKER_PORTS
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {base}-{base + _WORKER_PORTS - 1}")


@dataclass
class RunningServer:
    url: str
    proc: subprocess.Popen
    log: Path
    env: dict[str, str]
    api_key: str

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": self.api_key}, timeout=kw.pop("timeout", 60), **kw)

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(workdir: Path, weights: Path, api_key: str, ready_timeout: float = 180,
                 **settings: object) -> RunningServer:
    """`settings` become CERVIXQC_<NAME> variables (e.g. max_batch_size=16)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "CERVIXQC_WEIGHTS_DIR": str(weights), "CERVIXQC_API_KEYS": api_key,
           "CERVIXQC_STATE_DIR": str(workdir / "state")}
    env.update({f"CERVIXQC_{k.upper()}": str(v) for k, v in settings.items()})
    log = workdir / f"server-{port}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app",
                                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    server = RunningServer(f"http://127.0.0.1:{port}", proc, log, env, api_key)
    deadline = time.time() + ready_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill(signal.SIGKILL)
    raise RuntimeError(f"server not ready in {ready_timeout} s:\n{server.log_tail()}")
