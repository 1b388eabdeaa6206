"""Why `label_counts` exists: a job's per-label counts read from it vs counted with GROUP BY
over its items, side by side on one SQLite file (`python -m tests.benchmarks.job_store --items N`)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pipelines.engine.qc_result import Label, QCResult
from service.jobs.store import JobStore

LABELS = [Label.REGULAR, Label.NON_REGULAR, Label.NO_CERVIX, Label.UNREADABLE]


def _best_ms(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t) * 1000)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=5000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        store = JobStore(Path(d) / "jobs.sqlite")
        job = store.create("src", None, "deep_sad", Path(d))
        t = time.perf_counter()
        for i in range(0, args.items, args.batch):
            store.add_items(job.id, [QCResult(path=f"dir/{j:09d}.jpg", label=LABELS[j % 4])
                                     for j in range(i, min(i + args.batch, args.items))])
        insert_s = time.perf_counter() - t
        db = store._db()
        group_by = _best_ms(lambda: db.execute("SELECT label, count(*) FROM items WHERE job_id = ? GROUP BY label",
                                               (job.id,)).fetchall())
        table = _best_ms(lambda: store.counts(job.id))
        assert sum(store.counts(job.id).values()) == args.items
        print(f"{args.items} items inserted in {insert_s:.1f} s ({args.items / insert_s:.0f}/s); counts: "
              f"GROUP BY {group_by:.1f} ms, label_counts {table:.2f} ms ({group_by / table:.0f}x)")


if __name__ == "__main__":
    main()
