"""The HTTP service on a real uvicorn process: auth, batching under concurrency, bad input,
path confinement, jobs (and their survival of kill -9), overload, and a schemathesis run."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import signal
import shutil
import subprocess
import sys
import time
from html import unescape
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.clean.inputs import list_inputs
from pipelines.clean.notes import run_notes
from pipelines.clean.run import clean
from pipelines.engine.qc import QCPipeline
from tests.qc_fixtures import cropped_copy, fuzz_set, jpeg_bytes, textured_scene, tiny_weights
from tests.service_server import API_KEY, HEADERS, sign_in, start_server
from tests.uvicorn_process import free_port

LABELS = {"regular", "non_regular", "no_cervix", "unreadable"}
SCRAPE_KEY = "scrape-only-key-0123456789"
pytestmark = pytest.mark.timeout(300)


# dark flags the fuzz set's solid and near-black pictures; the other findings never flag
FINDINGS_AT = {"blur": 1e9, "dark": 0.6, "overexposed": 1e9, "glare": 1e9}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    # detector threshold 0: every readable photo is cropped and reaches stage 2, so the rows a job
    # and the CLI write carry boxes, kinds and crop hashes to compare
    return tiny_weights(tmp_path_factory.mktemp("w"), detector_threshold=0.0, findings=FINDINGS_AT)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for i, (name, (data, _)) in enumerate(fuzz_set().items()):
        sub = root / "collection" / ("clinic_a" if i % 2 else "clinic_b/2019")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / name).write_bytes(data)
    scene = textured_scene(7)
    (root / "collection" / "scene.jpg").write_bytes(jpeg_bytes(scene))
    (root / "collection" / "clinic_a" / "scene_cropped.jpg").write_bytes(jpeg_bytes(cropped_copy(scene), 60))
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, weights, data_root):
    srv = start_server(tmp_path_factory.mktemp("srv"), weights, data_roots=data_root, max_batch_size=16,
                       max_wait_ms=100, max_upload_bytes=4 * 1024 * 1024, max_files_per_request=20,
                       quarantine_findings="dark", metrics_keys=SCRAPE_KEY)
    yield srv
    srv.kill()


def _jpeg(i: int, size=(160, 120)) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_health_is_open_and_everything_else_needs_a_valid_key(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    for path in ("/v1/models", "/metrics", "/v1/jobs", "/openapi.json"):
        for headers in ({}, {"X-API-Key": "wrong-key-0123456789abcdef"}):
            r = httpx.get(server.url + path, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (path, r.text)
    with server.client() as c:
        models = c.get("/v1/models").json()
    assert [m["name"] for m in models["models"]] == ["detector", "deep_sad", "classifier"]
    assert all(len(m["sha256"]) == 64 and m["input_size"] for m in models["models"])
    assert models["runtimes"] == {"detector": "torch", "deep_sad": "torch", "classifier": "torch"}  # nothing exported
    assert models["jpeg_decoder"] == "pil"  # auto, on a CPU
    assert models["findings_thresholds"] == FINDINGS_AT


def test_metrics_take_a_scrape_only_key_as_bearer_and_show_the_process_the_build_and_free_space(server):
    """A central Prometheus held a key that also submits jobs, sent as X-API-Key only; the
    page had no process memory, no models and no disk space, and a labelled counter had no
    series before its first event (a `rate()` alert had nothing to read)."""
    scrape = {"Authorization": f"Bearer {SCRAPE_KEY}"}
    assert httpx.get(f"{server.url}/v1/jobs", headers=scrape).status_code == 401  # the metrics only
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.head(f"{server.url}/healthz").status_code == 200  # uptime monitors that send HEAD got 405
    before = httpx.get(f"{server.url}/metrics", headers=scrape)
    assert before.status_code == 200, before.text
    # a body over the limit (4 MiB here) is refused before it is read, and counted
    too_big = httpx.post(f"{server.url}/v1/qc", headers=HEADERS, files={"files": ("a.jpg", b"0" * (5 << 20))})
    assert too_big.status_code == 413
    text = httpx.get(f"{server.url}/metrics", headers=scrape).text
    assert _metric(text, "process_resident_memory_bytes") > 50e6 and _metric(text, "process_start_time_seconds") > 0
    with server.client() as c:
        shas = {m["name"]: m["sha256"] for m in c.get("/v1/models").json()["models"]}
    build = re.search(r"^cervixqc_build_info\{(.*)\} 1\.0$", text, re.M)
    assert build and f'model_detector="{shas["detector"][:12]}"' in build.group(1), text[:2000]
    assert 'runtime_detector="torch"' in build.group(1) and 'device="cpu"' in build.group(1)
    for folder in ("state", "results", "quarantine"):
        assert _metric(text, "cervixqc_disk_free_bytes", f'{{folder="{folder}"}}') > 0
    assert re.search(r'^cervixqc_rejected_requests_total\{reason="overload"\} 0\.0$', text, re.M)
    assert re.search(r'^cervixqc_engine_errors_total\{origin="upload"\} 0\.0$', text, re.M)
    counted = 'cervixqc_rejected_requests_total', '{reason="body_too_large"}'
    assert _metric(text, *counted) == _metric(before.text, *counted) + 1
    # under its route, though refused before routing by its Content-Length ("unmatched" before)
    assert _metric(text, "cervixqc_http_requests_total", '{method="POST",route="/v1/qc",status="413"}') >= 1

    def chunks():  # no Content-Length: stopped at the first byte past the limit, and counted too (it was not)
        yield b"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n\r\n"
        for _ in range(5):
            yield b"0" * (1 << 20)
    try:
        streamed = httpx.post(f"{server.url}/v1/qc", content=chunks(),
                              headers={**HEADERS, "Content-Type": "multipart/form-data; boundary=x"})
        assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "payload_too_large", streamed.text
    except httpx.TransportError:  # the answer came while the client still sent: the socket closed under it
        pass
    assert 'reason="upload_timeout"} 0.0' in text  # a series before its first event, as the others
    assert 'reason="no_space"} 0.0' in text  # counted by the 503 of a full temporary folder, and declared
    text = httpx.get(f"{server.url}/metrics", headers=scrape).text
    assert _metric(text, *counted) == _metric(before.text, *counted) + 2
    assert "_created" not in text
    # a mounted folder's files under the mount, apart from unknown paths (all were "unmatched")
    assert httpx.get(f"{server.url}/ui/static/common.js").status_code == 200
    assert httpx.get(f"{server.url}/no/such/page").status_code == 404
    text = httpx.get(f"{server.url}/metrics", headers=scrape).text
    assert _metric(text, "cervixqc_http_requests_total", '{method="GET",route="/ui/static/{path}",status="200"}') >= 1
    assert _metric(text, "cervixqc_http_requests_total", '{method="GET",route="unmatched",status="404"}') >= 1


def test_a_large_body_to_a_route_that_takes_no_photos_is_refused_before_it_is_read_key_or_not(server):
    """FastAPI parses a route's JSON body before the key check runs: a 60 MB body sent without a
    key took 1.6 GB of the service's memory and held the event loop 2 s, then got its 401 (an
    audit). Bodies other than photo uploads stop at 64 KiB now; an upload of 1 MiB still goes."""
    body = b'{"source": "' + b"a" * (1 << 20) + b'"}'
    for headers in ({"Content-Type": "application/json"}, {**HEADERS, "Content-Type": "application/json"}):
        r = httpx.post(f"{server.url}/v1/jobs", content=body, headers=headers)
        assert r.status_code == 413 and "over 65536 bytes (64 KiB)" in r.json()["error"]["message"], r.text

    def chunks():  # no Content-Length: stopped at the first byte past 64 KiB
        yield b'{"source": "'
        for _ in range(16):
            yield b"a" * (1 << 16)
    try:
        r = httpx.post(f"{server.url}/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
    except httpx.TransportError:  # the answer came while the client still sent
        pass
    form = httpx.post(f"{server.url}/ui/login", data={"api_key": "x" * (1 << 20), "csrf": "t", "next": ""})
    assert form.status_code == 413, form.text
    with server.client() as c:
        photo = c.post("/v1/qc", files={"files": ("big.jpg", _jpeg(1, (32, 32)) + b"\0" * (1 << 20), "image/jpeg")})
        assert photo.status_code == 200, photo.text
        assert c.post("/v1/jobs", json={"source": "x" * 200}).status_code in (400, 404)  # small: read and answered


def test_a_json_job_request_over_the_size_limit_or_not_in_utf8_is_answered_as_such(server):
    """FastAPI reads a JSON body itself: one over the limit was a 400 "error parsing the body"
    while the metrics counted a 413, and so was one in Latin-1 (an audit)."""

    def json_chunks():
        yield b'{"source": "'
        for _ in range(5):
            yield b"a" * (1 << 20)
    as_json = {**HEADERS, "Content-Type": "application/json"}
    try:
        streamed = httpx.post(f"{server.url}/v1/jobs", content=json_chunks(), headers=as_json)
        assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "payload_too_large", streamed.text
    except httpx.TransportError:  # the answer came while the client still sent
        pass
    latin1 = httpx.post(f"{server.url}/v1/jobs", content='{"source": "Peña"}'.encode("latin-1"), headers=as_json)
    assert latin1.status_code == 400 and "not UTF-8" in latin1.json()["error"]["message"], latin1.text


def _healthcheck(server, **env: str) -> subprocess.CompletedProcess:
    port = httpx.URL(server.url).port
    return subprocess.run([sys.executable, "-m", "service.healthcheck"],
                          env={**os.environ, "CERVIXQC_PORT": str(port), **env},
                          capture_output=True, text=True, timeout=30)


def test_readiness_fails_while_the_job_store_cannot_take_a_write(server):
    """A writer holding jobs.sqlite's lock (or the file gone) made every job write fail while
    /readyz answered 200: readiness now writes nothing but takes the lock it would need."""
    import sqlite3

    db = sqlite3.connect(Path(server.env["CERVIXQC_STATE_DIR"]) / "jobs.sqlite", isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        r = httpx.get(f"{server.url}/readyz", timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
        assert "locked" in r.json()["error"]["message"]
        # the container's healthcheck says why (Docker's health log showed "HTTP Error 503")
        health = _healthcheck(server)
        assert health.returncode == 1 and "HTTP 503" in health.stderr and "store_unavailable" in health.stderr
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert _healthcheck(server).returncode == 0
    # a proxy set for the container (Docker copies the host's) is not asked for 127.0.0.1: it was,
    # and the container stayed unhealthy
    dead = f"http://127.0.0.1:{free_port()}"
    proxied = _healthcheck(server, http_proxy=dead, HTTP_PROXY=dead, no_proxy="127.0.0.0/8")
    assert proxied.returncode == 0, proxied.stderr
    # the reason is in the service's log, once per change (Docker's healthcheck shows only "503")
    log = server.log.read_text(errors="replace")
    assert "not ready: store_unavailable (the job store cannot take a write (database is locked))" in log
    assert "ready again (was store_unavailable)" in log
    assert re.search(r"ready in .* models detector [0-9a-f]{12}", log), log[-2000:]  # which models this start loaded


def test_an_upload_a_full_temporary_folder_cannot_hold_gets_503_and_the_next_one_goes_through(tmp_path, weights,
                                                                                              monkeypatch):
    """A photo over 1 MB is spooled to TMPDIR: on a full one every such upload was a bare 500
    "internal error" (an audit). Now a 503 that says so, and the service stays up."""
    from tests.small_disk import fill, small_tmpfs

    with small_tmpfs(tmp_path / "tmp", "4m") as tmp:
        monkeypatch.setenv("TMPDIR", str(tmp))
        srv = start_server(tmp_path / "srv", weights)
        try:
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 800, 3), dtype=np.uint8)).save(buf, "PNG")
            assert buf.tell() > 1024 * 1024  # spooled to disk, not kept in memory
            fill(tmp, leave=100 * 1024)
            with srv.client() as c:
                r = c.post("/v1/qc", files=[("files", ("big.png", buf.getvalue(), "image/png"))])
                assert r.status_code == 503 and r.json()["error"]["code"] == "no_space", r.text
                assert "temporary folder cannot hold this upload" in r.json()["error"]["message"]
                assert r.headers["Retry-After"] == "30"
                assert c.get("/readyz").status_code == 200
                (tmp / "filler").unlink()
                r = c.post("/v1/qc", files=[("files", ("big.png", buf.getvalue(), "image/png"))])
                assert r.status_code == 200 and len(r.json()["results"]) == 1, r.text
            assert "internal error" not in srv.log_tail() and "big.png" not in srv.log_tail()
        finally:
            srv.kill()


def test_an_upload_that_stalls_mid_body_gets_408_and_a_slow_steady_one_is_labelled(tmp_path, weights):
    """The timeout started once the body had arrived: a client that stopped sending held its
    spooled part of the temporary folder for ever, unanswered (an audit). The limit is on a
    pause, as nginx's client_body_timeout: a slow link that keeps sending is never cut."""
    import socket

    srv = start_server(tmp_path / "srv", weights, upload_idle_timeout_s=2)
    host, port = srv.url.removeprefix("http://").split(":")

    def post(body: bytes, pieces: int, pause_s: float, declared: int | None = None) -> tuple[bytes, float]:
        """`body` sent in `pieces` with `pause_s` between them, over a raw socket; the answer."""
        head = (f"POST /v1/qc HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\nConnection: close\r\n"
                f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {declared or len(body)}\r\n\r\n")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(head.encode())
            t0, step = time.monotonic(), -(-len(body) // pieces)
            for k in range(pieces):
                sock.sendall(body[k * step:(k + 1) * step])
                time.sleep(pause_s)
            answer = b""
            while chunk := sock.recv(65536):  # to the end: the service closes the connection after it
                answer += chunk
        return answer, time.monotonic() - t0

    try:
        part = (b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n"
                b"Content-Type: image/jpeg\r\n\r\n")
        photo = _jpeg(3, (640, 480))
        # 3 s in all, each pause under the 2 s limit
        answer, _ = post(part + photo + b"\r\n--b--\r\n", pieces=6, pause_s=0.5)
        assert answer.startswith(b"HTTP/1.1 200") and b'"label"' in answer, answer[:300]
        answer, took = post(part + b"\xff" * 200_000, pieces=1, pause_s=0, declared=3_500_000)  # then nothing
        assert answer.startswith(b"HTTP/1.1 408") and b'"upload_timeout"' in answer, answer[:300]
        assert 1.5 < took < 15
        with srv.client() as c:
            assert c.post("/v1/qc", files=[("files", ("ok.jpg", _jpeg(1), "image/jpeg"))]).status_code == 200
            metrics = c.get("/metrics").text
        assert _metric(metrics, "cervixqc_rejected_requests_total", '{reason="upload_timeout"}') == 1
    finally:
        srv.kill()


def test_64_concurrent_uploads_each_get_their_own_result_and_share_batches(server):
    images = {f"img{i:02d}.jpg": _jpeg(i) for i in range(64)}

    async def upload(client: httpx.AsyncClient, name: str, data: bytes) -> httpx.Response:
        return await client.post("/v1/qc", files={"files": (name, data, "image/jpeg")})

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=HEADERS, timeout=120) as client:
            return await asyncio.gather(*(upload(client, n, d) for n, d in images.items()))

    responses = asyncio.run(run())
    for (name, data), r in zip(images.items(), responses):
        assert r.status_code == 200, r.text
        (result,) = r.json()["results"]
        assert result["filename"] == name and result["sha256"] == hashlib.sha256(data).hexdigest()
        assert result["label"] in LABELS and result["width"] == 160 and result["height"] == 120
        assert set(result["findings"]) == set(FINDINGS_AT) and len(result["phash"]) == 16
        assert result["findings"]["dark"]["threshold"] == FINDINGS_AT["dark"]
    with server.client() as c:
        text = c.get("/metrics").text
    batches = _metric(text, "cervixqc_batch_size_count")
    singles = _metric(text, "cervixqc_batch_size_bucket", '{le="1.0"}')
    assert batches > 0 and singles < batches, "no upload batch held more than one image"
    assert _metric(text, "cervixqc_batch_size_sum") >= 64


def test_the_load_benchmarks_clients_are_each_answered_and_its_engine_clock_counts_their_batches(server):
    from tests.benchmarks import raw_http
    from tests.benchmarks.service_load import _clients, engine_seconds

    images = [(f"load{i}.jpg", _jpeg(100 + i)) for i in range(6)]
    before = engine_seconds(server.url, API_KEY)
    for kind in ("raw", "httpx"):  # 3 clients for 6 images: each connection carries two uploads
        level = asyncio.run(_clients(server.url, API_KEY, images, 3, kind))
        assert level["statuses"] == {200: 6} and level["images"] == 6, kind
    assert engine_seconds(server.url, API_KEY) > before

    async def refused() -> int:
        conn = await raw_http.Connection.open(server.url)
        try:
            return await conn.send(raw_http.upload_requests(server.url, "not-a-key", images[:1])[0])
        finally:
            await conn.close()

    assert asyncio.run(refused()) == 401


def test_the_fuzz_set_over_http_gives_each_file_its_reason_and_never_a_500(server):
    cases = fuzz_set()
    with server.client() as c:
        for name, (data, expected) in cases.items():
            r = c.post("/v1/qc", files={"files": (name, data, "application/octet-stream")})
            if expected is None:
                assert r.status_code == 200, (name, r.text)
                assert r.json()["results"][0]["label"] in LABELS - {"unreadable"}, name
            else:
                assert r.status_code == 422, (name, r.text)
                body = r.json()["error"]
                assert body["code"] == "unreadable" and expected in body["results"][0]["error"], (name, body)
        together = c.post("/v1/qc", files=[("files", (n, d, "image/jpeg")) for n, (d, _) in cases.items()])
    assert together.status_code == 200, together.text
    results = together.json()["results"]
    assert [r["filename"] for r in results] == list(cases)
    for r, (_, expected) in zip(results, cases.values()):
        assert (r["label"] == "unreadable") == (expected is not None)
        if expected:
            assert expected in r["error"]


def _chunked_multipart(size: int):
    yield b'--b0undary\r\nContent-Disposition: form-data; name="files"; filename="big.jpg"\r\n\r\n'
    for _ in range(size // 65536 + 1):
        yield b"\xff" * 65536
    yield b"\r\n--b0undary--\r\n"


def _part(name: bytes, data: bytes) -> bytes:
    return (b'--b0\r\nContent-Disposition: form-data; name="files"; filename="' + name
            + b'"\r\nContent-Type: image/jpeg\r\n\r\n' + data + b"\r\n")


def test_an_upload_cut_short_before_its_closing_boundary_is_refused_not_labelled_in_part(server):
    """Two files without the closing line got 200 and one result; one file cut short got "no
    file in the request" (an audit): the parser beneath Starlette ends quietly."""
    whole = _part(b"one.jpg", _jpeg(0)) + _part(b"two.jpg", _jpeg(1))
    headers = {"Content-Type": "multipart/form-data; boundary=b0"}
    with server.client() as c:
        # the closing line split across two chunks still counts
        ok = c.post("/v1/qc", content=iter([whole + b"--b", b"0--\r\n"]), headers=headers)
        assert ok.status_code == 200 and [r["filename"] for r in ok.json()["results"]] == ["one.jpg", "two.jpg"]
        for body in (whole, whole[:-300], _part(b"one.jpg", _jpeg(0))[:-300]):
            r = c.post("/v1/qc", content=body, headers=headers)
            error = r.json()["error"]
            assert (r.status_code, error["code"]) == (400, "invalid_multipart") and "cut short" in error["message"]


def test_malformed_requests_get_a_json_4xx(server):
    with server.client() as c:
        checks = [
            (c.post("/v1/qc", content=b"", headers={"Content-Type": "multipart/form-data; boundary=x"}), 400),
            (c.post("/v1/qc", json={"files": []}), 415),
            (c.post("/v1/qc", content=b"--x\r\nnot multipart at all", headers={"Content-Type": "multipart/form-data"}),
             400),
            (c.post("/v1/qc", files={"files": ("big.jpg", b"\xff" * (5 * 1024 * 1024), "image/jpeg")}), 413),
            (c.post("/v1/qc", content=_chunked_multipart(5 * 1024 * 1024),  # no Content-Length: cut off mid-stream
                    headers={"Content-Type": "multipart/form-data; boundary=b0undary"}), 413),
            (c.post("/v1/qc", files=[("files", (f"f{i}.jpg", _jpeg(i), "image/jpeg")) for i in range(21)]), 413),
            # the parser's reason, not Starlette's bare "Invalid multipart data."
            (c.post("/v1/qc", files={"files": ("a" * 5000 + ".jpg", _jpeg(0), "image/jpeg")}), 400),
            (c.post("/v1/qc", data={"note": "no file"}, files={}), 415),
            (c.get("/v1/jobs/doesnotexist"), 404),
            (c.post("/v1/jobs", json={"nosource": 1}), 422),
            (c.get("/v1/nothing"), 404),
        ]
    for r, status in checks:
        assert r.status_code == status, (status, r.status_code, r.text)
        assert set(r.json()["error"]) >= {"code", "message"}
    assert "CERVIXQC_MAX_FILES_PER_REQUEST" in checks[5][0].json()["error"]["message"]
    with server.client() as c:  # a 100,000-character id came back whole in the 404 (an audit)
        r = c.get("/v1/jobs/" + "x" * 5000)
    assert r.status_code == 404 and len(r.json()["error"]["message"]) < 120, r.text[:300]
    assert "Maximum header size exceeded" in checks[6][0].json()["error"]["message"]


def test_a_job_request_that_is_not_json_is_told_so(server):
    """Broken JSON read "body.17: JSON decode error" (a character offset where a field goes), and
    a form body a 422 about "a valid dictionary"."""
    with server.client() as c:
        broken = c.post("/v1/jobs", content=b'{"source":"set1",}', headers={"Content-Type": "application/json"})
        form = c.post("/v1/jobs", data={"source": "set1"})
    assert broken.status_code == 422, broken.text
    assert re.fullmatch(r"the body is not valid JSON \(.+ at character 17\)", broken.json()["error"]["message"])
    assert (form.status_code, form.json()["error"]["code"]) == (415, "unsupported_media_type"), form.text
    assert "Content-Type: application/json" in form.json()["error"]["message"]


def test_job_paths_that_leave_the_data_roots_are_refused(server, data_root, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "x.jpg").write_bytes(_jpeg(0))
    link = data_root / "escape"
    if not link.exists():
        link.symlink_to(outside, target_is_directory=True)
    (data_root / os.fsdecode(b"x\xff")).mkdir(exist_ok=True)
    (data_root / os.fsdecode(b"x\xff") / "x.jpg").write_bytes(_jpeg(0))
    with server.client() as c:
        for body, status, code in [
            ({"source": "collection/../../etc"}, 400, "invalid_path"),
            ({"source": "/etc"}, 403, "path_forbidden"),
            ({"source": str(outside)}, 403, "path_forbidden"),
            ({"source": "escape"}, 403, "path_forbidden"),
            ({"source": "missing-folder"}, 404, "path_not_found"),
            ({"source": "collection", "quarantine": "../q"}, 400, "invalid_path"),
            ({"source": "collection", "quarantine": "/tmp/q"}, 400, "invalid_path"),
            ({"source": "collection", "quarantine": "."}, 400, "invalid_path"),  # the quarantine root itself
            # taken (202) and made a folder "q\nx", or failed the job on its first copy (an audit)
            ({"source": "collection", "quarantine": "q\nx"}, 400, "invalid_path"),
            ({"source": "collection", "quarantine": "q/ "}, 400, "invalid_path"),
            ({"source": "collection", "quarantine": "q" * 256}, 400, "invalid_path"),
            ({"source": "collection", "quarantine": "q\udcff"}, 400, "invalid_path"),  # a 500 in SQLite (an audit)
            ({"source": "collection", "quarantine": "q\\x"}, 400, "invalid_path"),  # nested folders on SMB
            # a source naming a folder whose name is not UTF-8 (made above): refused as JSON text
            ({"source": "x\udcff"}, 422, "invalid_request"),
            ({"source": "collection\tx"}, 400, "invalid_path"),
            # a misspelt field queued a job without its quarantine (an audit)
            ({"source": "collection", "quarantin": "q"}, 422, "invalid_request"),
        ]:  # json.dumps: escaped as a client's JSON library sends it (httpx's json= cannot send a surrogate)
            r = c.post("/v1/jobs", content=json.dumps(body), headers={"content-type": "application/json"})
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), (body, r.text)


def test_a_source_naming_a_folder_that_is_not_utf8_is_refused_by_the_path_check_itself(tmp_path):
    """The JSON route refuses a lone surrogate before (422, above); the path check refuses it
    too, for any other caller: passed, it named a folder that exists and failed in SQLite's
    encoder, a 500 (a mutation of the check passed every test)."""
    from service.errors import ApiError
    from service.paths import confine

    (tmp_path / os.fsdecode(b"x\xff")).mkdir()
    with pytest.raises(ApiError) as refused:
        confine("x\udcff", [tmp_path])
    assert (refused.value.status, refused.value.code) == (400, "invalid_path")


def test_a_job_asking_for_a_policy_the_weights_cannot_run_is_refused_before_it_is_queued(server):
    with server.client() as c:
        before = len(c.get("/v1/jobs").json()["jobs"])
        r = c.post("/v1/jobs", json={"source": "collection", "policy": "two_of_three"})  # no colour.json here
        assert (r.status_code, r.json()["error"]["code"]) == (422, "policy_unavailable"), r.text
        assert "colour" in r.json()["error"]["message"] and len(c.get("/v1/jobs").json()["jobs"]) == before


def test_a_quarantine_folder_holds_one_sources_copies(server):
    """Two sources' photos at the same relative path would meet in one folder, and the second
    copy was silently skipped: another source's job may not use an overlapping name."""
    with server.client() as c:
        first = c.post("/v1/jobs", json={"source": "collection/clinic_a", "quarantine": "shared"})
        assert first.status_code == 202, first.text
        for name in ("shared", "shared/inner"):
            r = c.post("/v1/jobs", json={"source": "collection/clinic_b", "quarantine": name})
            assert (r.status_code, r.json()["error"]["code"]) == (409, "quarantine_in_use"), (name, r.text)
        c.post(f"/v1/jobs/{first.json()['id']}/cancel")  # while it is active, the same job again is job_exists
        again = c.post("/v1/jobs", json={"source": "collection/clinic_a", "quarantine": "shared"})  # a rerun
        assert again.status_code == 202, again.text
        c.post(f"/v1/jobs/{again.json()['id']}/cancel")
        inner = c.post("/v1/jobs", json={"source": "collection/clinic_a", "quarantine": "outer/inner"})
        around = c.post("/v1/jobs", json={"source": "collection/clinic_b", "quarantine": "outer"})  # encloses it
        assert (around.status_code, around.json()["error"]["code"]) == (409, "quarantine_in_use"), around.text
        c.post(f"/v1/jobs/{inner.json()['id']}/cancel")
        bare = c.post("/v1/jobs", json={"source": "collection/clinic_a"}).json()["id"]  # Apply fills job-<id>
        c.post(f"/v1/jobs/{bare}/cancel")
        taken = c.post("/v1/jobs", json={"source": "collection/clinic_b", "quarantine": f"job-{bare}"})
        assert (taken.status_code, taken.json()["error"]["code"]) == (409, "quarantine_in_use"), taken.text


def test_the_same_job_sent_twice_while_the_first_runs_is_refused_naming_it(server, data_root):
    """A client resending its request after a timeout queued the same hours of work again."""
    from concurrent.futures import ThreadPoolExecutor

    body = {"source": "collection", "quarantine": "twice"}
    with server.client() as c, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: c.post("/v1/jobs", json=body), range(4)))  # at once, as retries come
        made = [r.json()["id"] for r in answers if r.status_code == 202]
        refused = [r.json()["error"] for r in answers if r.status_code == 409]
        assert len(made) == 1 and len(refused) == 3, [r.text for r in answers]
        assert {e["code"] for e in refused} == {"job_exists"} and {e["job_id"] for e in refused} == set(made)
        other = c.post("/v1/jobs", json={**body, "quarantine": "twice-b"})  # other work: taken
        assert other.status_code == 202, other.text
        for job in (made[0], other.json()["id"]):
            _wait_job(c, job, lambda j: j["status"] in ("done", "failed"))
        assert c.post("/v1/jobs", json=body).status_code == 202  # the first one finished: taken again


