"""Firefox for the page tests, driven through WebDriver BiDi, the W3C protocol Firefox serves
itself (`--remote-debugging-port`): no geckodriver, which (like Playwright's own Firefox build)
would have to be downloaded from hosts this network does not reach. Debian's firefox-esr is
installed by `make test` when missing (Makefile, target `browser`); CERVIXQC_FIREFOX points at
another Firefox.

A small synchronous client over `websockets`: navigate, evaluate, wait for a condition, key and
pointer actions, file inputs, viewport and screenshots; only what the tests use.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from websockets.sync.client import connect

from tests.uvicorn_process import free_port

FIREFOX = os.environ.get("CERVIXQC_FIREFOX", "/usr/bin/firefox-esr")
# WebDriver's code points for the keys the tests press (W3C WebDriver, "keyboard actions")
KEYS = {"Enter": "\ue007", "Tab": "\ue004", "Escape": "\ue00c", "Shift": "\ue008", "ArrowLeft": "\ue012",
        "ArrowUp": "\ue013", "ArrowRight": "\ue014", "ArrowDown": "\ue015"}


class BidiError(RuntimeError):
    pass


class Firefox:
    def __init__(self, width: int = 1280, height: int = 900, start_timeout: float = 60) -> None:
        if not os.access(FIREFOX, os.X_OK):
            raise FileNotFoundError(f"no Firefox at {FIREFOX}: `make browser` installs Debian's firefox-esr "
                                    "(or set CERVIXQC_FIREFOX)")
        self.profile = tempfile.mkdtemp(prefix="cervixqc-firefox-")
        port = free_port()
        self.proc = subprocess.Popen([FIREFOX, "--headless", "--no-remote", "--profile", self.profile,
                                      "--remote-debugging-port", str(port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ready = threading.Event()

        def watch() -> None:  # drain Firefox's output; the line below says it listens
            for line in self.proc.stdout:  # type: ignore[union-attr]
                if "WebDriver BiDi listening" in line:
                    ready.set()

        threading.Thread(target=watch, daemon=True).start()
        if not ready.wait(start_timeout):
            self.close()
            raise RuntimeError(f"Firefox did not open its BiDi port within {start_timeout} s")
        # one connection for the browser's life, closed in close(): not a `with` block
        self.ws = connect(f"ws://127.0.0.1:{port}/session", max_size=2**27, open_timeout=30, legacy=True)
        self._id = 0
        self.cmd("session.new", {"capabilities": {}})
        self.context = self.cmd("browsingContext.getTree", {})["contexts"][0]["context"]
        self.viewport(width, height)

    def cmd(self, method: str, params: dict, timeout: float = 60) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        deadline = time.time() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            if msg.get("id") == self._id:
                if msg.get("type") == "error":
                    raise BidiError(f"{method}: {msg.get('error')}: {msg.get('message')}")
                return msg["result"]

    def viewport(self, width: int, height: int) -> None:
        self.cmd("browsingContext.setViewport", {"context": self.context,
                                                 "viewport": {"width": width, "height": height}})

    def goto(self, url: str) -> None:
        self.cmd("browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"})

    def eval(self, expression: str) -> object:
        """The expression's value, through JSON (so only what JSON can carry comes back)."""
        out = self.cmd("script.evaluate", {"expression": f"JSON.stringify(({expression}) ?? null)",
                                           "target": {"context": self.context}, "awaitPromise": True})
        if out["type"] == "exception":
            raise BidiError(out["exceptionDetails"]["text"])
        return json.loads(out["result"]["value"])

    def wait_for(self, expression: str, timeout: float = 30) -> object:
        deadline = time.time() + timeout
        while True:
            try:
                value = self.eval(expression)
                if value:
                    return value
            except BidiError:  # the page is navigating: ask again
                pass
            if time.time() > deadline:
                raise TimeoutError(f"not true within {timeout} s: {expression}")
            time.sleep(0.1)

    def _actions(self, actions: list[dict]) -> None:
        self.cmd("input.performActions", {"context": self.context, "actions": actions})

    def press(self, *keys: str) -> None:
        """Each key pressed and released in turn; "Shift+ArrowDown" holds Shift."""
        steps: list[dict] = []
        for key in keys:
            *mods, last = key.split("+") if len(key) > 1 else [key]
            codes = [KEYS.get(m, m) for m in mods] + [KEYS.get(last, last)]
            steps += [{"type": "keyDown", "value": c} for c in codes]
            steps += [{"type": "keyUp", "value": c} for c in reversed(codes)]
        self._actions([{"type": "key", "id": "keyboard", "actions": steps}])

    def type(self, text: str) -> None:
        self.press(*text)

    def drag(self, start: tuple[float, float], end: tuple[float, float]) -> None:
        """A mouse drag between two points of the viewport, in a few moves (pointer events)."""
        (x0, y0), (x1, y1) = start, end
        moves = [{"type": "pointerMove", "x": round(x0 + (x1 - x0) * k / 5), "y": round(y0 + (y1 - y0) * k / 5),
                  "duration": 20} for k in range(1, 6)]
        self._actions([{"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
                        "actions": [{"type": "pointerMove", "x": round(x0), "y": round(y0)},
                                    {"type": "pointerDown", "button": 0}, *moves, {"type": "pointerUp", "button": 0}]}])

    def set_files(self, selector: str, paths: list[Path]) -> None:
        node = self.cmd("script.evaluate", {"expression": f"document.querySelector({json.dumps(selector)})",
                                            "target": {"context": self.context}, "awaitPromise": False,
                                            "resultOwnership": "root"})["result"]
        self.cmd("input.setFiles", {"context": self.context, "element": {"sharedId": node["sharedId"]},
                                    "files": [str(p) for p in paths]})

    def screenshot(self, path: Path, full_page: bool = False) -> None:
        params: dict = {"context": self.context}
        if full_page:
            params["origin"] = "document"
        path.write_bytes(base64.b64decode(self.cmd("browsingContext.captureScreenshot", params)["data"]))

    def close(self) -> None:
        try:
            if hasattr(self, "ws"):
                try:
                    self.cmd("session.end", {}, timeout=5)
                except Exception:  # noqa: BLE001 - closing anyway
                    pass
                self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)
