"""The review page of a 10,000-image job over real HTTP: the first page of the grid, a deep page,
a filtered page and the what-if scores, timed against a real uvicorn whose job database holds
N finished items with realistic records (findings, hashes, embedding) and some reviews.

    python -m tests.benchmarks.review_grid --items 10000 --repeats 20

Target (issue 14): the first page answers in < 300 ms on the 2-core machine. Prints medians
and the slowest request; the first (cold) request, which builds the job's view
(service.ui.job_views), is reported apart.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from pipelines.engine.qc_result import Finding, Label, QCResult
from service.jobs.reviews import ReviewStore
from service.jobs.store import JobStore
from tests.qc_fixtures import tiny_weights
from tests.service_server import sign_in, start_server


def _records(n: int, seed: int = 0) -> list[QCResult]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        u = rng.random()
        label = Label.REGULAR if u < 0.85 else Label.NON_REGULAR if u < 0.93 else Label.NO_CERVIX if u < 0.99 \
            else Label.UNREADABLE
        cropped = label in (Label.REGULAR, Label.NON_REGULAR)
        out.append(QCResult(
            path=f"site{i % 7}/case{i // 5:05d}/img{i:06d}.jpg", sha256=f"{i:064x}", width=1600, height=1200,
            label=label, kind=("green" if u < 0.9 else "iodine") if label == Label.NON_REGULAR else None,
            cervix_box=[400.0, 300.0, 1200.0, 900.0] if cropped else None, cervix_score=float(rng.random()),
            deep_sad_score=float(rng.gamma(2, 0.5)) if cropped else None,
            resnest_prob=float(rng.beta(1, 6 if label == Label.REGULAR else 0.5)) if cropped else None,
            findings={k: Finding(score=float(rng.random()), threshold=0.5, flagged=False)
                      for k in ("blur", "dark", "overexposed", "glare")},
            phash=f"{i:016x}", crop_hash=f"{i:016x}", embedding="A" * 172,
            error="not an image" if label == Label.UNREADABLE else None))
    return out


def _time(client: httpx.Client, url: str, repeats: int) -> tuple[float, float, float]:
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        r = client.get(url)
        times.append((time.perf_counter() - t) * 1000)
        r.raise_for_status()
    return times[0], statistics.median(times[1:]), max(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        state = work / "state"
        store = JobStore(state / "jobs.sqlite")
        job = store.create(str(work / "data"), None, "resnest", state / "jobs")
        records = _records(args.items)
        for start in range(0, len(records), 1000):
            store.add_items(job.id, records[start : start + 1000])
        store.transition(job.id, "running")  # done ends a running job only
        store.transition(job.id, "done", total=len(records), started=time.time(), finished=time.time())
        reviews = ReviewStore(state / "jobs.sqlite")
        for item in range(1, args.items, 50):  # 2% reviewed
            reviews.decide(job.id, item, "x", "key-bench", "label", "regular", "green")
        srv = start_server(work, tiny_weights(work / "w", 0.5), state_dir=state)
        try:
            c = httpx.Client(base_url=srv.url, timeout=60)
            sign_in(c)
            base = f"/ui/jobs/{job.id}"
            print(f"{args.items} items, {len(range(1, args.items, 50))} reviewed; ms: cold, median of "
                  f"{args.repeats}, max")
            for name, url in (("first page", f"{base}/review"), ("page 150", f"{base}/review?page=150"),
                              ("filtered (non_regular, score 0.2-0.6, not reviewed)",
                               f"{base}/review?label=non_regular&score_min=0.2&score_max=0.6&reviewed=no"),
                              ("what-if scores", f"{base}/scores.json"), ("one image page", f"{base}/items/5000")):
                cold, median, worst = _time(c, url, args.repeats)
                print(f"  {name:55s} {cold:7.1f} {median:7.1f} {worst:7.1f}")
            r = c.get(f"{base}/scores.json")  # httpx asks for gzip, as browsers do
            print(f"what-if scores: {r.num_bytes_downloaded / 1e6:.2f} MB on the wire, "
                  f"{len(r.content) / 1e6:.2f} MB as JSON")
        finally:
            srv.kill()


if __name__ == "__main__":
    main()