def test_jobs_past_the_active_limit_are_refused_and_a_resent_one_still_names_its_twin(tmp_path):
    """A client's loop queued 300 jobs in 2 s (an audit), and every later job waited behind
    them. Each job here has 150 photos: seconds of work, against milliseconds between requests."""
    src = tmp_path / "data" / "site"
    src.mkdir(parents=True)
    for i in range(150):
        (src / f"{i:03d}.jpg").write_bytes(_jpeg(i, (64, 48)))
    srv = start_server(tmp_path / "srv", tiny_weights(tmp_path / "w", detector_threshold=0.0),
                       data_roots=tmp_path / "data", max_active_jobs=1)
    try:
        with srv.client() as c:
            first = c.post("/v1/jobs", json={"source": "site"})
            assert first.status_code == 202, first.text
            over = c.post("/v1/jobs", json={"source": "site", "quarantine": "q"})
            assert (over.status_code, over.json()["error"]["code"]) == (429, "too_many_jobs"), over.text
            assert "CERVIXQC_MAX_ACTIVE_JOBS" in over.json()["error"]["message"]
            twin = c.post("/v1/jobs", json={"source": "site"})  # a resent request: still told its job's id
            assert (twin.status_code, twin.json()["error"]["job_id"]) == (409, first.json()["id"]), twin.text
            assert c.post(f"/v1/jobs/{first.json()['id']}/cancel").status_code == 200  # a cancelled job frees its place
            second = c.post("/v1/jobs", json={"source": "site", "quarantine": "q"})
            assert second.status_code == 202, second.text
            retried = c.post(f"/v1/jobs/{first.json()['id']}/retry")
            assert (retried.status_code, retried.json()["error"]["code"]) == (429, "too_many_jobs"), retried.text
            assert c.get(f"/v1/jobs/{first.json()['id']}").json()["status"] == "cancelled"
            assert c.post(f"/v1/jobs/{second.json()['id']}/cancel").status_code == 200
            assert c.post(f"/v1/jobs/{first.json()['id']}/retry").status_code == 202
            assert len(c.get("/v1/jobs").json()["jobs"]) == 2
    finally:
        srv.kill()


