"""The same pages in Firefox ESR (WebDriver BiDi, tests/firefox_bidi.py) against a real uvicorn:
sign-in typed on the keyboard, an upload with cards and boxes, a review decision by key, a
box dragged with pointer events, and phone width. Screenshots: firefox-*.png next to the
Chromium ones."""

from __future__ import annotations

import json
import time

import pytest

from tests.browser import screenshots_dir  # noqa: F401  (pytest fixture)
from tests.firefox_bidi import Firefox
from tests.service_server import API_KEY, HEADERS
from tests.ui_fixtures import photos, server  # noqa: F401  (pytest fixtures)

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.fixture(scope="module")
def firefox():
    ff = Firefox()
    yield ff
    ff.close()


@pytest.fixture(scope="module")
def job(server) -> str:
    with server.client() as api:
        job_id = api.post("/v1/jobs", json={"source": "collection"}, headers=HEADERS).json()["id"]
        for _ in range(600):
            if api.get(f"/v1/jobs/{job_id}").json()["status"] == "done":
                return job_id
            time.sleep(0.2)
    raise AssertionError("job did not finish")


def test_firefox_signs_in_with_the_keyboard_and_uploads_to_cards_with_boxes(firefox, server, photos,
                                                                           screenshots_dir):  # noqa: F811
    firefox.goto(f"{server.url}/ui/login")
    firefox.wait_for("document.activeElement && document.activeElement.id == 'api_key'")  # focus on arrival
    firefox.type(API_KEY)
    firefox.press("Enter")
    # the upload page, its script run (the file input's listener is attached at the page's end)
    firefox.wait_for("document.querySelector('h1') && document.querySelector('h1').textContent == 'Check photos' "
                     "&& document.readyState == 'complete'")
    files = sorted((photos / "collection").rglob("*.jpg"))[:2]
    firefox.set_files("#files", files)
    firefox.wait_for("document.getElementById('status').textContent.startsWith('2 of 2 photo(s) checked: ')")
    cards = firefox.eval("""[...document.querySelectorAll('#cards .card')].map(c => ({
        label: c.querySelector('.label').textContent, box: !c.querySelector('.box').hidden,
        boxWidth: c.querySelector('.box').getBoundingClientRect().width, name: c.querySelector('.path').textContent}))""")
    assert sorted(c["name"] for c in cards) == sorted(f.name for f in files)
    assert all(c["box"] and c["boxWidth"] > 4 and c["label"].startswith(("regular", "non-regular")) for c in cards)
    firefox.screenshot(screenshots_dir / "firefox-upload.png")


def test_firefox_relabels_by_key_and_redraws_a_box_by_dragging(firefox, server, job, screenshots_dir):  # noqa: F811
    firefox.goto(f"{server.url}/ui/jobs/{job}/review")
    assert firefox.wait_for("document.querySelectorAll('#grid .card').length") == 48
    firefox.screenshot(screenshots_dir / "firefox-review.png")
    item = firefox.eval("document.querySelector('#grid .card a').getAttribute('href')").split("/items/")[1].split("?")[0]
    firefox.goto(f"{server.url}/ui/jobs/{job}/items/{item}")
    firefox.wait_for("document.documentElement.dataset.keys == 'on'")
    firefox.press("3")
    # the decision reloads the page: wait for the new one (its history, its listeners)
    firefox.wait_for("document.querySelectorAll('.history li.decision').length == 1 && "
                     "document.documentElement.dataset.keys == 'on'")
    assert firefox.eval("document.getElementById('final').textContent") == "non-regular: Lugol's iodine"
    r = firefox.eval("(() => { const r = document.getElementById('stage').getBoundingClientRect();"
                     " return [r.left, r.top, r.width, r.height]; })()")
    left, top, width, height = r  # type: ignore[misc]
    firefox.drag((left + width * 0.2, top + height * 0.3), (left + width * 0.6, top + height * 0.7))
    # as above: the history is parsed before the model's JSON at the end of the page, so a
    # page still loading can show two decisions and no #model yet
    firefox.wait_for("document.querySelectorAll('.history li.decision').length == 2 && "
                     "document.documentElement.dataset.keys == 'on'")
    box = json.loads(firefox.eval("document.getElementById('model').textContent"))["box"]  # type: ignore[arg-type]
    w, h = (int(firefox.eval(f"document.getElementById('item').dataset.{d}")) for d in ("width", "height"))
    assert box == pytest.approx([w * 0.2, h * 0.3, w * 0.6, h * 0.7], abs=max(w, h) * 0.03)
    firefox.screenshot(screenshots_dir / "firefox-item.png")


def test_firefox_at_phone_width_scrolls_only_down(firefox, server, job, screenshots_dir):  # noqa: F811
    firefox.viewport(390, 844)
    try:
        for url, name in (("/ui/upload", "firefox-upload-phone.png"), (f"/ui/jobs/{job}/review", None)):
            firefox.goto(f"{server.url}{url}")
            firefox.wait_for("document.readyState == 'complete'")
            assert firefox.eval("document.documentElement.scrollWidth <= window.innerWidth + 1"), url
            if name:
                firefox.screenshot(screenshots_dir / name)
    finally:
        firefox.viewport(1280, 900)
