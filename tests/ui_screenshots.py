"""The README's two screenshots of the pages, made with the bundled weights on synthetic scenes
(the browser tests' own screenshots use untrained toy models):

    python -m tests.ui_screenshots [--weights weights] [-o docs]

Writes ui-review.png and ui-item.png. Starts a real server and Debian's Chromium as the
browser tests do; about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from pipelines.data.synth import PRESETS, generate
from tests.browser import launch
from tests.service_server import API_KEY, HEADERS, start_server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, default=Path("weights"))
    ap.add_argument("-o", "--out", type=Path, default=Path("docs"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ds = generate(replace(PRESETS["tiny"], seed=3), work / "synth", workers=1)
        shutil.copytree(ds.out_dir / "images", work / "data" / "collection")
        srv = start_server(work / "srv", args.weights.resolve(), data_roots=work / "data")
        try:
            with srv.client() as api:
                job = api.post("/v1/jobs", json={"source": "collection"}, headers=HEADERS).json()["id"]
                while api.get(f"/v1/jobs/{job}").json()["status"] != "done":
                    time.sleep(0.5)
            with sync_playwright() as pw:
                browser = launch(pw)
                page = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=srv.url).new_page()
                page.goto("/ui/login")
                page.get_by_label("API key").fill(API_KEY)
                page.get_by_role("button", name="Sign in").click()
                expect(page.get_by_role("heading", name="Check photos")).to_be_visible()
                page.goto(f"/ui/jobs/{job}/review")
                page.wait_for_load_state("networkidle")
                page.evaluate("document.querySelector('.filters').scrollIntoView()")
                page.evaluate("window.scrollTo(0, 0)")
                args.out.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=args.out / "ui-review.png")
                page.locator("#grid .card:has(.box) a").first.click()  # the first with a cervix box
                page.wait_for_load_state("networkidle")
                page.keyboard.press("2")
                expect(page.locator(".history li.decision")).to_have_count(1)
                page.screenshot(path=args.out / "ui-item.png")
                browser.close()
        finally:
            srv.kill()
    print(f"wrote {args.out / 'ui-review.png'} and {args.out / 'ui-item.png'}")


if __name__ == "__main__":
    main()