def test_the_jobs_page_links_to_jobs_older_than_those_it_shows(server):
    """It listed the newest 50 and nothing more: the 51st job, and the review decisions in it,
    were reached by typing its address alone (an audit)."""
    with server.client() as c:
        made = [c.post("/v1/jobs", json={"source": "collection", "quarantine": f"older-{i}"}).json()["id"]
                for i in range(2)]
        for job in made:
            c.post(f"/v1/jobs/{job}/cancel")
    with httpx.Client(base_url=server.url) as browser:
        sign_in(browser)
        newest = browser.get("/ui/jobs", params={"limit": 1}).text
        assert re.findall(r'<tr data-job="(\w+)"', newest) == [made[1]]
        assert '<a href="/ui/jobs?limit=4">Older jobs (show the newest 4)</a>' in newest
        # when each was made, in UTC as the exports write it: runs over one folder had only their ids
        assert re.search(r'<td><time datetime="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00">\d{4}-\d\d-\d\d '
                         r'\d\d:\d\d UTC</time></td>', newest), newest
        shown = re.findall(r'<tr data-job="(\w+)"', browser.get("/ui/jobs", params={"limit": 4}).text)
        assert shown[:2] == made[::-1]
        assert browser.get("/ui/jobs", params={"limit": 0}).status_code == 422


