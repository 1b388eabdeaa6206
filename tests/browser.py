"""Headless browser for the UI tests: Playwright's sync API driving Debian's Chromium.

Playwright's own browsers (`playwright install`) are downloaded from hosts this network does not
reach, so the tests launch the system build instead: /usr/bin/chromium, which `make test` installs
with apt-get when it is missing (Makefile, target `browser`). CERVIXQC_CHROMIUM points at another
Chromium binary.

The launch flags: --no-sandbox because the tests run as root (CI does), where Chromium refuses its
sandbox; --disable-gpu since there is no display or GPU; --disable-dev-shm-usage so that a small
/dev/shm (containers default to 64 MB) cannot crash the renderer; the rest stop the background
connections (component updates, sync, QUIC probes, first-run pages) that the closed network would
only refuse or leave hanging.

While a sync_playwright() is open (the module-scoped `browser` fixture: every test of a module that
uses it) Playwright runs its asyncio loop in the test thread, so asyncio.run() there fails with
"cannot be called from a running event loop". Serve the app from its own process
(tests/uvicorn_process.py) or thread; Starlette's TestClient (own thread) works.

Use from a test module (the fixtures must be imported into it, since tests/conftest.py does not
load them):

    from tests.browser import browser, page, screenshots_dir  # noqa: F401  (pytest fixtures)

    def test_upload(page, screenshots_dir):
        page.goto(url)
        page.get_by_role("button", name="Upload").click()
        page.screenshot(path=screenshots_dir / "upload.png")
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Playwright, sync_playwright

CHROMIUM = os.environ.get("CERVIXQC_CHROMIUM", "/usr/bin/chromium")

LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

REPO = Path(__file__).resolve().parent.parent


def launch(playwright: Playwright) -> Browser:
    """Headless system Chromium with the flags above; the caller closes it."""
    if not os.access(CHROMIUM, os.X_OK):
        raise FileNotFoundError(
            f"no Chromium at {CHROMIUM}: `make browser` installs Debian's chromium "
            "(or set CERVIXQC_CHROMIUM to a Chromium binary)"
        )
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One browser per test module (a launch takes about a second)."""
    with sync_playwright() as pw:
        b = launch(pw)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture()
def page(browser: Browser) -> Iterator[Page]:
    """A page in a fresh context per test: no cookies or storage carried between tests."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture(scope="session")
def screenshots_dir() -> Path:
    """Where tests save screenshots: CERVIXQC_SCREENSHOTS, else test-output/screenshots; a relative
    path is taken from the repository root."""
    d = Path(os.environ.get("CERVIXQC_SCREENSHOTS", "test-output/screenshots"))
    if not d.is_absolute():
        d = REPO / d
    d.mkdir(parents=True, exist_ok=True)
    return d
