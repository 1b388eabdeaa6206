"""The service under a path prefix behind a reverse proxy that strips it (CERVIXQC_ROOT_PATH):
a real uvicorn process behind tests.prefix_proxy, a browser's cookie jar, every link followed.
Without the setting, nginx under `location /cervixqc/` got pages whose links, forms, scripts,
redirects and cookies all pointed at /ui outside it: no one could sign in."""

from __future__ import annotations

import re
import time
from urllib.parse import urljoin

import httpx
import pytest

from tests.browser import browser  # noqa: F401  (pytest fixture)
from tests.prefix_proxy import PrefixProxy
from tests.qc_fixtures import fuzz_set, tiny_weights
from tests.service_server import API_KEY, HEADERS, start_server

pytestmark = pytest.mark.timeout(300)
PREFIX = "/cervixqc"
LINK = re.compile(r'(?:href|src|action|data-(?!base)[a-z]+)="(/[^"]*)"')


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "set").mkdir()
    for name in ("ok.jpg", "exif6.jpg"):
        (root / "set" / name).write_bytes(fuzz_set()[name][0])
    srv = start_server(tmp_path_factory.mktemp("srv"), tiny_weights(tmp_path_factory.mktemp("w"), 0.0),
                       data_roots=root, root_path=PREFIX + "/")  # a trailing slash, as people write it
    proxy = PrefixProxy(PREFIX, int(srv.url.rsplit(":", 1)[1]))
    yield proxy
    proxy.close()
    srv.kill()


def _page_links(html: str) -> list[str]:
    return [u.replace("&amp;", "&") for u in LINK.findall(html)]


def test_sign_in_and_every_page_link_work_through_a_proxy_under_a_prefix(proxy):
    origin = proxy.url[:-len(PREFIX)]
    c = httpx.Client(base_url=origin, timeout=60)
    first = c.get(f"{PREFIX}/ui/jobs", headers={"Accept": "text/html"})
    assert first.status_code == 303 and first.headers["location"] == f"{PREFIX}/ui/login?next=%2Fui%2Fjobs"
    login = c.get(first.headers["location"])
    assert 'action="/cervixqc/ui/login"' in login.text and "Path=/cervixqc/ui" in login.headers["set-cookie"]
    token = re.search(r'name="csrf" value="([^"]+)"', login.text).group(1)
    next_url = re.search(r'name="next" value="([^"]*)"', login.text).group(1)
    signed = c.post(f"{PREFIX}/ui/login", data={"api_key": API_KEY, "csrf": token, "next": next_url})
    assert signed.status_code == 303 and signed.headers["location"] == f"{PREFIX}/ui/jobs", signed.headers

    api = httpx.Client(base_url=proxy.url, headers=HEADERS, timeout=60)
    job = api.post("/v1/jobs", json={"source": "set"}).json()
    assert job["results_url"] == f"/v1/jobs/{job['id']}/results"  # from the API's base, as every route
    for _ in range(300):
        if api.get(f"/v1/jobs/{job['id']}").json()["status"] == "done":
            break
        time.sleep(0.2)
    assert api.get(job["results_url"]).status_code == 200

    seen: set[str] = set()
    for page in (f"{PREFIX}/ui/upload", f"{PREFIX}/ui/jobs", f"{PREFIX}/ui/jobs/{job['id']}/review",
                 f"{PREFIX}/ui/jobs/{job['id']}/items/1"):
        r = c.get(page)
        assert r.status_code == 200, (page, r.status_code)
        assert r.headers["x-frame-options"] == "DENY" and "frame-ancestors" in r.headers["content-security-policy"]
        assert 'data-base="/cervixqc"' in r.text
        links = _page_links(r.text)
        assert links and all(u.startswith(PREFIX + "/") for u in links), (page, links)
        seen |= {urljoin(page, u) for u in links if "/logout" not in u and "/delete" not in u
                 and "/retry" not in u and "/cancel" not in u and "/apply" not in u}
    assert any(u.endswith("/thumb.jpg") for u in seen) and any("/app.css?v=" in u for u in seen)
    for url in sorted(seen):
        if url.endswith(("/ui/jobs", "/ui/upload")) and "?" not in url:
            continue  # read above (their forms post there)
        r = c.get(url)
        assert r.status_code == 200, (url, r.status_code, r.text[:200])

    out = c.post(f"{PREFIX}/ui/logout", data={"csrf": re.search(r'data-csrf="([^"]+)"', c.get(f"{PREFIX}/ui/jobs").text)
                                                  .group(1)})
    assert out.status_code == 303 and out.headers["location"] == f"{PREFIX}/ui/login"
    assert c.get(f"{PREFIX}/ui/jobs", headers={"Accept": "text/html"}).status_code == 303  # the cookie went