def test_a_cancelled_job_retried_resumes_to_one_row_per_file(server, data_root):
    with server.client() as c:
        job = c.post("/v1/jobs", json={"source": "collection"}).json()["id"]
        assert c.post(f"/v1/jobs/{job}/cancel").status_code == 200  # a job of seconds, cancelled in milliseconds
        retried = c.post(f"/v1/jobs/{job}/retry")
        assert retried.status_code == 202 and retried.json()["status"] == "queued", retried.text
        done = _wait_job(c, job, lambda j: j["status"] in ("done", "failed"))
        assert done["status"] == "done" and done["processed"] == done["total"] == len(list_inputs(data_root / "collection"))
        rows = c.get(f"/v1/jobs/{job}/results", params={"format": "jsonl"}).text.splitlines()
        assert len(rows) == done["total"] and len({json.loads(r)["path"] for r in rows}) == len(rows)
        again = c.post(f"/v1/jobs/{job}/retry")
        assert (again.status_code, again.json()["error"]["code"]) == (409, "job_not_retryable")


def test_a_retried_job_whose_folder_became_a_link_out_of_the_roots_fails_without_listing_it(server, data_root,
                                                                                        tmp_path):
    """Its retry listed the outside folder's file names as result rows, though it read no file (an audit)."""
    (data_root / "swap").mkdir()
    (data_root / "swap" / "a.jpg").write_bytes(_jpeg(50))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret-name.jpg").write_bytes(_jpeg(51))
    with server.client() as c:
        job = c.post("/v1/jobs", json={"source": "swap"}).json()["id"]
        assert c.post(f"/v1/jobs/{job}/cancel").status_code == 200
        _wait_job(c, job, lambda j: j["status"] == "cancelled")
        shutil.rmtree(data_root / "swap")
        (data_root / "swap").symlink_to(outside, target_is_directory=True)
        assert c.post(f"/v1/jobs/{job}/retry").status_code == 202
        failed = _wait_job(c, job, lambda j: j["status"] in ("done", "failed"))
        assert failed["status"] == "failed" and "outside the allowed data roots" in failed["error"], failed
        rows = c.get(f"/v1/jobs/{job}/results", params={"format": "jsonl"}).text
        assert "secret-name" not in rows


def test_a_job_begun_by_other_models_is_offered_no_retry_that_would_fail_it_again(server, data_root):
    """A job failed as begun by other weights (an upgrade, a retrain) read `retryable: true`,
    and its Retry queued it only to fail it again the same way (an audit)."""
    import sqlite3

    (data_root / "begun").mkdir()
    for i in range(2):
        (data_root / "begun" / f"b{i}.jpg").write_bytes(_jpeg(40 + i))
    db = sqlite3.connect(Path(server.env["CERVIXQC_STATE_DIR"]) / "jobs.sqlite", isolation_level=None)
    with server.client() as c:
        job = c.post("/v1/jobs", json={"source": "begun"}).json()["id"]
        assert _wait_job(c, job, lambda j: j["status"] in ("done", "failed"))["status"] == "done"
        db.execute("UPDATE jobs SET status = 'failed' WHERE id = ?", (job,))  # failed under these weights
        assert c.get(f"/v1/jobs/{job}").json()["retryable"] is True
        models = json.loads(db.execute("SELECT models FROM jobs WHERE id = ?", (job,)).fetchone()[0])
        models["models"]["detector"] = "0" * 64  # its rows labelled by another detector
        db.execute("UPDATE jobs SET models = ? WHERE id = ?", (json.dumps(models, sort_keys=True), job))
        assert c.get(f"/v1/jobs/{job}").json()["retryable"] is False
        r = c.post(f"/v1/jobs/{job}/retry")
        assert (r.status_code, r.json()["error"]["code"]) == (409, "job_not_retryable"), r.text
        assert "begun by other models" in r.json()["error"]["message"] and "as a new job" in r.json()["error"]["message"]
        assert c.get(f"/v1/jobs/{job}").json()["status"] == "failed"
        db.execute("UPDATE jobs SET models = NULL WHERE id = ?", (job,))  # rows of a version that recorded none
        assert c.get(f"/v1/jobs/{job}").json()["retryable"] is False
        assert "did not record its models" in c.post(f"/v1/jobs/{job}/retry").json()["error"]["message"]
        assert c.delete(f"/v1/jobs/{job}").status_code == 204
    db.close()


