"""service/request_count.py under a real uvicorn: a streamed body that breaks off after its
headers must reach the client as a broken transfer, never as a shorter file that looks whole."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from tests.uvicorn_process import free_port


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("request-count") / "uvicorn.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "tests.broken_stream_app:create_app",
                                 "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                if httpx.get(f"{base}/ok", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_stream_that_breaks_off_after_its_headers_is_a_broken_transfer_not_a_short_whole_file(url):
    """Under `@app.middleware("http")` the body ended with a clean chunked close: a results
    download cut short by its job's delete read 200, curl exit 0, 1,000 of 1,500 lines (an audit)."""
    with httpx.stream("GET", f"{url}/broken", timeout=30) as r:
        assert r.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            for _ in r.iter_bytes():
                pass
    assert 'route="/broken",status="200"' in httpx.get(f"{url}/metrics", timeout=30).text  # counted as sent


def test_a_fault_before_the_headers_is_the_json_500_and_every_answer_is_counted(url):
    r = httpx.get(f"{url}/fails", timeout=30)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    scrape = httpx.get(f"{url}/metrics", timeout=30).text
    assert 'cervixqc_http_requests_total{method="GET",route="/fails",status="500"} 1.0' in scrape
