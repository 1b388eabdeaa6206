"""The /ui pages in headless Chromium against a real uvicorn: sign-in, upload, a job from the
jobs page to its review, a label overridden with the keyboard, a box dragged, both found in
the exports, CSRF, image-route confinement, /docs offline, and a phone-width layout.
Screenshots of every page go to test-output/screenshots (CERVIXQC_SCREENSHOTS)."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from pipelines.data.coco import load_coco, validate_coco
from pipelines.data.detection import CocoDetection
from tests.browser import browser, screenshots_dir  # noqa: F401  (pytest fixtures)
from tests.service_server import API_KEY
from tests.ui_fixtures import photos, server  # noqa: F401  (pytest fixtures)

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]
expect.set_options(timeout=15_000)  # CI's 2 cores may be busy with another server


def _keys_on(page: Page) -> None:
    """The image page's key listeners are attached (item.js marks <html>): a key pressed before
    would go unheard."""
    expect(page.locator("html[data-keys=on]")).to_have_count(1)


def _shows(page: Page, locator: str, text: str) -> None:
    """The page answered (a decision reloads it) and the new page listens again."""
    expect(page.locator(locator)).to_have_text(text)
    _keys_on(page)


@pytest.fixture(scope="module")
def context(browser, server):  # noqa: F811
    """One signed-in browser for the module's walk through the pages (tests run in order)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=server.url)
    yield ctx
    ctx.close()


@pytest.fixture(scope="module")
def page(context) -> Page:
    return context.new_page()


def _sign_in(page: Page, key: str) -> None:
    page.goto("/ui/login")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()


