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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
