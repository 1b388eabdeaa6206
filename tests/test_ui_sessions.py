"""Sessions, CSRF and the image routes' confinement over real HTTP (uvicorn on loopback)."""

from __future__ import annotations

import json
import re
import shutil
import stat
import time
from pathlib import Path

import httpx
import pytest

from tests.qc_fixtures import fuzz_set, tiny_weights
from tests.service_server import API_KEY, HEADERS, sign_in, start_server

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cases = fuzz_set()
    for name in ("ok.jpg", "gray.jpg", "exif6.jpg"):
        (root / "set" / "site").mkdir(parents=True, exist_ok=True)
        (root / "set" / "site" / name).write_bytes(cases[name][0])
    (root / "many").mkdir()
    for i in range(60):  # a job of seconds: cancelled milliseconds after it starts, it has files left
        (root / "many" / f"img{i:02d}.jpg").write_bytes(cases["ok.jpg"][0][:-1] + i.to_bytes(2, "big"))
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_root):
    srv = start_server(tmp_path_factory.mktemp("srv"), tiny_weights(tmp_path_factory.mktemp("w"), 0.0),
                       data_roots=data_root)
    yield srv
    srv.kill()


def _signed_in(server, **headers) -> tuple[httpx.Client, str]:
    c = httpx.Client(base_url=server.url, headers=headers)
    r = sign_in(c, next_url="/ui/jobs")
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"
    csrf = re.search(r'data-csrf="([^"]+)"', c.get("/ui/jobs").text).group(1)
    return c, csrf


def _finished_job(server, source: str) -> str:
    with server.client() as api:
        job = api.post("/v1/jobs", json={"source": source}).json()["id"]
        for _ in range(300):
            if api.get(f"/v1/jobs/{job}").json()["status"] == "done":
                return job
            time.sleep(0.2)
    raise AssertionError("job did not finish")


def test_the_api_docs_need_a_key_or_a_session_and_load_their_assets_from_the_service(server):
    assert httpx.get(f"{server.url}/openapi.json").status_code == 401
    assert "cervixqc" in httpx.get(f"{server.url}/openapi.json", headers=HEADERS).json()["info"]["title"]
    for page in ("/docs", "/redoc"):  # the addresses people type lead to the pages, through sign-in
        r = httpx.get(server.url + page, headers={"Accept": "text/html"}, follow_redirects=True)
        assert r.url.path == "/ui/login" and r.url.params["next"] == f"/ui{page}", (page, str(r.url))
    assert httpx.get(f"{server.url}/ui/openapi.json", headers=HEADERS).status_code == 401  # pages: session only
    c, _ = _signed_in(server)
    assert "cervixqc" in c.get("/ui/openapi.json").json()["info"]["title"]
    for page, asset_names in (("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")), ("/redoc", ("redoc.standalone.js",))):
        html = c.get(page, follow_redirects=True).text
        external = re.findall(r"""(?:src|href)=["'](https?://[^"']+)""", html)
        assert external == [], (page, external)
        assert re.search(r"""["']/ui/openapi\.json["']""", html), page
        for name in asset_names:
            ref = re.search(rf"""["']([^"']*/{re.escape(name)})["']""", html)
            assert ref, (page, name)
            asset = httpx.get(server.url + ref.group(1))
            assert asset.status_code == 200 and len(asset.content) > 10_000, (name, asset.status_code)


def test_the_session_cookie_is_httponly_strict_and_secure_behind_https(server):
    https = {"X-Forwarded-Proto": "https"}  # uvicorn trusts a loopback proxy's headers
    page = httpx.get(f"{server.url}/ui/login", headers=https)
    assert "Secure" in page.headers["set-cookie"]
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    # the client keeps a Secure cookie off plain http, as a browser would: sent by hand here
    r = httpx.post(f"{server.url}/ui/login", data={"api_key": API_KEY, "csrf": token, "next": ""},
                   headers={**https, "Cookie": f"cervixqc_login_csrf={token}"})
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("cervixqc_session="))
    assert all(flag in cookie for flag in ("HttpOnly", "SameSite=strict", "Secure", "Path=/ui"))
    assert API_KEY not in cookie