def test_a_deleted_job_leaves_its_quarantine_copies_and_claim_and_nothing_else(server, data_root):
    """A site running for years had no way to let a finished job go: its rows, results folder
    and thumbnails stayed for good."""
    import sqlite3

    state_dir = Path(server.env["CERVIXQC_STATE_DIR"])
    with server.client() as c:
        running = c.post("/v1/jobs", json={"source": "collection"}).json()["id"]
        refused = c.delete(f"/v1/jobs/{running}")  # a job of seconds, asked in milliseconds
        assert (refused.status_code, refused.json()["error"]["code"]) == (409, "job_active"), refused.text
        job = c.post("/v1/jobs", json={"source": "collection", "quarantine": "kept"}).json()["id"]
        done = _wait_job(c, job, lambda j: j["status"] in ("done", "failed"))
        assert done["status"] == "done" and _wait_job(c, running, lambda j: j["status"] == "done")
        copies = sorted(p for p in (state_dir / "quarantine" / "kept").rglob("*") if p.is_file())
        (state_dir / "thumbs" / job).mkdir(parents=True)  # as the review pages leave them
        (state_dir / "thumbs" / job / "1-grid.jpg").write_bytes(b"thumbnail")
        assert copies and (state_dir / "jobs" / job / "results.csv").is_file()
        r = c.delete(f"/v1/jobs/{job}")
        assert r.status_code == 204, r.text
        assert c.get(f"/v1/jobs/{job}").status_code == 404
        assert c.get(f"/v1/jobs/{job}/results").status_code == 404
        assert c.delete(f"/v1/jobs/{job}").status_code == 404
        assert job not in {j["id"] for j in c.get("/v1/jobs").json()["jobs"]}
        assert c.get(f"/v1/jobs/{running}").json()["status"] == "done"  # the other job untouched
        (data_root / "elsewhere").mkdir()
        (data_root / "elsewhere" / "a.jpg").write_bytes(_jpeg(9))
        taken = c.post("/v1/jobs", json={"source": "elsewhere", "quarantine": "kept"})
        assert (taken.status_code, taken.json()["error"]["code"]) == (409, "quarantine_in_use"), taken.text
    assert not (state_dir / "jobs" / job).exists() and not (state_dir / "thumbs" / job).exists()
    assert sorted(p for p in (state_dir / "quarantine" / "kept").rglob("*") if p.is_file()) == copies
    db = sqlite3.connect(state_dir / "jobs.sqlite")
    try:
        assert db.execute("SELECT count(*) FROM items WHERE job_id = ?", (job,)).fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM label_counts WHERE job_id = ?", (job,)).fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM items WHERE job_id = ?", (running,)).fetchone()[0] > 0
    finally:
        db.close()


def test_a_job_over_names_that_are_not_utf8_stores_and_serves_their_rows(server, data_root):
    """Latin-1 names from an old archive: rows under `\\xNN`-escaped paths, read from the real files."""
    folder = os.fsencode(data_root / "latin1")
    os.mkdir(folder)
    photo = _jpeg(5)
    with open(folder + b"/Pe\xf1a.jpg", "wb") as f:
        f.write(photo)
    with open(folder + b"/broken\xe9.jpg", "wb") as f:
        f.write(b"not a photo")
    with server.client() as c:
        job = c.post("/v1/jobs", json={"source": "latin1"}).json()["id"]
        done = _wait_job(c, job, lambda j: j["status"] in ("done", "failed"))
        assert (done["status"], done["processed"]) == ("done", 2), done
        rows = {r["path"]: r for r in map(json.loads, c.get(f"/v1/jobs/{job}/results",
                                                              params={"format": "jsonl"}).text.splitlines())}
    assert rows["Pe\\xf1a.jpg"]["sha256"] == hashlib.sha256(photo).hexdigest()
    assert rows["Pe\\xf1a.jpg"]["label"] != "unreadable"
    assert rows["broken\\xe9.jpg"]["label"] == "unreadable"


def test_a_manifest_job_with_a_blank_path_is_refused_before_it_is_queued(server, data_root):
    (data_root / "blank.csv").write_text("path,kind\ncollection/scene.jpg,regular\n,green\n")
    (data_root / "no_path.csv").write_text("file\ncollection/scene.jpg\n")
    with server.client() as c:
        before = len(c.get("/v1/jobs").json()["jobs"])
        (data_root / "torn.csv").write_text("path\ncollection/scene.jpg\na,b\n")
        # not one listed file there (a manifest moved away from its photos): a job of "No such file" rows
        (data_root / "moved.csv").write_text("path\nmoved_away/a.jpg\nmoved_away/b.jpg\n")
        for name, message in (("blank.csv", "empty path on row 3"), ("no_path.csv", "no 'path' column"),
                              ("torn.csv", "Expected 1 fields in line 3, saw 2"),
                              ("moved.csv", "not one of its 2 listed files is there")):
            r = c.post("/v1/jobs", json={"source": name})
            assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_manifest"), r.text
            assert message in r.json()["error"]["message"]
        # two rows one quarantine name would hold: the second flagged photo was never copied (an audit)
        scene = data_root / "collection" / "scene.jpg"
        (data_root / "twice.csv").write_text(f"path\n{scene}\n{str(scene).lstrip('/')}\n")
        r = c.post("/v1/jobs", json={"source": "twice.csv", "quarantine": "twice"})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_manifest"), r.text
        assert "would have one name in the quarantine" in r.json()["error"]["message"]
        assert len(c.get("/v1/jobs").json()["jobs"]) == before


def test_a_manifest_jobs_missing_row_names_the_file_the_folder_holds_spelt_otherwise(server, data_root, tmp_path):
    """A sheet naming `img_1.jpg` for the folder's `IMG_1.JPG` got "No such file" alone from a
    job, where `clean` names the spelling (an audit). A name behind a link out of the roots is
    never told."""
    ok = fuzz_set()["ok.jpg"][0]
    (data_root / "spelt").mkdir()
    (data_root / "spelt" / "IMG_1.JPG").write_bytes(ok)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "SECRET.JPG").write_bytes(ok)
    (data_root / "spelt" / "SECRET.JPG").symlink_to(tmp_path / "outside" / "SECRET.JPG")
    (data_root / "spelt.csv").write_text("path\nspelt/img_1.jpg\nspelt/secret.jpg\ncollection/scene.jpg\n")
    with server.client() as c:
        r = c.post("/v1/jobs", json={"source": "spelt.csv"})
        assert r.status_code == 202, r.text
        job = _wait_job(c, r.json()["id"], lambda j: j["status"] in ("done", "failed"))
        rows = pd.read_csv(io.StringIO(c.get(f"/v1/jobs/{job['id']}/results", params={"format": "csv"}).text),
                           keep_default_na=False, dtype=str).set_index("path")
    assert job["status"] == "done", job
    assert "No such file" in rows.loc["spelt/img_1.jpg", "error"]
    assert "the folder has 'spelt/IMG_1.JPG'" in rows.loc["spelt/img_1.jpg", "error"]
    secret = rows.loc["spelt/secret.jpg", "error"]
    assert "No such file" in secret and "SECRET" not in secret
    assert rows.loc["collection/scene.jpg", "error"] == ""


def test_a_source_without_files_is_refused_and_one_emptied_before_its_run_fails_the_job(server, data_root):
    """An unmounted share's empty folder, and a manifest without rows, ended `done` with 0 files
    and no error, where `cervixqc clean` exits 2."""
    (data_root / "share").mkdir()
    (data_root / "share" / ".DS_Store").write_bytes(b"x")  # nothing to clean: a Mac's leftovers only
    (data_root / "header.csv").write_text("path\n")
    with server.client() as c:
        for name in ("share", "header.csv"):
            r = c.post("/v1/jobs", json={"source": name})
            assert (r.status_code, r.json()["error"]["code"]) == (400, "empty_source"), r.text
        ok = fuzz_set()["ok.jpg"][0]
        for i in range(20):
            (data_root / "share" / f"{i:02d}.jpg").write_bytes(ok[:-1] + i.to_bytes(2, "big"))
        job = c.post("/v1/jobs", json={"source": "share"}).json()["id"]
        assert c.post(f"/v1/jobs/{job}/cancel").status_code == 200  # a job of seconds, cancelled in milliseconds
        for p in (data_root / "share").glob("*.jpg"):
            p.unlink()  # the share unmounted before the job runs again
        assert c.post(f"/v1/jobs/{job}/retry").status_code == 202
        failed = _wait_job(c, job, lambda j: j["status"] in ("done", "failed"))
        assert failed["status"] == "failed" and "holds no files to clean" in failed["error"], failed