def test_sign_in_refuses_a_bad_key_and_a_good_key_opens_the_pages(page, server, screenshots_dir):  # noqa: F811
    page.goto("/ui/jobs")
    assert "/ui/login" in page.url  # a page without a session sends you to sign in
    page.screenshot(path=screenshots_dir / "login.png")
    _sign_in(page, "not-the-key-0123456789")
    expect(page.get_by_role("alert")).to_contain_text("not valid")
    _sign_in(page, API_KEY)
    expect(page.get_by_role("heading", name="Check photos")).to_be_visible()
    cookie = next(c for c in page.context.cookies() if c["name"] == "cervixqc_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert API_KEY not in cookie["value"]


def test_three_uploaded_photos_get_three_cards_with_their_boxes(page, photos, screenshots_dir):  # noqa: F811
    files = sorted((photos / "collection").rglob("*.jpg"))[:3]
    page.goto("/ui/upload")
    page.set_input_files("#files", [str(f) for f in files])
    expect(page.locator("#status")).to_have_text(re.compile(r"^3 of 3 photo\(s\) checked: .*\.$"), timeout=60_000)
    cards = page.locator("#cards .card")
    expect(cards).to_have_count(3)
    for i in range(3):
        card = cards.nth(i)
        assert card.locator(".label").inner_text() in ("regular", "non-regular: green filter",
                                                       "non-regular: Lugol's iodine", "non-regular")
        expect(card.locator(".box")).to_be_visible()
        assert re.match(r"ResNeSt 0\.\d{3} vs 0\.500 · Deep SAD \d+\.\d{3} vs 1\.000",
                        card.locator(".score").inner_text())  # each score against its threshold
    assert {cards.nth(i).locator(".path").inner_text() for i in range(3)} == {f.name for f in files}
    page.screenshot(path=screenshots_dir / "upload.png", full_page=True)


def test_an_unreadable_upload_gets_a_card_with_its_reason(page, photos):
    page.goto("/ui/upload")
    page.set_input_files("#files", [str(photos / "collection" / "notes.jpg")])
    card = page.locator("#cards .card").first
    expect(card.locator(".label")).to_have_text("unreadable", timeout=60_000)
    expect(card.locator(".reason")).to_contain_text("Reason: not an image")
    expect(page.locator("#status")).to_have_text("1 of 1 photo(s) checked: 1 unreadable.")  # said, not only shown


def test_a_job_started_from_the_jobs_page_runs_to_done(page, screenshots_dir):  # noqa: F811
    checks = []

    def first_check_fails(route):  # one failed status check stopped the row for good (an audit)
        checks.append(route.request.url)
        route.abort() if len(checks) == 1 else route.continue_()

    page.route("**/status.json", first_check_fails)
    page.goto("/ui/jobs")
    page.get_by_label("Folder or manifest").fill("collection")
    page.get_by_role("button", name="Start job").click()
    row = page.locator("tr[data-job]").first
    expect(row.locator(".status")).to_have_text("done", timeout=120_000)
    page.unroute("**/status.json")
    assert len(checks) >= 2  # the failed check, and the ones after it
    expect(row.locator(".count")).to_have_text("61 / 61")
    expect(row.get_by_role("link", name="Review")).to_be_visible()  # jobs.js swapped the cancel button for it
    expect(row.locator("form.retry")).to_have_count(0)  # a job done has nothing to retry
    # and the Delete a finished job's row is rendered with (it came only with a reload)
    row.locator("details.delete summary").click()
    job = row.get_attribute("data-job")
    expect(row.get_by_role("button", name=f"Delete job {job}")).to_be_visible()
    assert row.locator("details.delete form").get_attribute("action").endswith(f"/ui/jobs/{job}/delete")
    row.locator("details.delete summary").click()  # closed again for the screenshot
    page.screenshot(path=screenshots_dir / "jobs.png", full_page=True)
    # a job cancelled while the page is open gets the Retry the page renders (jobs.js clones it)
    page.get_by_label("Folder or manifest").fill("collection")
    page.get_by_role("button", name="Start job").click()
    cancelled = page.locator("tr[data-job]").first
    job = cancelled.get_attribute("data-job")
    assert page.request.post(f"/v1/jobs/{job}/cancel", headers={"X-API-Key": API_KEY}).ok
    retry = cancelled.locator("form.retry")
    expect(retry.locator("button")).to_have_attribute(
        "title", "cancelled: run it again, reading only the files it has no result for")
    assert retry.get_attribute("action").endswith(f"/ui/jobs/{job}/retry")
    csrf = page.locator("#main").get_attribute("data-csrf")
    assert retry.locator("input[name=csrf]").get_attribute("value") == csrf
    retry.locator("button").click()  # the cloned form posts: the same job runs to done, as the first did
    expect(page.locator(f"tr[data-job='{job}'] .status")).to_have_text("done", timeout=120_000)


def test_a_job_outside_the_data_roots_is_refused_on_the_form(page):
    page.goto("/ui/jobs")
    page.get_by_label("Folder or manifest").fill("/etc")
    page.get_by_role("button", name="Start job").click()
    expect(page.get_by_role("alert")).to_contain_text("outside the allowed data roots")


def _between_scores(scores) -> float:
    """A threshold halfway between the median score and the next lower one: on a score itself,
    the slider's own rounding of the value decided which side that photo fell (30 vs 31)."""
    xs = sorted(set(scores))
    k = len(xs) // 2
    return (xs[k - 1] + xs[k]) / 2


def _open_review(page: Page) -> str:
    page.goto("/ui/jobs")
    page.locator("tr[data-job] a").first.click()
    expect(page.get_by_role("heading", name=re.compile("Review of job"))).to_be_visible()
    return page.url.split("/ui/jobs/")[1].split("/")[0]


def test_the_review_page_counts_sorts_and_answers_a_what_if(page, screenshots_dir):  # noqa: F811
    _open_review(page)
    expect(page.locator("#grid .card")).to_have_count(48)  # page 1 of 61 items
    expect(page.get_by_role("link", name="Next page")).to_be_visible()
    slider = page.locator("#thr")
    expect(slider).to_have_attribute("min", re.compile(r"\d"))  # set once the scores have arrived
    scores = page.request.get(page.url.split("/review")[0] + "/scores.json").json()
    assert scores["policy"] == "resnest" and len(scores["points"]) == 60
    assert scores["thresholds"]["colour"] == 0.5 and all(p[2] is not None for p in scores["points"])
    stored = scores["thresholds"]["resnest"]
    moved = _between_scores(p[1] for p in scores["points"])
    changed = sum((p[1] >= moved) != (p[1] >= stored) for p in scores["points"])
    slider.fill(str(moved))
    expect(page.locator("#whatif-text")).to_contain_text(f"{changed} of 60 would change label")
    page.screenshot(path=screenshots_dir / "review.png", full_page=True)
    # the counts and the filter are the model's, and say so: a relabelled photo was looked for in vain (an audit)
    expect(page.get_by_role("heading", name="By the model's label")).to_be_visible()
    page.get_by_label("Model's label").select_option("unreadable")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#grid .card")).to_have_count(1)
    expect(page.locator("#grid .card .noimg")).to_contain_text("not an image")


def test_a_label_is_overridden_with_the_keyboard_and_undone(page, screenshots_dir):  # noqa: F811
    _open_review(page)
    page.locator("#grid .card a").first.click()  # the image closest to the threshold
    expect(page.locator("#photo")).to_be_visible()
    expect(page.locator(".facts")).to_contain_text("Crop colour probability")
    _keys_on(page)
    page.keyboard.press("2")  # green
    _shows(page, "#final", "non-regular: green filter")
    page.keyboard.press("1")
    _shows(page, "#final", "regular")
    page.keyboard.press("u")  # back to green
    _shows(page, "#final", "non-regular: green filter")
    expect(page.locator(".history li.undone")).to_have_count(1)
    assert "→ non-regular: green filter" in page.locator(".history li.decision").first.inner_text()
    # each decision with its time (it had none), in UTC as the CSV export writes it
    expect(page.locator(".history li.decision time").first).to_have_attribute("datetime", re.compile(r"\+00:00$"))
    # the reload kept the message for screen readers (it vanished with it), focus on the decisions,
    # and the final label's button says it is the chosen one
    expect(page.locator("#saved")).to_have_text("Saved: undo")
    expect(page.locator("#decide")).to_be_focused()
    expect(page.get_by_role("button", name="2 non-regular: green filter")).to_have_attribute("aria-pressed", "true")
    assert "/" not in page.title()  # no file name in the browser's history
    page.screenshot(path=screenshots_dir / "item.png", full_page=True)
    # single-key shortcuts switched off (screen readers and speech input use those keys): a key does nothing
    page.get_by_label("Single-key shortcuts").uncheck()
    page.keyboard.press("1")
    page.wait_for_timeout(500)
    _shows(page, "#final", "non-regular: green filter")
    page.reload()
    _keys_on(page)
    expect(page.get_by_label("Single-key shortcuts")).not_to_be_checked()  # remembered
    page.get_by_label("Single-key shortcuts").check()
    page.evaluate("window.scrollTo(0, 0)")  # as the next test finds the photo


def test_a_box_is_corrected_by_dragging_on_the_photo(page):
    stage = page.locator("#stage")
    b = stage.bounding_box()
    page.mouse.move(b["x"] + b["width"] * 0.25, b["y"] + b["height"] * 0.25)
    page.mouse.down()
    page.mouse.move(b["x"] + b["width"] * 0.5, b["y"] + b["height"] * 0.5, steps=5)
    page.mouse.up()
    expect(page.locator(".history li.decision")).to_have_count(3)
    assert "box" in page.locator(".history li.decision").nth(2).inner_text()


def test_both_corrections_are_in_the_csv_and_the_coco_export(page, photos):
    job = page.url.split("/ui/jobs/")[1].split("/")[0]
    item = int(page.url.split("/items/")[1].split("?")[0])
    rows = list(csv.DictReader(io.StringIO(page.request.get(f"/ui/jobs/{job}/export.csv").text())))
    assert len(rows) == 61
    row = next(r for r in rows if int(r["item"]) == item)
    assert row["reviewed_class"] == "green" and row["model_label"] in ("regular", "non_regular")
    assert (row["final_label"], row["final_kind"]) == ("non_regular", "green")
    assert row["reviewed_by"].startswith("key-") and API_KEY not in row["reviewed_by"]
    box = json.loads(row["final_box"])
    w, h = int(row["width"]), int(row["height"])
    assert box == pytest.approx([w * 0.25, h * 0.25, w * 0.5, h * 0.5], abs=max(w, h) * 0.03)
    assert row["final_box"] != row["model_box"]
    coco = page.request.get(f"/ui/jobs/{job}/export.coco.json").json()
    image = next(im for im in coco["images"] if im["file_name"] == row["path"])
    ann = next(a for a in coco["annotations"] if a["image_id"] == image["id"])
    assert ann["bbox"] == pytest.approx([box[0], box[1], box[2] - box[0], box[3] - box[1]], abs=0.2)
    assert "notes.jpg" not in {im["file_name"] for im in coco["images"]}  # unreadable: no COCO image
    # what train-detector reads: the file saved in the job's folder, images relative to it
    saved = photos / "collection" / "reviewed.coco.json"
    saved.write_text(json.dumps(coco))
    ds = load_coco(saved)
    assert validate_coco(ds) == []
    data = CocoDetection(ds, saved.parent, decode_long_side=None)
    _, target = data[next(i for i, im in enumerate(ds.images) if im.file_name == row["path"])]
    assert target["boxes"].tolist() == [pytest.approx(box, abs=0.2)]


def test_applying_the_review_puts_a_copy_in_the_final_labels_folder(page, server, photos):
    job = page.url.split("/ui/jobs/")[1].split("/")[0]
    rows = list(csv.DictReader(io.StringIO(page.request.get(f"/ui/jobs/{job}/export.csv").text())))
    row = next(r for r in rows if not r["reviewed_class"] and r["model_label"] == "non_regular")
    page.goto(f"/ui/jobs/{job}/items/{row['item']}")
    _keys_on(page)
    page.keyboard.press("4")  # no cervix
    _shows(page, "#final", "no cervix")
    page.goto(f"/ui/jobs/{job}/review")
    page.get_by_role("button", name="Apply final labels to the quarantine").click()
    expect(page.get_by_role("status").last).to_contain_text("copies added")
    quarantine = Path(server.env["CERVIXQC_STATE_DIR"]) / "quarantine" / f"job-{job}"
    original = photos / "collection" / row["path"]
    assert (quarantine / "no_cervix" / row["path"]).read_bytes() == original.read_bytes()
    assert original.is_file()  # a copy: the original stays where it was


def test_a_key_pressed_while_a_decision_is_out_says_so_and_a_refused_box_is_taken_back(page):
    """Two keys 0-300 ms apart (a clinic's remote link): the second was sent with the page's old
    version and refused, and its "Not saved" wiped by the first's reload, so the page said the
    first was saved and nothing said the second was not. A box drawn on a no_cervix photo stayed
    drawn beside "Not saved" (an audit)."""
    job = page.url.split("/ui/jobs/")[1].split("/")[0]
    rows = list(csv.DictReader(io.StringIO(page.request.get(f"/ui/jobs/{job}/export.csv").text())))
    fresh = next(r for r in rows if not r["reviewed_class"] and r["model_label"] in ("regular", "non_regular"))
    page.goto(f"/ui/jobs/{job}/items/{fresh['item']}")
    _keys_on(page)
    said = page.evaluate("""() => {  // two keys in one task: the first's request is out for the second
        for (const key of ["2", "3"]) document.body.dispatchEvent(new KeyboardEvent("keydown", {key, bubbles: true}));
        return document.getElementById("saved").textContent; }""")
    assert said == "Still saving the last decision: press again once it shows."
    _shows(page, "#final", "non-regular: green filter")  # the first key's, as the page then says
    expect(page.locator(".history li.decision")).to_have_count(1)
    no_cervix = next(r for r in rows if r["final_label"] == "no_cervix" and not r["final_box"])
    page.goto(f"/ui/jobs/{job}/items/{no_cervix['item']}")
    _keys_on(page)
    b = page.locator("#stage").bounding_box()
    page.mouse.move(b["x"] + b["width"] * 0.2, b["y"] + b["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(b["x"] + b["width"] * 0.6, b["y"] + b["height"] * 0.6, steps=5)
    page.mouse.up()
    expect(page.locator("#saved")).to_contain_text("Not saved:")
    expect(page.locator("#box")).to_be_hidden()


def test_a_post_without_the_csrf_token_is_refused(page):
    job = page.url.split("/ui/jobs/")[1].split("/")[0]
    item = re.search(r"/items/(\d+)", page.content()).group(1)
    r = page.request.post(f"/ui/jobs/{job}/items/{item}/decision", data={"label": "regular"})
    assert r.status == 403 and r.json()["error"]["code"] == "csrf"
    r = page.request.post(f"/ui/jobs/{job}/apply", form={"csrf": "forged"})
    assert r.status == 403


def test_image_routes_refuse_anything_but_an_item_of_the_job(page):
    job = page.url.split("/ui/jobs/")[1].split("/")[0]
    for url in (f"/ui/jobs/{job}/items/999999/full.jpg", f"/ui/jobs/{job}/items/..%2F..%2Fetc%2Fpasswd/full.jpg",
                "/ui/jobs/nojob/items/1/full.jpg", f"/ui/jobs/{job}/items/1/..%2F..%2Fjobs.sqlite"):
        r = page.request.get(url)
        assert r.status in (404, 422), (url, r.status)
        assert r.headers["content-type"].startswith("application/json")


def test_docs_render_their_operations_with_no_network(browser, server, screenshots_dir):  # noqa: F811
    ctx = browser.new_context(base_url=server.url)
    outside: list[str] = []

    def only_loopback(route):
        if route.request.url.startswith(server.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    ctx.route("**/*", only_loopback)
    page = ctx.new_page()
    page.goto("/docs")  # keyed like the API: sign-in first, then back to the docs
    assert "/ui/login" in page.url
    page.get_by_label("API key").fill(API_KEY)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/ui/docs")
    expect(page.locator(".opblock").first).to_be_visible(timeout=30_000)
    assert page.locator(".opblock").count() >= 8
    page.screenshot(path=screenshots_dir / "docs.png")
    ctx.close()
    assert outside == []


def test_the_upload_page_fits_a_phone_screen(browser, server, photos, screenshots_dir):  # noqa: F811
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, base_url=server.url, is_mobile=True,
                              has_touch=True)
    page = ctx.new_page()
    _sign_in(page, API_KEY)
    expect(page.get_by_role("heading", name="Check photos")).to_be_visible()
    page.set_input_files("#files", [str(sorted((photos / "collection").rglob("*.jpg"))[5])])
    expect(page.locator("#status")).to_have_text(re.compile(r"^1 of 1 photo\(s\) checked: 1 "), timeout=60_000)
    # against the layout viewport: a phone zooms out to a wider page, and innerWidth grew with it,
    # so the check read true for the jobs page's 723 px on a 390 px screen
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth + 1")
    page.screenshot(path=screenshots_dir / "upload-phone.png", full_page=True)
    page.goto("/ui/jobs")  # its table (723 px) scrolled the whole page, Cancel and Delete off screen (an audit)
    expect(page.locator("tr[data-job]").first).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth + 1")
    ctx.close()


def test_a_drop_larger_than_the_engines_queue_is_checked_whole_a_few_photos_at_a_time(
        browser, photos, tmp_path):  # noqa: F811
    """The page sent a whole drop at once: photos past the engine's queue (CERVIXQC_MAX_QUEUE)
    came back 503, "not checked". Here a queue of 2 and 7 photos: all checked, at most 2 sent
    at once."""
    from tests.qc_fixtures import tiny_weights
    from tests.service_server import start_server

    srv = start_server(tmp_path / "srv", tiny_weights(tmp_path / "w", detector_threshold=0.0), data_roots=photos,
                       max_queue=2, max_files_per_request=2, max_wait_ms=200)
    ctx = browser.new_context(base_url=srv.url)
    try:
        page = ctx.new_page()
        in_flight, most = set(), [0]

        def sent(request) -> None:
            if request.method == "POST" and request.url.endswith("/ui/upload"):
                in_flight.add(request)
                most[0] = max(most[0], len(in_flight))

        def ended(request) -> None:
            in_flight.discard(request)

        page.on("request", sent)
        page.on("requestfinished", ended)
        page.on("requestfailed", ended)
        _sign_in(page, API_KEY)
        expect(page.locator(".hint")).to_contain_text("checked 2 at a time")
        files = sorted((photos / "collection").rglob("*.jpg"))[:7]
        page.set_input_files("#files", [str(f) for f in files])
        expect(page.locator("#status")).to_have_text(re.compile(r"^7 of 7 photo\(s\) checked: "), timeout=60_000)
        assert 1 <= most[0] <= 2, most[0]
    finally:
        ctx.close()
        srv.kill()


def test_the_pages_work_with_the_keyboard_alone(browser, server):  # noqa: F811
    ctx = browser.new_context(base_url=server.url)
    page = ctx.new_page()
    page.goto("/ui/login")
    expect(page.get_by_label("API key")).to_be_focused()  # the key field has focus on arrival
    page.keyboard.type(API_KEY)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Check photos")).to_be_visible()
    page.keyboard.press("Tab")  # first stop: the skip link
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    job = page.request.get("/ui/jobs").text().split('data-job="')[1].split('"')[0]
    page.goto(f"/ui/jobs/{job}/review?label=non_regular")
    page.locator("#grid .card a").last.focus()
    page.keyboard.press("Enter")  # the focused card's link
    expect(page.locator("#photo")).to_be_visible()
    _keys_on(page)
    item = page.locator("#item")
    w, h = int(item.get_attribute("data-width")), int(item.get_attribute("data-height"))
    before = json.loads(page.locator("#model").inner_text())["box"]
    decisions = page.locator(".history li.decision").count()
    page.keyboard.press("b")  # box mode: two steps right, one step taller, Enter saves
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Shift+ArrowDown")
    page.keyboard.press("Enter")
    expect(page.locator(".history li.decision")).to_have_count(decisions + 1)
    _keys_on(page)
    after = json.loads(page.locator("#model").inner_text())["box"]
    dx = min(2 * w / 100, w - before[2])
    assert after == pytest.approx([before[0] + dx, before[1], before[2] + dx, min(h, before[3] + h / 100)], abs=0.11)
    ctx.close()


def test_the_what_if_recounts_under_the_vote_of_three_for_a_job_run_with_it(page, server):  # noqa: F811
    key = {"X-API-Key": API_KEY}
    created = page.request.post("/v1/jobs", data={"source": "collection", "policy": "two_of_three"}, headers=key)
    assert created.status == 202, created.text()
    job = created.json()["id"]
    for _ in range(240):
        status = page.request.get(f"/v1/jobs/{job}", headers=key).json()["status"]
        if status in ("done", "failed"):
            break
        page.wait_for_timeout(500)
    assert status == "done"
    page.goto(f"/ui/jobs/{job}/review")
    slider = page.locator("#thr")
    expect(slider).to_have_attribute("min", re.compile(r"\d"))
    scores = page.request.get(f"/ui/jobs/{job}/scores.json").json()
    t, points = scores["thresholds"], scores["points"]
    assert scores["policy"] == "two_of_three" and t["colour"] == 0.5

    def flagged(p, thr, colour=True):
        return (p[0] >= t["deep_sad"]) + (p[1] >= thr) + (colour and p[2] >= t["colour"]) >= 2

    moved = _between_scores(p[1] for p in points)
    changed = sum(flagged(p, moved) != flagged(p, t["resnest"]) for p in points)
    without_colour = sum(flagged(p, moved, False) != flagged(p, t["resnest"], False) for p in points)
    # else the page's answer could not tell a missing rule, or a rule blind to colour, from a right one
    assert changed > 0 and without_colour != changed
    slider.fill(str(moved))
    expect(page.locator("#whatif-text")).to_contain_text(f"{changed} of {len(points)} would change label")