def test_a_forged_or_missing_session_gets_sign_in_not_a_page(server):
    c = httpx.Client(base_url=server.url, cookies={"cervixqc_session": "eyJ3aG8iOiAiYWRtaW4ifQ==.deadbeef"})
    r = c.get("/ui/jobs", headers={"Accept": "text/html"})
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next=")
    assert c.get("/ui/jobs/x/status.json").status_code == 401  # a script's request: 401, not a redirect
    # a cookie of other characters: compare_digest raised TypeError, a 500 on every page
    r = httpx.get(f"{server.url}/ui/jobs", headers={"Accept": "text/html", "Cookie": b"cervixqc_session=abc.\xc3\xa9"})
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next=")


def test_a_session_past_its_max_age_gets_sign_in_not_a_page(server):
    """A copied cookie opens nothing once its session would have expired (SESSION_MAX_AGE_S):
    the service's own cookie, signed again with its own secret, with an expiry in the past."""
    import base64
    import json

    from service.ui.session import COOKIE, SessionSigner

    c, _ = _signed_in(server)
    payload = json.loads(base64.urlsafe_b64decode(c.cookies[COOKIE].rsplit(".", 1)[0]))
    signer = SessionSigner(Path(server.env["CERVIXQC_STATE_DIR"], "session-secret").read_bytes().strip(), 3600)
    page = {"Accept": "text/html"}
    for exp, status in ((time.time() + 60, 200), (time.time() - 1, 303)):
        forged = base64.urlsafe_b64encode(json.dumps({**payload, "exp": exp}).encode())
        cookie = f"{forged.decode()}.{signer._mac(forged)}"
        r = httpx.get(f"{server.url}/ui/jobs", headers=page, cookies={COOKIE: cookie})
        assert r.status_code == status, exp
    assert r.headers["location"].startswith("/ui/login?next=")


def test_sign_in_needs_its_form_token_and_never_redirects_off_site(server):
    c = httpx.Client(base_url=server.url)
    r = c.post("/ui/login", data={"api_key": API_KEY, "csrf": "made-up", "next": ""})
    assert r.status_code == 303 and "error=expired" in r.headers["location"]
    for target in ("https://evil.example/", "//evil.example/ui/", "/ui/../../x", "/ui/\\evil.example", "/ui/\nx"):
        r = sign_in(c, next_url=target)
        assert r.headers["location"] in ("/ui/upload", "/ui/../../x") and "evil" not in r.headers["location"]
    # the page a sign-in returns to keeps its filter (it was decoded twice: a%26b became a&b)
    r = sign_in(c, next_url="/ui/jobs/x/review?source=a%26b")
    assert r.headers["location"] == "/ui/jobs/x/review?source=a%26b"