def test_a_locked_job_store_gets_503_to_retry_and_stalls_no_other_request(weights, data_root, tmp_path):
    """Another writer holds jobs.sqlite: starting a job waits out the store's busy timeout
    and answers 503 with Retry-After, while health checks and job listings answer at once."""
    import sqlite3
    import threading

    srv = start_server(tmp_path / "srv", weights, data_roots=data_root, store_busy_timeout_s=4)
    try:
        locker = sqlite3.connect(Path(srv.env["CERVIXQC_STATE_DIR"]) / "jobs.sqlite", isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        answer: dict = {}
        with srv.client() as c:
            post = threading.Thread(target=lambda: answer.update(r=c.post("/v1/jobs", json={"source": "collection"})))
            post.start()
            time.sleep(0.5)  # the job's insert is now waiting on the lock
            t = time.perf_counter()
            assert httpx.get(f"{srv.url}/healthz", timeout=10).status_code == 200
            assert c.get("/v1/jobs").status_code == 200  # readers pass a writer's lock (WAL)
            assert time.perf_counter() - t < 2.0 and post.is_alive()
            post.join(30)
            r = answer["r"]
            assert (r.status_code, r.json()["error"]["code"], r.headers["retry-after"]) == (503, "store_unavailable", "5")
            locker.execute("ROLLBACK")
            assert c.post("/v1/jobs", json={"source": "collection"}).status_code == 202
        locker.close()
    finally:
        srv.kill()


def _wait_job(client: httpx.Client, job_id: str, until, timeout: float = 240, poll_s: float = 0.1) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(poll_s)
    raise AssertionError(f"job {job_id} stuck: {job}")


def test_a_job_that_calls_most_photos_no_cervix_carries_a_note_and_keeps_the_labels(tmp_path):
    """Stage 0 at a site it never saw calls its cervixes no_cervix (issue 13's first trial: a
    third of them), and nothing said so; a job says so, as `clean` does."""
    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0, presence_threshold=1.0)  # stage 0 says no to all
    src = tmp_path / "data" / "site"
    src.mkdir(parents=True)
    for i in range(20):
        (src / f"{i:02d}.jpg").write_bytes(_jpeg(i, (64, 48)))
    srv = start_server(tmp_path / "srv", weights, data_roots=tmp_path / "data")
    try:
        with srv.client() as c:
            r = c.post("/v1/jobs", json={"source": "site"})
            assert r.status_code == 202, r.text
            job = _wait_job(c, r.json()["id"], lambda j: j["status"] in ("done", "failed"))
        with httpx.Client(base_url=srv.url) as page:  # the jobs page, as a signed-in browser gets it
            sign_in(page)
            jobs_page, polled = page.get("/ui/jobs").text, page.get(f"/ui/jobs/{job['id']}/status.json").json()
    finally:
        srv.kill()
    assert job["status"] == "done" and job["counts"] == {"no_cervix": 20}
    assert len(job["notes"]) == 1 and job["notes"][0].startswith("20 of 20 readable photos (100%) were called no_cervix")
    assert polled["notes"] == job["notes"]  # what jobs.js writes into a running job's row
    assert [unescape(p) for p in re.findall(r'<p class="hint note">(.*?)</p>', jobs_page)] == job["notes"]


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


COLS = ["path", "sha256", "label", "kind", "cervix_box", "flags", "dark_score", "phash", "crop_hash",
        "duplicate_group", "duplicate_of", "duplicate_kind", "error"]


def test_a_job_cleans_a_folder_as_the_cli_does_and_streams_its_results(server, weights, data_root, tmp_path):
    src = data_root / "collection"
    before = _checksums(src)
    reference = clean(QCPipeline(weights), src, tmp_path / "ref", tmp_path / "ref-q", batch_size=4,
                      quarantine_findings=("dark",))
    with server.client() as c:
        r = c.post("/v1/jobs", json={"source": "collection", "quarantine": "batch1"})
        assert r.status_code == 202, r.text
        job = _wait_job(c, r.json()["id"], lambda j: j["status"] in ("done", "failed"))
        assert job["status"] == "done" and job["processed"] == job["total"] == reference.total
        assert job["counts"] == reference.by_label and job["progress"] == 1.0 and job["step"] is None
        assert job["notes"] == run_notes(reference.by_label)
        # the models and thresholds its rows were labelled by, as clean's summary.json names them
        # (a job's results named neither: an audit)
        assert {k: job["labelled_by"][k] for k in ("models", "thresholds")} == {
            k: reference.decision[k] for k in ("models", "thresholds")}
        csv_text = c.get(f"/v1/jobs/{job['id']}/results", params={"format": "csv"}).text
        jsonl = c.get(f"/v1/jobs/{job['id']}/results", params={"format": "jsonl"}).text.splitlines()
        listed = c.get("/v1/jobs").json()["jobs"]
    got = pd.read_csv(io.StringIO(csv_text), keep_default_na=False, dtype=str)
    want = pd.read_csv(tmp_path / "ref" / "results.csv", keep_default_na=False, dtype=str)
    assert (want["cervix_box"] != "").any() and (want["kind"] != "").any() and (want["crop_hash"] != "").any()
    pd.testing.assert_frame_equal(got[COLS], want[COLS])
    # the fuzz set's photo is stored three times (RGB, CMYK and grey JPEGs): one group of near copies
    near = got[got["duplicate_kind"] != ""]
    assert {"ok.jpg", "cmyk.jpg", "gray.jpg"} <= {p.rsplit("/", 1)[-1] for p in near["path"]}
    # a cropped copy, found by the pixel check: the job reads its photos for it as clean does
    group = dict(zip(got["path"], got["duplicate_group"]))
    assert group["scene.jpg"] == group["clinic_a/scene_cropped.jpg"] != ""
    assert len(jsonl) == len(got) and job["id"] in {j["id"] for j in listed}
    assert _checksums(src) == before
    # the download is the job's results.csv on disk byte for byte (it was CRLF against LF)
    on_disk = Path(server.env["CERVIXQC_STATE_DIR"]) / "jobs" / job["id"] / "results.csv"
    assert csv_text.encode() == on_disk.read_bytes()
    quarantine = Path(server.env["CERVIXQC_STATE_DIR"]) / "quarantine" / "batch1"
    flagged = got[got["label"] != "regular"]
    for _, row in flagged.iterrows():
        copy = quarantine / row["label"] / row["path"]
        assert copy.read_bytes() == (src / row["path"]).read_bytes()
        assert copy.stat().st_ino != (src / row["path"]).stat().st_ino, "quarantine must hold copies"
    dark = got[got["flags"].str.contains("dark")]
    assert len(dark) > 0 and sorted(p.relative_to(quarantine / "dark").as_posix()
                                    for p in (quarantine / "dark").rglob("*") if p.is_file()) == sorted(dark["path"])
    assert sorted(dark["path"]) == sorted(p.relative_to(tmp_path / "ref-q" / "dark").as_posix()
                                          for p in (tmp_path / "ref-q" / "dark").rglob("*") if p.is_file())


def test_results_of_a_large_job_stream_whole_to_concurrent_clients_and_abandoned_streams_hold_nothing(server,
                                                                                                       data_root):
    """The stream's SQLite connection was held across chunks, which Starlette pulls from any
    thread-pool thread: concurrent downloads broke off after the first 1,000 rows (sqlite3's
    same-thread check), and a client that hung up left its connection open."""
    big = data_root / "big"
    big.mkdir()
    for i in range(2100):  # three chunks of rows; empty files: unreadable rows, no model work
        (big / f"{i:05d}.jpg").touch()
    with server.client() as c:
        job = c.post("/v1/jobs", json={"source": "big"}).json()["id"]
        assert _wait_job(c, job, lambda j: j["status"] in ("done", "failed"))["processed"] == 2100

    async def download(client: httpx.AsyncClient, fmt: str) -> int:
        r = await client.get(f"/v1/jobs/{job}/results", params={"format": fmt})
        return len(r.text.splitlines())

    async def downloads() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, headers=HEADERS, timeout=120) as client:
            return await asyncio.gather(*(download(client, fmt) for fmt in ("csv", "jsonl") * 3))

    assert asyncio.run(downloads()) == [2101, 2100] * 3
    fds = lambda: len(os.listdir(f"/proc/{server.proc.pid}/fd"))  # noqa: E731
    before = fds()
    for _ in range(10):  # read the first chunk, then hang up
        with httpx.stream("GET", f"{server.url}/v1/jobs/{job}/results", headers=HEADERS) as r:
            next(r.iter_bytes())
    time.sleep(1)
    assert fds() <= before + 2
    assert "broke off" not in server.log_tail(100_000)


