"""`make serve`, the README's first command, on the bundled weights. Every other service test
runs tiny generated weights, so a card in weights/ whose file no longer matches it, a model the
engine cannot load or convert any more, or a Makefile step that broke passed CI: this starts
the service as a site would (its own API key file written on first use, the default weights
folder) and checks that it loads every bundled model and labels photos with them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.qc_fixtures import jpeg_bytes
from tests.uvicorn_process import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(420)


@contextmanager
def make_serve(work: Path, **env_extra: str) -> Iterator[tuple[str, Path]]:
    """(url, log) of `make serve` started in its own session, as a site runs it."""
    port = free_port()
    # the default weights folder, not a test's; and not `make test`'s own make flags or job server
    env = {k: v for k, v in os.environ.items() if (not k.startswith("CERVIXQC_") or k == "CERVIXQC_CACHE")
           and k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env |= {"API_KEY_FILE": str(work / "api-key"), "CERVIXQC_PORT": str(port),
            "CERVIXQC_STATE_DIR": str(work / "state"), **env_extra}
    log = work / "serve.log"
    with log.open("wb") as out:  # its own session: make, uv and the service stop together
        proc = subprocess.Popen(["make", "serve"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, f"make serve ended ({proc.returncode}):\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        else:
            raise AssertionError(f"not ready in 300 s:\n{log.read_text()[-3000:]}")
        assert f"docs at {url}/docs" in log.read_text()  # the port it serves, not always 8000
        yield url, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("make-serve")
    with make_serve(work) as (url, _):
        key = (work / "api-key").read_text().strip()
        with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=120) as client:
            yield client


def test_make_serve_loads_every_bundled_model_as_its_card_describes(served):
    r = served.get("/v1/models")
    assert r.status_code == 200, r.text
    listed = {m["name"]: m["sha256"] for m in r.json()["models"]}
    cards = {p.stem: json.loads(p.read_text()) for p in (REPO / "weights").glob("*.json")
             if p.stem in ("presence", "detector", "deep_sad", "classifier", "colour")}
    assert set(cards) == {"presence", "detector", "deep_sad", "classifier", "colour"}
    assert listed == {name: card["sha256"] for name, card in cards.items()}
    # each card says when its weights were written: the detector's and presence head's said nothing,
    # and the service showed a sha256 prefix for their version where the others showed a date
    versions = {m["name"]: m["version"] for m in r.json()["models"]}
    assert all(datetime.fromisoformat(versions[name]) for name in cards), versions
    findings = json.loads((REPO / "weights" / "findings.json").read_text())
    assert r.json()["findings_thresholds"] == findings["thresholds"]


def test_make_serve_labels_photos_with_the_bundled_weights(served):
    rng = np.random.default_rng(0)
    grey = np.full((480, 640, 3), 128, np.uint8)
    noise = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    files = [("files", ("grey.jpg", jpeg_bytes(Image.fromarray(grey)), "image/jpeg")),
             ("files", ("noise.jpg", jpeg_bytes(Image.fromarray(noise)), "image/jpeg")),
             ("files", ("broken.jpg", b"\xff\xd8 not a photo", "image/jpeg"))]
    r = served.post("/v1/qc", files=files)
    assert r.status_code == 200, r.text
    labels = {res["filename"]: res["label"] for res in r.json()["results"]}
    assert labels == {"grey.jpg": "no_cervix", "noise.jpg": "no_cervix", "broken.jpg": "unreadable"}


def test_make_serve_finds_the_cervix_in_most_generated_scenes(served, tmp_path):
    """The generator's scenes at three of its sources (11 of these 12 found on 2026-12-03): a
    bundled detector or presence head that no longer finds cervixes fails here, not only the
    figures in its card."""
    from pipelines.data.synth import PRESETS, generate

    generate(replace(PRESETS["small"], n_images=12, seed=11), tmp_path, workers=1)
    rows = pd.read_csv(tmp_path / "manifest.csv")
    rows = rows[rows["kind"] != "no_cervix"]
    files = [("files", (Path(p).name, (tmp_path / p).read_bytes(), "image/jpeg")) for p in rows["path"]]
    r = served.post("/v1/qc", files=files)
    assert r.status_code == 200, r.text
    found = [res["label"] != "no_cervix" for res in r.json()["results"]]
    assert len(found) >= 10 and sum(found) >= 0.75 * len(found), found


def test_keys_a_site_sets_replace_the_generated_one(tmp_path):
    """`make serve` added its generated key file beside CERVIXQC_API_KEYS: a site that set its
    own key still let the old one in (an audit)."""
    own = "site-own-key-0123456789abcdefghijklmnop"
    with make_serve(tmp_path, CERVIXQC_API_KEYS=own, CERVIXQC_POLICI="both") as (url, log):
        generated = (tmp_path / "api-key").read_text().strip()
        assert httpx.get(f"{url}/v1/models", headers={"X-API-Key": own}, timeout=30).status_code == 200
        refused = httpx.get(f"{url}/v1/models", headers={"X-API-Key": generated}, timeout=30)
        assert refused.status_code == 401, refused.text
        assert "api-key is not read" in log.read_text()
        # a misspelt setting is said once (the settings are read before uvicorn starts and by the app: twice)
        assert log.read_text().count("CERVIXQC_POLICI: no such setting") == 1, log.read_text()


def test_make_clean_keeps_the_services_state_the_key_and_the_training_data(tmp_path):
    """`make serve` keeps jobs.sqlite, results, quarantine copies and the key under .cache/, and
    `make weights` its photos and runs: `make clean` removed them all (an audit)."""
    import shutil

    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    for folder in (".venv", ".pytest_cache", ".cache/service", ".cache/real-data", "pipelines/engine/__pycache__"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / ".cache" / "api-key").write_text("k" * 24)
    (tmp_path / "pipelines" / "engine" / "qc.py").write_text("")
    subprocess.run(["make", "clean"], cwd=tmp_path, check=True, capture_output=True)
    assert not (tmp_path / ".venv").exists() and not (tmp_path / ".pytest_cache").exists()
    # the bytecode `make serve` and `make test` compile into our folders went too (it stayed)
    assert not (tmp_path / "pipelines" / "engine" / "__pycache__").exists()
    assert (tmp_path / "pipelines" / "engine" / "qc.py").is_file()
    assert sorted(p.name for p in (tmp_path / ".cache").iterdir()) == ["api-key", "real-data", "service"]