def test_two_tabs_sign_in_and_the_first_tabs_pages_keep_their_token(server):
    """Each sign-in page drew a new form token over the cookie, so of two tabs showing it the
    first sent was refused as expired; a second sign-in made a new session, whose CSRF token the
    first tab's pages did not have, so their next decision was refused, 403 (an audit)."""
    c = httpx.Client(base_url=server.url)
    first, second = (re.search(r'name="csrf" value="([^"]+)"', c.get("/ui/login").text).group(1) for _ in range(2))
    assert first == second  # the browser's one token, not one per load
    r = c.post("/ui/login", data={"api_key": API_KEY, "csrf": first, "next": "/ui/jobs"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs", r.headers.get("location")
    session = c.cookies.get("cervixqc_session")
    csrf = re.search(r'data-csrf="([^"]+)"', c.get("/ui/jobs").text).group(1)
    again = re.search(r'name="csrf" value="([^"]+)"', c.get("/ui/login").text).group(1)  # another tab's sign-in
    r = c.post("/ui/login", data={"api_key": API_KEY, "csrf": again, "next": "/ui/jobs"})
    assert r.status_code == 303 and c.cookies.get("cervixqc_session") == session
    assert c.post("/ui/logout", data={"csrf": csrf}).status_code == 303  # the first tab's token still holds


def test_the_session_does_not_open_the_json_api(server):
    c, _ = _signed_in(server)
    assert c.get("/v1/jobs").status_code == 401


def test_sign_out_ends_the_session_and_needs_its_token(server):
    c, csrf = _signed_in(server)
    copied = dict(c.cookies)  # a copy of the cookie, kept (a shared profile, a proxy's log)
    assert c.post("/ui/logout").status_code == 403
    assert c.post("/ui/logout", data={"csrf": csrf}).status_code == 303
    assert c.get("/ui/jobs", headers={"Accept": "text/html"}).status_code == 303
    with httpx.Client(base_url=server.url, cookies=copied) as thief:  # opened the pages for 8 h more
        assert thief.get("/ui/jobs", headers={"Accept": "text/html"}).status_code == 303
    # an expired or forged session signs out too (it was a bare 401 that kept the cookie)
    stale = httpx.Client(base_url=server.url, cookies={"cervixqc_session": "eyJ3aG8iOiAiYWRtaW4ifQ==.deadbeef"})
    r = stale.post("/ui/logout")
    assert r.status_code == 303 and r.headers["location"] == "/ui/login" and "cervixqc_session=" in r.headers["set-cookie"]


def test_a_key_taken_out_of_the_settings_loses_its_signed_in_pages_and_a_sign_out_then_holds(tmp_path):
    """Two keys, a session each; restarted with one key only (same state, same signing
    secret), the other key's session gets sign-in, not the pages."""
    from service.ui.session import COOKIE

    weights, work, other = tiny_weights(tmp_path / "w", 0.0), tmp_path / "srv", "second-key-0123456789"
    cookies = {}
    srv = start_server(work, weights, api_keys=f"{API_KEY},{other}")
    try:
        for key in (API_KEY, other):
            with httpx.Client(base_url=srv.url) as c:
                assert sign_in(c, key=key).status_code == 303
                cookies[key] = c.cookies[COOKIE]
    finally:
        srv.kill()
    srv = start_server(work, weights)  # API_KEY only
    try:
        page = {"Accept": "text/html"}
        kept = httpx.get(f"{srv.url}/ui/jobs", cookies={COOKIE: cookies[API_KEY]}, headers=page)
        dropped = httpx.get(f"{srv.url}/ui/jobs", cookies={COOKIE: cookies[other]}, headers=page)
        assert kept.status_code == 200
        assert dropped.status_code == 303 and dropped.headers["location"].startswith("/ui/login")
        assert httpx.get(f"{srv.url}/ui/jobs", cookies={COOKIE: cookies[other]}).status_code == 401
        # signed out meanwhile: revoked, though not live (a copy opened the pages once the key
        # was back: an audit)
        assert httpx.post(f"{srv.url}/ui/logout", cookies={COOKIE: cookies[other]}).status_code == 303
    finally:
        srv.kill()
    srv = start_server(work, weights, api_keys=f"{API_KEY},{other}")  # the key back
    try:
        again = httpx.get(f"{srv.url}/ui/jobs", cookies={COOKIE: cookies[other]}, headers={"Accept": "text/html"})
        assert again.status_code == 303 and again.headers["location"].startswith("/ui/login")
    finally:
        srv.kill()


def test_a_cancelled_job_gets_a_retry_button_that_needs_the_token_and_resumes_it(server):
    with server.client() as api:
        job = api.post("/v1/jobs", json={"source": "many"}).json()["id"]
        assert api.post(f"/v1/jobs/{job}/cancel").status_code == 200
    c, csrf = _signed_in(server)
    row = re.search(rf'<tr data-job="{job}".*?</tr>', c.get("/ui/jobs").text, re.S).group(0)
    assert f'action="/ui/jobs/{job}/retry"' in row and "cancelled" in row
    assert c.post(f"/ui/jobs/{job}/retry", data={"csrf": "forged"}).status_code == 403
    r = c.post(f"/ui/jobs/{job}/retry", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"
    with server.client() as api:
        for _ in range(600):
            status = api.get(f"/v1/jobs/{job}").json()
            if status["status"] not in ("queued", "running"):
                break
            time.sleep(0.2)
        assert (status["status"], status["processed"], status["total"]) == ("done", 60, 60)
        rows = api.get(f"/v1/jobs/{job}/results", params={"format": "jsonl"}).text.splitlines()
    assert len(rows) == 60
    row = re.search(rf'<tr data-job="{job}".*?</tr>', c.get("/ui/jobs").text, re.S).group(0)
    assert "/retry" not in row  # a finished job has nothing to retry
    assert c.post(f"/ui/jobs/{job}/retry", data={"csrf": csrf}).status_code == 303  # a second click: back to the list


def test_a_finished_job_is_deleted_from_the_jobs_page_with_the_token_only(server):
    job = _finished_job(server, "set")
    c, csrf = _signed_in(server)
    row = re.search(rf'<tr data-job="{job}".*?</tr>', c.get("/ui/jobs").text, re.S).group(0)
    assert f'action="/ui/jobs/{job}/delete"' in row and "quarantine copies stay" in row
    assert c.post(f"/ui/jobs/{job}/delete", data={"csrf": "forged"}).status_code == 403
    assert httpx.get(f"{server.url}/v1/jobs/{job}", headers=HEADERS).status_code == 200
    r = c.post(f"/ui/jobs/{job}/delete", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"
    assert httpx.get(f"{server.url}/v1/jobs/{job}", headers=HEADERS).status_code == 404
    assert f'data-job="{job}"' not in c.get("/ui/jobs").text
    assert c.post(f"/ui/jobs/{job}/delete", data={"csrf": csrf}).status_code == 303  # another tab: back to the list
    # its review page, still open in a browser: a page saying so with a way back (the raw JSON was shown)
    r = c.get(f"/ui/jobs/{job}/review", headers={"Accept": "text/html"})
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html"), r.text
    assert f"no job &#39;{job}&#39;" in r.text and 'href="/ui/jobs"' in r.text
    assert c.get(f"/ui/jobs/{job}/review").json()["error"]["code"] == "job_not_found"  # a script's request
    for action in ("cancel", "retry"):  # its Cancel or Retry, clicked in a tab still showing it (was the JSON)
        r = c.post(f"/ui/jobs/{job}/{action}", data={"csrf": csrf})
        assert r.status_code == 303 and r.headers["location"] == "/ui/jobs", (action, r.text)


def test_a_mistyped_page_address_is_a_page_with_a_way_back_and_json_for_scripts(server):
    """A wrong item number or page, or an unknown /ui/ address, showed the raw JSON error."""
    job = _finished_job(server, "set")
    c, _ = _signed_in(server)
    for path, status in ((f"/ui/jobs/{job}/items/0", 422), (f"/ui/jobs/{job}/items/abc", 422),
                         (f"/ui/jobs/{job}/review?page=0", 422), ("/ui/nonexistent", 404)):
        r = c.get(path, headers={"Accept": "text/html"})
        assert r.status_code == status and r.headers["content-type"].startswith("text/html"), (path, r.text)
        assert 'href="/ui/jobs"' in r.text, path
        assert "Signed in as key-" in r.text and "Sign out" in r.text, path  # the menu: it was hidden (an audit)
        assert c.get(path).headers["content-type"].startswith("application/json"), path
    anonymous = httpx.get(f"{server.url}/ui/nonexistent", headers={"Accept": "text/html"})
    assert anonymous.status_code == 404 and "Signed in as" not in anonymous.text


def test_the_signing_secret_is_private_to_the_service(server):
    secret = server.env["CERVIXQC_STATE_DIR"] + "/session-secret"
    assert stat.S_IMODE(__import__("os").stat(secret).st_mode) == 0o600


def test_an_item_whose_file_now_links_outside_the_roots_is_not_served(server, data_root, tmp_path):
    shutil.copytree(data_root / "set", data_root / "linked")
    job = _finished_job(server, "linked")
    c, _ = _signed_in(server)
    items = sorted(int(i) for i in re.findall(r"/items/(\d+)\?", c.get(f"/ui/jobs/{job}/review").text))
    assert c.get(f"/ui/jobs/{job}/items/{items[0]}/full.jpg").status_code == 200
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(fuzz_set()["ok.jpg"][0])
    for f in (data_root / "linked" / "site").iterdir():
        f.unlink()
        f.symlink_to(outside)
    r = c.get(f"/ui/jobs/{job}/items/{items[1]}/full.jpg")
    assert r.status_code == 403 and r.json()["error"]["code"] == "path_forbidden"


def test_an_item_is_only_reachable_through_its_own_job(server):
    job_a, job_b = _finished_job(server, "set"), _finished_job(server, "set")
    c, csrf = _signed_in(server)
    item_a = re.search(r"/items/(\d+)\?", c.get(f"/ui/jobs/{job_a}/review").text).group(1)
    assert c.get(f"/ui/jobs/{job_b}/items/{item_a}/thumb.jpg").status_code == 404
    r = c.post(f"/ui/jobs/{job_b}/items/{item_a}/decision", json={"label": "regular"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 404
    with httpx.Client(base_url=server.url, headers=HEADERS) as api:
        assert api.get(f"/v1/jobs/{job_a}").status_code == 200  # the API is unchanged by the pages
    for huge in (2**63, 10**30):  # past SQLite's integers: was a 500 (OverflowError in the store)
        assert c.get(f"/ui/jobs/{job_a}/items/{huge}").status_code == 422
        assert c.get(f"/ui/jobs/{job_a}/items/{huge}/thumb.jpg").status_code == 422
        r = c.post(f"/ui/jobs/{job_a}/items/{huge}/decision", json={"label": "regular"}, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 422 and r.json()["error"]["code"]


def test_a_reviewer_whose_page_is_no_longer_current_is_told_who_changed_it(server):
    job = _finished_job(server, "set")
    a, csrf_a = _signed_in(server)
    item = re.search(r"/items/(\d+)\?", a.get(f"/ui/jobs/{job}/review").text).group(1)
    shown = int(re.search(r'data-seen="(\d+)"', a.get(f"/ui/jobs/{job}/items/{item}").text).group(1))
    b, csrf_b = _signed_in(server)
    r = b.post(f"/ui/jobs/{job}/items/{item}/decision", json={"label": "iodine", "seen": shown},
               headers={"X-CSRF-Token": csrf_b})
    assert r.status_code == 200, r.text
    for url, body in (("decision", {"label": "regular", "seen": shown}), ("undo", {"seen": shown})):
        r = a.post(f"/ui/jobs/{job}/items/{item}/{url}", json=body, headers={"X-CSRF-Token": csrf_a})
        assert r.status_code == 409 and r.json()["error"]["code"] == "changed_since_loaded", r.text
        assert "reload" in r.json()["error"]["message"]
    shown = int(re.search(r'data-seen="(\d+)"', a.get(f"/ui/jobs/{job}/items/{item}").text).group(1))
    r = a.post(f"/ui/jobs/{job}/items/{item}/undo", json={"seen": shown}, headers={"X-CSRF-Token": csrf_a})
    assert r.status_code == 200 and r.json()["undone"]["new"] == "iodine"


def test_a_page_loaded_before_a_retry_read_its_photo_again_cannot_decide_over_the_new_result(server, data_root):
    """The review's version counts decisions only: a page of a photo not there yet (unreadable,
    no picture) confirmed "unreadable" after a retry had labelled it, 200, and Apply copied it
    as unreadable (an audit)."""
    folder = data_root / "later"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(fuzz_set()["ok.jpg"][0])
    (folder / "m.csv").write_text("path\na.jpg\nb.jpg\n")  # b.jpg arrives after the first run
    job = _finished_job(server, "later/m.csv")
    a, csrf = _signed_in(server)
    items = re.findall(r"/items/(\d+)\?", a.get(f"/ui/jobs/{job}/review").text)
    item, text = next((i, t) for i in items if "b.jpg" in (t := a.get(f"/ui/jobs/{job}/items/{i}").text))
    seen, shown = re.search(r'data-seen="(\d+)" data-shown="(\w+)"', text).groups()
    # not read, so nothing to see: a label for it went into the exports as if seen (an audit)
    r = a.post(f"/ui/jobs/{job}/items/{item}/decision", json={"label": "regular", "seen": int(seen), "shown": shown},
               headers={"X-CSRF-Token": csrf})
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_read", r.text
    (folder / "b.jpg").write_bytes(fuzz_set()["ok.jpg"][0])
    with server.client() as api:
        assert api.post(f"/v1/jobs/{job}/retry").status_code == 202
        for _ in range(300):
            if api.get(f"/v1/jobs/{job}").json()["status"] == "done":
                break
            time.sleep(0.2)
    body = {"label": "unreadable", "seen": int(seen), "shown": shown}
    for url, sent in (("decision", body), ("undo", {"seen": int(seen), "shown": shown})):
        r = a.post(f"/ui/jobs/{job}/items/{item}/{url}", json=sent, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 409 and "read this photo again" in r.json()["error"]["message"], r.text
    fresh = re.search(r'data-shown="(\w+)"', a.get(f"/ui/jobs/{job}/items/{item}").text).group(1)
    assert fresh != shown
    r = a.post(f"/ui/jobs/{job}/items/{item}/decision", json=body | {"shown": fresh}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200, r.text


def test_apply_after_an_undo_takes_the_photo_out_of_the_undone_labels_folder(server):
    job = _finished_job(server, "set")
    c, csrf = _signed_in(server)
    item = re.search(r"/items/(\d+)\?", c.get(f"/ui/jobs/{job}/review").text).group(1)
    no_cervix = Path(server.env["CERVIXQC_STATE_DIR"], "quarantine", f"job-{job}", "no_cervix")
    for step in ("decision", "undo"):
        seen = int(re.search(r'data-seen="(\d+)"', c.get(f"/ui/jobs/{job}/items/{item}").text).group(1))
        body = {"label": "no_cervix", "seen": seen} if step == "decision" else {"seen": seen}
        r = c.post(f"/ui/jobs/{job}/items/{item}/{step}", json=body, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 200, r.text
        assert c.post(f"/ui/jobs/{job}/apply", data={"csrf": csrf}).status_code == 303
        copies = [p.name for p in no_cervix.rglob("*") if p.is_file()] if no_cervix.is_dir() else []
        assert len(copies) == (1 if step == "decision" else 0), (step, copies)


def test_apply_on_a_job_without_a_quarantine_builds_a_whole_one_from_the_final_labels(server, data_root):
    """It held the reviewed photos alone: a photo the model flagged that no one looked at was in
    none of its folders (an audit)."""
    folder = data_root / "whole"
    folder.mkdir()
    cases = fuzz_set()
    for name in ("ok.jpg", "gray.jpg", "exif6.jpg", "zero.jpg"):
        (folder / name).write_bytes(cases[name][0] if name in cases else b"")  # an empty file: unreadable
    job = _finished_job(server, "whole")
    with server.client() as api:
        results = api.get(f"/v1/jobs/{job}/results", params={"format": "jsonl"}).text
    rows = [json.loads(line) for line in results.splitlines()]
    c, csrf = _signed_in(server)
    items = re.findall(r"/items/(\d+)\?", c.get(f"/ui/jobs/{job}/review").text)
    item, text = next((i, t) for i in items if "ok.jpg" in (t := c.get(f"/ui/jobs/{job}/items/{i}").text))
    seen = int(re.search(r'data-seen="(\d+)"', text).group(1))
    label = "regular" if next(r["label"] for r in rows if r["path"] == "ok.jpg") != "regular" else "no_cervix"
    r = c.post(f"/ui/jobs/{job}/items/{item}/decision", json={"label": label, "seen": seen},
               headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200, r.text
    assert c.post(f"/ui/jobs/{job}/apply", data={"csrf": csrf}).status_code == 303
    final = {r["path"]: r["label"] for r in rows} | {"ok.jpg": "non_regular" if label == "green" else label}
    flagged = {(lab, path) for path, lab in final.items() if lab in ("non_regular", "no_cervix", "unreadable")}
    qdir = Path(server.env["CERVIXQC_STATE_DIR"], "quarantine", f"job-{job}")
    held = {(p.relative_to(qdir).parts[0], p.name) for p in qdir.rglob("*") if p.is_file()}
    assert held == flagged and ("unreadable", "zero.jpg") in held, (held, final)


def test_a_box_outside_the_photo_or_on_a_photo_labelled_no_cervix_is_refused(server):
    job = _finished_job(server, "set")
    c, csrf = _signed_in(server)
    item = re.search(r"/items/(\d+)\?", c.get(f"/ui/jobs/{job}/review").text).group(1)
    # the last two: 0.03 and 1e-320 px, stored rounded to 0.1 px as a box of no area (an audit)
    for box in ([0, 0, 1e6, 10], [30, 30, 10, 10], [-1, 0, 10, 10], [10.01, 10, 10.04, 10.03], [0, 0, 1e-320, 1e-320]):
        r = c.post(f"/ui/jobs/{job}/items/{item}/decision", json={"box": box}, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_box"
    r = c.post(f"/ui/jobs/{job}/items/{item}/decision", json={"label": "purple"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 422
    # on a photo labelled no_cervix a box was stored, said saved, and dropped by every export (an audit)
    decide = lambda body: c.post(f"/ui/jobs/{job}/items/{item}/decision", json=body,  # noqa: E731
                                 headers={"X-CSRF-Token": csrf})
    assert decide({"label": "no_cervix"}).status_code == 200
    r = decide({"box": [1, 1, 20, 20]})
    assert r.status_code == 409 and r.json()["error"]["code"] == "label_first", r.text
    assert decide({"label": "regular"}).status_code == 200 and decide({"box": [1, 1, 20, 20]}).status_code == 200


def test_review_is_applied_only_once_its_job_has_finished(server):
    """Apply on a running job copied from rows still coming in, and its quarantine missed the
    rest (a mutation letting it through survived the suite)."""
    c, csrf = _signed_in(server)  # first: signing in took long enough on a busy host for the job to end
    with server.client() as api:
        for _ in range(3):  # a job of seconds; one that ended before apply pins nothing: another
            job = api.post("/v1/jobs", json={"source": "many"}).json()["id"]
            r = c.post(f"/ui/jobs/{job}/apply", data={"csrf": csrf})
            still = api.get(f"/v1/jobs/{job}").json()["status"] in ("queued", "running")  # after the answer
            api.post(f"/v1/jobs/{job}/cancel")
            if still:
                break
        assert still, "every job ended before apply answered"
    assert r.status_code == 409 and "job_running" in r.text


def test_the_review_page_shows_only_counts_as_the_applied_message(server):
    """The message after apply-review came from the link's query text: a link could make our
    own page say anything ("Applied: your data was lost, call ...")."""
    job = _finished_job(server, "set")
    c, _ = _signed_in(server)
    shown = c.get(f"/ui/jobs/{job}/review?applied=3-1-0").text
    assert "Applied: 3 copies added, 1 removed (originals untouched)." in shown
    assert "2 without a copy" in c.get(f"/ui/jobs/{job}/review?applied=3-1-2").text
    shown = c.get(f"/ui/jobs/{job}/review?applied=3-1-0-2-1").text
    assert "2 not copied: outside the data roots" in shown and "1 not copied: the file changed since" in shown
    for spoof in ("Call%20555%20now-0-0", "3-1-x", "3", "3-1"):
        page = c.get(f"/ui/jobs/{job}/review?applied={spoof}")
        assert page.status_code == 200 and "Applied:" not in page.text and "555 now" not in page.text, spoof


def test_json_goes_gzipped_to_clients_that_ask_but_pages_and_photos_never(server):
    """A 10^5-item job's what-if scores were 6 MB of JSON on every visit to its review page.
    Pages stay uncompressed: they carry the CSRF token beside text a link chooses (BREACH)."""
    job = _finished_job(server, "set")
    c, _ = _signed_in(server)
    item = re.search(r"/items/(\d+)\?", c.get(f"/ui/jobs/{job}/review").text).group(1)
    gz = {"Accept-Encoding": "gzip"}
    with server.client() as api:
        r = api.get("/openapi.json", headers=gz)
        assert r.headers.get("content-encoding") == "gzip" and "paths" in r.json()
        assert "content-encoding" not in api.get("/openapi.json", headers={"Accept-Encoding": "identity"}).headers
    for url in (f"/ui/jobs/{job}/review", f"/ui/jobs/{job}/items/{item}", f"/ui/jobs/{job}/items/{item}/full.jpg"):
        r = c.get(url, headers=gz)
        assert r.status_code == 200 and "content-encoding" not in r.headers, url


def test_pages_and_photos_are_never_cached_nor_framed_and_run_only_the_services_scripts(server):
    """Photos were sent `private, max-age=3600` (kept in a shared computer's browser cache after
    sign-out), exports with no cache header, and no page forbade framing or inline scripts."""
    job = _finished_job(server, "set")
    c, _ = _signed_in(server)
    item = re.search(r"/items/(\d+)\?", c.get(f"/ui/jobs/{job}/review").text).group(1)
    for url in (f"/ui/jobs/{job}/review", f"/ui/jobs/{job}/items/{item}/thumb.jpg", f"/ui/jobs/{job}/export.csv",
                f"/ui/jobs/{job}/scores.json", "/ui/login"):
        r = c.get(url)
        assert r.status_code == 200, url
        assert r.headers["cache-control"] == "no-store" and r.headers["x-frame-options"] == "DENY", url
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-eval" not in csp, url
    assert "content-security-policy" not in c.get("/ui/docs").headers  # Swagger UI runs inline scripts
    assert "no-store" not in c.get("/ui/static/review.js").headers.get("cache-control", "")
    with server.client() as api:  # the API is left as it was
        assert "content-security-policy" not in api.get("/v1/models").headers


def test_a_form_whose_media_type_is_written_in_capitals_is_read_as_a_form(server):
    """Media types are case-insensitive: a sign-out sent as `Application/X-WWW-Form-Urlencoded`
    had its csrf field unread and was refused 403 (one check compared the raw header)."""
    c, csrf = _signed_in(server)
    r = c.post("/ui/logout", content=f"csrf={csrf}",
               headers={"Content-Type": "Application/X-WWW-Form-Urlencoded; charset=UTF-8"})
    assert r.status_code == 303 and r.headers["location"].endswith("/ui/login"), (r.status_code, r.text[-300:])
    assert c.get("/ui/jobs", headers={"Accept": "text/html"}).status_code == 303  # signed out


def test_the_job_forms_refusal_of_an_empty_source_says_what_is_wrong(server):
    """Its only text was pydantic's last line, a link to pydantic's docs (an audit)."""
    c, csrf = _signed_in(server)
    r = c.post("/ui/jobs", data={"csrf": csrf, "source": ""})
    assert r.status_code == 200 and "source: String should have at least 1 character" in r.text, r.text[-600:]
    assert "errors.pydantic.dev" not in r.text


def test_a_refused_job_form_keeps_the_quarantine_typed_and_marks_the_field_at_fault(server):
    """The quarantine came back empty after any refusal: a Start after fixing the source ran
    the job without it, its flagged photos copied nowhere; a quarantine's error was marked on
    the source field (an audit)."""
    c, csrf = _signed_in(server)
    r = c.post("/ui/jobs", data={"csrf": csrf, "source": "no-such-folder", "quarantine": "clinic-a"})
    assert r.status_code == 200 and 'name="quarantine" value="clinic-a"' in r.text, r.text[-800:]
    assert re.search(r'id="source"[^>]*aria-invalid="true"', r.text)
    r = c.post("/ui/jobs", data={"csrf": csrf, "source": "set", "quarantine": "../up"})
    assert 'name="quarantine" value="../up"' in r.text
    assert re.search(r'id="quarantine"[^>]*aria-invalid="true"', r.text)
    assert not re.search(r'id="source"[^>]*aria-invalid="true"', r.text)



def test_the_review_filters_source_options_send_the_folder_name_as_it_is(server, data_root):
    """An option without a value sends its text with spaces collapsed and trimmed: a folder
    `clinic  A` was filtered as `clinic A`, and its photos hidden from a filtered review (an audit)."""
    (data_root / "spaced" / "clinic  A").mkdir(parents=True)
    (data_root / "spaced" / "clinic  A" / "ok.jpg").write_bytes(fuzz_set()["ok.jpg"][0])
    job = _finished_job(server, "spaced")
    c, _ = _signed_in(server)
    assert '<option value="clinic  A"' in c.get(f"/ui/jobs/{job}/review").text
    assert "1 image" in c.get(f"/ui/jobs/{job}/review", params={"source": "clinic  A"}).text


def test_a_pages_form_refused_gets_a_page_and_a_script_keeps_its_json(server):
    """An expired session, Apply on a job running again or a full quarantine answered a
    browser's form with raw JSON (an audit)."""
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    with httpx.Client(base_url=server.url) as c:  # not signed in: a session expired meanwhile
        r = c.post("/ui/jobs/0123456789abcdef/apply", data={"csrf": "x"}, headers=browser)
        assert r.status_code == 401 and r.headers["content-type"].startswith("text/html"), r.text[:300]
        assert "sign in" in r.text
        r = c.post("/ui/jobs/0123456789abcdef/apply", data={"csrf": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