def test_a_file_linked_from_outside_the_roots_is_not_read(server, data_root, tmp_path):
    folder = data_root / "with_link"
    folder.mkdir(exist_ok=True)
    (folder / "inside.jpg").write_bytes(_jpeg(1))
    secret = tmp_path / "private.jpg"
    secret.write_bytes(_jpeg(2))
    (folder / "linked.jpg").symlink_to(secret)
    with server.client() as c:
        job_id = c.post("/v1/jobs", json={"source": "with_link"}).json()["id"]
        _wait_job(c, job_id, lambda j: j["status"] == "done")
        rows = {r["path"]: r for r in map(json.loads, c.get(f"/v1/jobs/{job_id}/results?format=jsonl").text.splitlines())}
    assert rows["linked.jpg"]["label"] == "unreadable" and "outside" in rows["linked.jpg"]["error"]
    assert rows["linked.jpg"]["sha256"] is None
    assert rows["inside.jpg"]["label"] != "unreadable"


def test_a_request_that_gave_up_leaves_the_queue_at_once_and_its_images_are_never_run(tmp_path, weights):
    """A timed-out request held its room until the batch reached it (fresh requests got 503
    with nobody waiting), and a client that hung up still had its images run: under a burst of
    retries 16 of 64 clients got answers while the engine ran 240 images."""
    srv = start_server(tmp_path / "srv", weights, max_queue=1, max_batch_size=2, max_wait_ms=3000,
                       request_timeout_s=2)
    try:
        with srv.client() as c:
            upload = lambda i, **kw: c.post("/v1/qc", files={"files": (f"{i}.jpg", _jpeg(i), "image/jpeg")}, **kw)  # noqa: E731
            assert upload(1).status_code == 504  # alone, it waits 3 s for company: past its 2 s
            assert upload(2).status_code == 200  # its room was given back: admitted, and run
            with pytest.raises(httpx.TimeoutException):
                upload(3, timeout=0.5)  # the client gives up and hangs up
            time.sleep(0.5)
            assert upload(4).status_code == 200
            text = c.get("/metrics").text
        assert _metric(text, "cervixqc_batch_size_sum") == 2  # images 2 and 4 only
        assert _metric(text, "cervixqc_rejected_requests_total", '{reason="client_closed"}') == 1
        assert _metric(text, "cervixqc_queue_depth") == 0 and 'status="500"' not in text
    finally:
        srv.kill()
    # a hang-up is a counted rejection, not an asyncio ERROR ("exception was never retrieved")
    assert "never retrieved" not in srv.log_tail(100_000)


def test_overload_gets_503_with_retry_after_and_the_server_stays_healthy(tmp_path, weights):
    big = _jpeg(9, size=(1200, 900))  # the queue's bytes bind before its 2 images do for these
    srv = start_server(tmp_path / "srv", weights, max_queue=2, max_batch_size=1, max_wait_ms=0,
                       max_upload_bytes=len(big) + 4096, max_queue_bytes=len(big) + 8192)
    try:
        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, headers=HEADERS, timeout=120) as client:
                return await asyncio.gather(*(client.post("/v1/qc", files={"files": (f"{i}.jpg", _jpeg(i), "image/jpeg")})
                                              for i in range(40)))

        answers = asyncio.run(run())
        statuses = [r.status_code for r in answers]
        assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) > 0, statuses
        refused = next(r for r in answers if r.status_code == 503)
        assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["error"]["code"] == "overloaded"
        with srv.client() as c:
            # more images than the queue ever holds: 503 and Retry-After sent such a client round for ever
            too_many = c.post("/v1/qc", files=[("files", (f"{i}.jpg", _jpeg(i), "image/jpeg")) for i in range(3)])
            assert too_many.status_code == 413 and "CERVIXQC_MAX_QUEUE" in too_many.json()["error"]["message"]
            assert c.get("/readyz").status_code == 200
            assert c.post("/v1/qc", files={"files": ("a.jpg", _jpeg(1), "image/jpeg")}).status_code == 200
            assert _metric(c.get("/metrics").text, "cervixqc_rejected_requests_total", '{reason="overload"}') > 0

        async def run_big() -> list[httpx.Response]:  # 256 images of 64 MB each were 16 GB held in RAM
            async with httpx.AsyncClient(base_url=srv.url, headers=HEADERS, timeout=120) as client:
                return await asyncio.gather(*(client.post("/v1/qc", files={"files": (f"{i}.jpg", big, "image/jpeg")})
                                              for i in range(8)))

        statuses = [r.status_code for r in asyncio.run(run_big())]
        assert set(statuses) <= {200, 503} and statuses.count(200) > 0, statuses
        with srv.client() as c:
            assert _metric(c.get("/metrics").text, "cervixqc_rejected_requests_total", '{reason="queue_bytes"}') > 0
        assert srv.proc.poll() is None
    finally:
        srv.kill()


# 80 copies of a small photo in batches of 2 were a job of 0.1-0.2 s on a quiet host: a 0.1 s
# poll saw it done before the kill, and the test failed unless the other worker was busy
# (2026-12-03). Batches of 1 and a 5 ms poll: with 80 photos the first poll saw 6 at 0.05 s of a
# job of 0.17-0.19 s, so 160 leave a margin of 6x. Distinct scenes instead of copies made each
# photo far dearer (the test took 70 s with 600).
NOT_DONE_AT_KILL = 160


@pytest.mark.slow
def test_a_server_killed_with_sigkill_mid_job_finishes_it_after_restart(tmp_path, weights):
    root = tmp_path / "data"
    src = root / "big"
    src.mkdir(parents=True)
    ok = fuzz_set()["ok.jpg"][0]
    for i in range(NOT_DONE_AT_KILL):
        (src / f"img{i:03d}.jpg").write_bytes(ok[:-1] + i.to_bytes(2, "big"))
    (src / "broken.jpg").write_bytes(b"not an image")
    before = _checksums(src)
    clean(QCPipeline(weights), src, tmp_path / "ref", batch_size=4)
    settings = dict(data_roots=root, job_batch_size=1)
    srv = start_server(tmp_path / "srv", weights, **settings)
    with srv.client() as c:
        job_id = c.post("/v1/jobs", json={"source": "big"}).json()["id"]
        seen = _wait_job(c, job_id, lambda j: j["processed"] >= 6, poll_s=0.005)
    srv.kill(signal.SIGKILL)
    assert seen["processed"] < seen["total"], f"the kill must land mid-job: {seen['processed']} of {seen['total']}"
    srv = start_server(tmp_path / "srv", weights, **settings)
    try:
        with srv.client() as c:
            job = _wait_job(c, job_id, lambda j: j["status"] == "done")
            got = pd.read_csv(io.StringIO(c.get(f"/v1/jobs/{job_id}/results").text), keep_default_na=False, dtype=str)
    finally:
        srv.kill()
    want = pd.read_csv(tmp_path / "ref" / "results.csv", keep_default_na=False, dtype=str)
    assert job["processed"] == job["total"] == len(want) == len(got) and got["path"].is_unique
    pd.testing.assert_frame_equal(got[COLS], want[COLS])
    assert _checksums(src) == before


def test_a_job_stopped_between_its_quarantine_copies_and_its_rows_drops_those_copies_when_resumed(tmp_path,
                                                                                                  weights):
    """A service killed after a batch's copies and before its rows: the resumed job labelled the
    changed photo again and the old copy stayed under its old label, no row owning it (or,
    flagged again, it was never copied: its name held; an audit)."""
    from pipelines.clean.quarantine import quarantine_results
    from pipelines.engine.qc_result import Label, QCResult
    from service.jobs.store import JobStore

    root, work = tmp_path / "data", tmp_path / "srv"
    (root / "set").mkdir(parents=True)
    old, new = jpeg_bytes(textured_scene(11)), jpeg_bytes(textured_scene(12))
    (root / "set" / "x.jpg").write_bytes(old)
    qdir = work / "state" / "quarantine" / "q1"
    store = JobStore(work / "state" / "jobs.sqlite")
    job = store.create(str((root / "set").resolve()), "q1", "resnest", work / "state" / "jobs")
    store.transition(job.id, "running")
    killed = QCResult(path="x.jpg", label=Label.NO_CERVIX, sha256=hashlib.sha256(old).hexdigest())
    store.copies_pending(job.id, [killed], qdir)
    assert quarantine_results(root / "set", [killed], qdir, link=False) == 0
    del store  # the service stops here: no row stored
    (root / "set" / "x.jpg").unlink()
    (root / "set" / "x.jpg").write_bytes(new)
    srv = start_server(work, weights, data_roots=root)
    try:
        with srv.client() as c:
            assert _wait_job(c, job.id, lambda j: j["status"] in ("done", "failed"))["status"] == "done"
            (row,) = [json.loads(line) for line in c.get(f"/v1/jobs/{job.id}/results",
                                                         params={"format": "jsonl"}).text.splitlines()]
    finally:
        srv.kill()
    copies = {p.relative_to(qdir).parts[0]: p.read_bytes() for p in qdir.rglob("*.jpg")}
    assert copies == ({row["label"]: new} if row["label"] != "regular" else {}), (row["label"], list(copies))