def test_the_api_docs_and_errors_name_the_prefix(proxy):
    api = httpx.Client(base_url=proxy.url, headers=HEADERS, timeout=60)
    assert api.get("/openapi.json").json()["servers"] == [{"url": PREFIX}]
    moved = api.get("/docs")
    assert moved.status_code == 307 and moved.headers["location"] == f"{PREFIX}/ui/docs"
    wrong = api.put("/v1/jobs")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, POST"
    assert api.get("/readyz").status_code == 200
    # counted by route, as without a prefix (the router's route was recorded on a copy of the
    # request: every request was "unmatched")
    scraped = api.get("/metrics").text
    assert 'route="/v1/jobs",status="405"' in scraped and 'route="/openapi.json"' in scraped


def test_the_pages_scripts_work_under_the_prefix_in_a_browser(browser, proxy):  # noqa: F811
    """The scripts build their requests on the page's prefix (data-base): an upload, a job's
    progress, a decision and its undo, each through the proxy."""
    from playwright.sync_api import expect

    origin = proxy.url[:-len(PREFIX)]
    ctx = browser.new_context(base_url=origin)
    try:
        page = ctx.new_page()
        page.goto(f"{PREFIX}/ui/jobs")
        page.get_by_label("API key").fill(API_KEY)
        page.get_by_role("button", name="Sign in").click()
        expect(page).to_have_url(f"{origin}{PREFIX}/ui/jobs")
        page.get_by_label("Folder or manifest").fill("set")
        page.get_by_role("button", name="Start job").click()
        expect(page.locator("tr[data-job] .status").first).to_have_text("done", timeout=60_000)  # polled by jobs.js
        page.locator("tr[data-job] a").first.click()
        page.locator("#grid .card a").first.click()
        expect(page.locator("html[data-keys=on]")).to_have_count(1)
        page.keyboard.press("4")  # no cervix, never the model's here (every photo gets a box): item.js posts it
        expect(page.locator("#final")).to_have_text("no cervix")
        expect(page.locator("html[data-keys=on]")).to_have_count(1)
        page.keyboard.press("u")
        expect(page.locator("#saved")).to_have_text("Saved: undo")
        page.goto(f"{PREFIX}/ui/upload")
        page.set_input_files("#files", files=[{"name": "ok.jpg", "mimeType": "image/jpeg",
                                               "buffer": fuzz_set()["ok.jpg"][0]}])
        expect(page.locator("#status")).to_contain_text("1 of 1 photo(s) checked", timeout=60_000)  # upload.js
        assert all(p.startswith(PREFIX + "/") for p in proxy.seen)
    finally:
        ctx.close()


def test_a_servers_own_root_path_wins_over_the_setting():
    """uvicorn's --root-path is where the proxy really is: the setting rewriting it sent every
    link and redirect under the other prefix (a mutation survived the suite)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from service.root_path import RootPath

    seen = []

    async def app(scope, receive, send):
        seen.append((scope["root_path"], scope["path"]))

    for given, want in (("/proxy", ("/proxy", "/proxy/ui/jobs")), ("", ("/setting", "/setting/ui/jobs"))):
        scope = {"type": "http", "root_path": given, "path": f"{given}/ui/jobs", "raw_path": b"/ui/jobs"}
        # in a thread of its own: the browser tests' Playwright may hold this thread's event loop
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, RootPath(app, "/setting")(scope, None, None)).result()
        assert seen.pop() == want