def test_a_second_service_on_the_same_state_folder_refuses_to_start(server, weights, tmp_path):
    """Two processes on one state folder both ran the same job, every photo twice (uvicorn
    started directly: the lock is the app's, not only `cervixqc serve`'s check)."""
    with pytest.raises(RuntimeError, match="another cervixqc service"):
        start_server(tmp_path / "second", weights, state_dir=server.env["CERVIXQC_STATE_DIR"], ready_timeout=90)
    # its lock file deleted as a stale one: the folder's own lock still holds (the file's went with it)
    (Path(server.env["CERVIXQC_STATE_DIR"]) / "service.lock").unlink()
    with pytest.raises(RuntimeError, match="another cervixqc service"):
        start_server(tmp_path / "third", weights, state_dir=server.env["CERVIXQC_STATE_DIR"], ready_timeout=90)
    with server.client() as c:
        assert c.get("/readyz").status_code == 200  # the first one serves on


def test_a_405_names_every_method_the_path_serves(server):
    r = httpx.request("OPTIONS", server.url + "/v1/jobs", headers=HEADERS)
    assert r.status_code == 405 and {"GET", "POST"} <= set(r.headers["allow"].split(", "))
    r = httpx.request("PUT", server.url + "/v1/jobs/abc/cancel", headers=HEADERS)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    # the pages and the API document are not in the document: their Allow was empty (an audit)
    for path, allowed in (("/ui/jobs", {"GET", "POST"}), ("/openapi.json", {"GET"})):
        r = httpx.request("PUT", server.url + path, headers=HEADERS)
        assert r.status_code == 405 and allowed <= set(r.headers["allow"].split(", ")), (path, r.headers)


def test_the_api_document_states_how_many_files_an_upload_may_carry_and_one_more_gets_413(server):
    """The module's server takes 20 files a request (queue 256): a client reading the document
    learns it before sending 21. Schemathesis sent 21, valid by the document before, and got 413."""
    with server.client() as c:
        doc = c.get("/openapi.json").json()
        upload = doc["paths"]["/v1/qc"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert upload["properties"]["files"]["maxItems"] == 20
        r = c.post("/v1/qc", files=[("files", (f"{i}.jpg", _jpeg(i, (32, 32)), "image/jpeg")) for i in range(21)])
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_files", r.text
    assert "CERVIXQC_MAX_FILES_PER_REQUEST" in r.json()["error"]["message"]


def test_the_api_document_names_each_operation_once_and_each_job_route_its_own_refusals(server):
    """GET and HEAD of /healthz and /readyz shared one operationId (named after HEAD), and every
    job route listed 400, 403 and 409 whether it could answer them or not, and no 503 (an audit)."""
    from collections import Counter

    with server.client() as c:
        doc = c.get("/openapi.json").json()
    ids = Counter(op["operationId"] for ops in doc["paths"].values() for op in ops.values())
    assert [k for k, n in ids.items() if n > 1] == [] and ids["healthz"] == ids["readyz"] == 1
    codes = {(m.upper(), path): set(op["responses"]) for path, ops in doc["paths"].items() for m, op in ops.items()}
    assert {"400", "403", "408", "409", "413", "415", "503"} <= codes["POST", "/v1/jobs"]
    assert codes["GET", "/v1/jobs/{job_id}"] & {"400", "403", "409"} == set()
    for route in (("GET", "/v1/jobs/{job_id}"), ("POST", "/v1/jobs/{job_id}/cancel"), ("DELETE", "/v1/jobs/{job_id}")):
        assert {"404", "503"} <= codes[route], route
    assert "Plain `def`" not in doc["paths"]["/metrics"]["get"].get("description", "")


@pytest.mark.slow
def test_schemathesis_with_every_check_finds_no_contract_mismatch(server, tmp_path):
    """All checks: undocumented statuses, Allow headers, schema-valid requests refused, response
    schemas, 5xx. tests/schemathesis.toml says why POST /v1/qc may answer 422 to valid input, and
    POST /v1/jobs 400."""
    st = Path(sys.executable).with_name("st")
    config = Path(__file__).with_name("schemathesis.toml")
    run = subprocess.run([str(st), "--config-file", str(config), "run", f"{server.url}/openapi.json",
                          "-H", f"X-API-Key: {API_KEY}",
                          "--checks", "all", "--max-examples", "25", "--generation-deterministic",
                          "--request-timeout", "60"],
                         capture_output=True, text=True, timeout=280, env={**os.environ, "NO_COLOR": "1"},
                         cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    tested = re.search(r"(\d+) generated", run.stdout)
    assert tested and int(tested.group(1)) >= 50, run.stdout[-4000:]
    assert server.proc.poll() is None


def test_logs_at_info_name_no_file_and_hold_no_image_bytes(server, data_root):
    name = "PATIENT-Q4711X-Doe.jpg"  # letters around the id: a client port such as 47118 must not match
    (data_root / "named").mkdir(exist_ok=True)
    (data_root / "named" / name).write_bytes(_jpeg(5))
    with server.client() as c:
        assert c.post("/v1/qc", files={"files": (name, _jpeg(5), "image/jpeg")}).status_code == 200
        assert c.post("/v1/qc", files={"files": (name, b"broken", "image/jpeg")}).status_code == 422
        job_id = c.post("/v1/jobs", json={"source": "named"}).json()["id"]
        _wait_job(c, job_id, lambda j: j["status"] == "done")
    # the review's folder filter is a query string, and uvicorn's access log wrote it out
    assert httpx.get(f"{server.url}/ui/jobs/{job_id}/review?source=PATIENT-Q4711X-Doe").status_code == 401
    log = server.log.read_text(errors="replace")
    assert "INFO" in log and job_id in log, "the server log must be at INFO for this test to mean anything"
    # our own lines under a bare `uvicorn --factory` (nothing configured them: not printed), timed
    assert re.search(rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} INFO service\.jobs\.runner: job {job_id}: done, ",
                     log, re.M), log[-3000:]
    assert f"GET /ui/jobs/{job_id}/review?…" in log  # the access log itself is on
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO uvicorn\.access: 127\.0\.0\.1:\d+ - \"GET /ui/jobs/",
                     log, re.M)  # uvicorn's lines in the same format, timed
    assert "Q4711X" not in log and "Doe" not in log and "\\xff\\xd8" not in log


def test_a_cancelled_job_stops_and_cannot_be_cancelled_twice(server, data_root):
    folder = data_root / "to_cancel"
    folder.mkdir(exist_ok=True)
    ok = fuzz_set()["ok.jpg"][0]
    for i in range(1000):
        (folder / f"img{i:04d}.jpg").write_bytes(ok[:-1] + i.to_bytes(2, "big"))
    with server.client() as c:
        job_id = c.post("/v1/jobs", json={"source": "to_cancel"}).json()["id"]
        cancelled = c.post(f"/v1/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
        time.sleep(1.0)  # the runner stops before its next batch
        first = c.get(f"/v1/jobs/{job_id}").json()
        time.sleep(1.0)
        second = c.get(f"/v1/jobs/{job_id}").json()
        again = c.post(f"/v1/jobs/{job_id}/cancel")
    assert first["status"] == second["status"] == "cancelled"
    assert first["processed"] == second["processed"] < 1000
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"


def test_a_link_loop_or_a_name_too_long_costs_one_row_not_the_job_a_500_or_a_name_in_the_log(server, data_root):
    """Each failed the whole job on every retry (the root check and the quarantine copy raised),
    or answered 500 at submission, with the path in the log as a traceback, twice."""
    folder = data_root / "loops"
    folder.mkdir(exist_ok=True)
    (folder / "inside.jpg").write_bytes(_jpeg(3))
    loop = folder / "PATIENT-LOOP77-Roe.jpg"
    if not loop.is_symlink():
        loop.symlink_to(loop.name)
    long_name = "LONG88" + "p" * 300 + ".jpg"
    (data_root / "loops.csv").write_text(f"path\nloops/inside.jpg\nloops/{long_name}\n")
    (data_root / "loopdir").unlink(missing_ok=True)
    (data_root / "loopdir").symlink_to("loopdir")
    with server.client() as c:
        for source in ("loops", "loops.csv"):
            r = c.post("/v1/jobs", json={"source": source, "quarantine": f"q-{source}"})
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            job = _wait_job(c, job_id, lambda j: j["status"] in ("done", "failed"))
            assert job["status"] == "done", job
            rows = {r["path"]: r for r in map(json.loads, c.get(f"/v1/jobs/{job_id}/results?format=jsonl").text.splitlines())}
            labels = sorted((p.endswith("inside.jpg"), r["label"] == "unreadable") for p, r in rows.items())
            assert labels == [(False, True), (True, False)], rows
        for source in ("loopdir", "LONG88" + "a" * 300):
            r = c.post("/v1/jobs", json={"source": source})
            assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_path"), r.text
        # any token is a method to uvicorn: each was a new metrics series, and no key is needed
        with httpx.Client(base_url=server.url) as anyone:
            anyone.request("MLOOP9", "/healthz")
        metrics = c.get("/metrics").text
    assert "MLOOP9" not in metrics and 'method="other"' in metrics
    log = server.log.read_text(errors="replace")
    assert "LOOP77" not in log and "LONG88" not in log and "Traceback" not in log
