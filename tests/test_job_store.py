"""The SQLite job store's item counts: kept in step with the items, never double-counted,
and backfilled once for a file written before the counts table existed."""

import json
import os
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from pipelines.engine.qc_result import Label, QCResult
from service.jobs.store import JobStore


def _group_by(path, job_id):
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT label, count(*) FROM items WHERE job_id = ? GROUP BY label", (job_id,)))


def test_counts_follow_the_items_and_a_repeated_path_counts_once(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    a, b = store.create("src", None, "deep_sad", tmp_path), store.create("src", None, "deep_sad", tmp_path)
    store.add_items(a.id, [QCResult(path="x.jpg", label=Label.REGULAR), QCResult(path="y.jpg", label=Label.NO_CERVIX)])
    store.add_items(a.id, [QCResult(path="x.jpg", label=Label.NON_REGULAR),  # already there: ignored
                           QCResult(path="z.jpg", label=Label.REGULAR)])
    store.add_items(b.id, [QCResult(path="x.jpg", label=Label.UNREADABLE, error="empty file (0 bytes)")])
    assert store.counts(a.id) == _group_by(tmp_path / "jobs.sqlite", a.id) == {"regular": 2, "no_cervix": 1}
    assert store.counts(b.id) == {"unreadable": 1}
    assert store._db().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: a power cut loses no job row
    assert [r.label for r in store.records(a.id)] == [Label.REGULAR, Label.NO_CERVIX, Label.REGULAR]


def test_a_file_from_before_the_counts_table_is_backfilled_once_on_open(tmp_path):
    path = tmp_path / "jobs.sqlite"
    store = JobStore(path)
    job = store.create("src", None, "deep_sad", tmp_path)
    store.add_items(job.id, [QCResult(path=f"{i}.jpg", label=Label.REGULAR if i % 3 else Label.NON_REGULAR)
                             for i in range(9)])
    with sqlite3.connect(path) as db:  # make it look like a version-0 file
        db.execute("DROP TABLE label_counts")
        db.execute("PRAGMA user_version = 0")
    reopened = JobStore(path)
    assert reopened.counts(job.id) == {"regular": 6, "non_regular": 3}
    reopened.add_items(job.id, [QCResult(path="9.jpg", label=Label.REGULAR)])
    assert JobStore(path).counts(job.id) == {"regular": 7, "non_regular": 3}  # counting goes on from the backfill


def test_duplicate_groups_land_in_their_job_records_only_and_leave_the_counts_alone(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    a, b = store.create("src", None, "deep_sad", tmp_path), store.create("src", None, "deep_sad", tmp_path)
    for job in (a, b):
        store.add_items(job.id, [QCResult(path=p, label=Label.REGULAR) for p in ("x.jpg", "y.jpg", "z.jpg")])
    updated = store.set_duplicates(a.id, [("x.jpg", 1, "x.jpg", "exact"), ("y.jpg", 1, "x.jpg", "exact"),
                                          ("gone.jpg", 2, "gone.jpg", "near")])  # not an item of the job: skipped
    assert updated == 2
    rows = {r.path: (r.duplicate_group, r.duplicate_of, r.duplicate_kind) for r in store.records(a.id)}
    assert rows == {"x.jpg": (1, "x.jpg", "exact"), "y.jpg": (1, "x.jpg", "exact"), "z.jpg": (None, None, None)}
    assert all(r.duplicate_group is None for r in store.records(b.id))
    assert store.counts(a.id) == {"regular": 3}
    # a search again (a retried job): groups it no longer finds are cleared, not kept beside the new ones
    assert store.set_duplicates(a.id, [("y.jpg", 1, "y.jpg", "near"), ("z.jpg", 1, "y.jpg", "near")]) == 2
    rows = {r.path: (r.duplicate_group, r.duplicate_of, r.duplicate_kind) for r in store.records(a.id)}
    assert rows == {"x.jpg": (None, None, None), "y.jpg": (1, "y.jpg", "near"), "z.jpg": (1, "y.jpg", "near")}


def test_a_file_from_before_the_summary_column_gets_it_backfilled_for_the_review_grid(tmp_path):
    path = tmp_path / "jobs.sqlite"
    store = JobStore(path)
    job = store.create("src", None, "resnest", tmp_path)
    results = [QCResult(path="a.jpg", label=Label.REGULAR, kind=None, resnest_prob=0.2, deep_sad_score=0.5,
                        colour_score=0.3, cervix_box=[1.0, 2.0, 3.0, 4.0], width=10, height=8),
               QCResult(path="b.jpg", label=Label.UNREADABLE, error="not an image")]
    store.add_items(job.id, results)
    fresh = store.summaries(job.id)
    with sqlite3.connect(path) as db:  # make it look like a version-1 file
        db.execute("ALTER TABLE items DROP COLUMN summary")
        db.execute("PRAGMA user_version = 1")
    assert JobStore(path).summaries(job.id) == fresh
    assert [(s.path, s.resnest_prob, s.colour_score, s.cervix_box, s.error) for s in fresh] == [
        ("a.jpg", 0.2, 0.3, [1.0, 2.0, 3.0, 4.0], None), ("b.jpg", None, None, None, "not an image")]
    with sqlite3.connect(path) as db:  # a version-2 file: summaries without colour_score
        db.execute("UPDATE items SET summary = json_remove(summary, '$[3]')")
        db.execute("PRAGMA user_version = 2")
    assert JobStore(path).summaries(job.id) == fresh


def test_a_job_whose_photos_all_have_rows_says_it_is_finding_duplicates_and_writing_its_files(tmp_path):
    """After its last batch a job's duplicate search and exports ran with the job reading
    `running`, progress 1.0 and ETA 0 and nothing else: 11 s after 805 real photos, as if
    stuck (an audit). Its step says what it does, while it does it, and only then."""
    import threading

    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline
    from service.gate import EngineGate
    from service.jobs.runner import FINISHING, JobRunner
    from service.metrics import Metrics
    from tests.qc_fixtures import fuzz_set, tiny_weights

    root = tmp_path / "photos"
    root.mkdir()
    ok = fuzz_set()["ok.jpg"][0]
    for i in range(6):
        (root / f"p{i}.jpg").write_bytes(ok + bytes([i]))
    store = JobStore(tmp_path / "jobs.sqlite")
    engine = QCPipeline(tiny_weights(tmp_path / "w", 0.0), QCConfig(device="cpu"))
    runner = JobRunner(store, lambda paths, names, policy: engine.run(paths, names, policy=policy), EngineGate(),
                       Metrics(), [root], tmp_path / "quarantine", batch_size=2)
    job = store.create(str(root), None, "resnest", tmp_path / "out")
    seen: list[tuple[str | None, int, str]] = []  # (step, rows stored, status) at each look
    runner.start()
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            # in this order: a step read after the status is of a job still running, and rows read
            # after the step hold every row the step had seen stored
            status = store.status(job.id)
            step = runner.step(job.id)
            seen.append((step, sum(_group_by(store.path, job.id).values()), status))
            if status == "done":
                break
            time.sleep(0.001)
    finally:
        runner.stop()
    assert seen[-1] == (None, 6, "done")
    finishing = [s for s in seen if s[0] == FINISHING]
    assert finishing, "the finishing step was never seen"
    assert all(rows == 6 and status == "running" for _, rows, status in finishing)
    assert all(step is None for step, rows, _ in seen if rows < 6)
    assert not any(t.name == "job-runner" and t.is_alive() for t in threading.enumerate())


def test_the_runner_outlives_a_store_locked_past_its_timeout_and_then_finishes_the_job(tmp_path, caplog):
    """Another writer holds the database for longer than the store waits: the runner thread
    lives on, the job stays active, and once the lock goes the job finishes with every row."""
    import logging
    import threading
    import time

    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline
    from service.gate import EngineGate
    from service.jobs.runner import JobRunner
    from service.metrics import Metrics
    from tests.qc_fixtures import fuzz_set, tiny_weights

    root = tmp_path / "photos"
    root.mkdir()
    ok = fuzz_set()["ok.jpg"][0]
    for i in range(6):
        (root / f"p{i}.jpg").write_bytes(ok + bytes([i]))
    store = JobStore(tmp_path / "jobs.sqlite", busy_timeout_s=0.2)
    engine = QCPipeline(tiny_weights(tmp_path / "w", 0.0), QCConfig(device="cpu"))
    runner = JobRunner(store, lambda paths, names, policy: engine.run(paths, names, policy=policy), EngineGate(),
                       Metrics(), [root], tmp_path / "quarantine", batch_size=2)
    job = store.create(str(root), None, "resnest", tmp_path / "out")
    locker = sqlite3.connect(store.path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # the runner's first write (queued -> running) must wait it out
    caplog.set_level(logging.WARNING, logger="service.jobs.runner")
    runner.start()
    try:
        deadline = time.time() + 30
        while "job store unavailable" not in caplog.text and time.time() < deadline:
            time.sleep(0.05)
        assert "job store unavailable" in caplog.text, "the lock never reached the runner"
        time.sleep(1.5)
        assert runner.alive() and store.get(job.id).status in ("queued", "running")
        # said, not only logged
        assert "the job store cannot take its rows (database is locked)" in runner.waiting(job.id)
        locker.execute("COMMIT")
        while store.get(job.id).status != "done" and time.time() < deadline + 30:
            time.sleep(0.1)
        assert store.get(job.id).status == "done" and runner.alive() and runner.waiting(job.id) is None
        assert sum(_group_by(store.path, job.id).values()) == 6
    finally:
        locker.close()
        runner.stop()
        assert not any(t.name == "job-runner" and t.is_alive() for t in threading.enumerate())


def test_a_source_that_disappears_mid_job_fails_the_job_instead_of_storing_missing_files(tmp_path):
    """The folder goes away during the first batch (an unmounted share): that batch is not
    stored as rows of missing files, the job fails saying so, and retried once the folder is
    back, the same job gives every row."""
    import time

    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline
    from service.gate import EngineGate
    from service.jobs.runner import JobRunner
    from service.metrics import Metrics
    from tests.qc_fixtures import fuzz_set, tiny_weights

    root, away = tmp_path / "share", tmp_path / "unmounted"
    root.mkdir()
    ok = fuzz_set()["ok.jpg"][0]
    for i in range(6):
        (root / f"p{i}.jpg").write_bytes(ok + bytes([i]))
    engine = QCPipeline(tiny_weights(tmp_path / "w", 0.0), QCConfig(device="cpu"))

    def run_batch(paths, names, policy):
        if root.exists() and len(list(root.iterdir())) == 6 and not (tmp_path / "once").exists():
            (tmp_path / "once").touch()
            root.rename(away)  # gone before this batch reads its files
        return engine.run(paths, names, policy=policy)

    store = JobStore(tmp_path / "jobs.sqlite")
    runner = JobRunner(store, run_batch, EngineGate(), Metrics(), [tmp_path], tmp_path / "q", batch_size=2)
    job = store.create(str(root), None, "resnest", tmp_path / "out")
    runner.start()
    try:
        deadline = time.time() + 60
        while store.get(job.id).status not in ("done", "failed") and time.time() < deadline:
            time.sleep(0.05)
        failed = store.get(job.id)
        assert failed.status == "failed" and "source disappeared after 0 of 6 files" in failed.error
        assert sum(_group_by(store.path, job.id).values()) == 0
        away.rename(root)
        assert store.requeue(job.id) and not store.requeue(job.id)  # queued now: not twice
        runner.wake()
        while store.get(job.id).status not in ("done", "failed") and time.time() < deadline:
            time.sleep(0.05)
        assert store.get(job.id).status == "done" and _group_by(store.path, job.id) == {"non_regular": 6}
        assert not store.requeue(job.id)  # a finished job is not retried
    finally:
        runner.stop()


def _wait_finished(store, job_ids, seconds=60):
    deadline = time.time() + seconds
    while any(store.get(j).status not in ("done", "failed") for j in job_ids) and time.time() < deadline:
        time.sleep(0.05)
    return [store.get(j) for j in job_ids]


def test_a_job_whose_results_files_find_no_room_fails_saying_so_and_a_retry_writes_them(tmp_path):
    """It failed with a bare "[Errno 28] No space left on device", not saying that the results
    export met it (an audit)."""
    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline
    from service.gate import EngineGate
    from service.jobs.runner import JobRunner
    from service.metrics import Metrics
    from tests.qc_fixtures import fuzz_set, tiny_weights
    from tests.small_disk import fill, small_tmpfs

    root = tmp_path / "photos"
    root.mkdir()
    for i in range(6):
        (root / f"p{i}.jpg").write_bytes(fuzz_set()["ok.jpg"][0] + bytes([i]))
    store, engine = JobStore(tmp_path / "jobs.sqlite"), QCPipeline(tiny_weights(tmp_path / "w", 0.0), QCConfig())
    with small_tmpfs(tmp_path / "out", "1m") as out:
        fill(out)
        job = store.create(str(root), None, "resnest", out)
        runner = JobRunner(store, lambda paths, names, policy: engine.run(paths, names, policy=policy),
                           EngineGate(), Metrics(), [root], tmp_path / "quarantine", batch_size=4)
        runner.start()
        try:
            (failed,) = _wait_finished(store, [job.id])
            assert failed.status == "failed" and "the results files could not be written" in failed.error, failed
            assert sum(store.counts(job.id).values()) == 6  # the rows are kept
            (out / "filler").unlink()
            assert store.requeue(job.id)
            runner.wake()
            (done,) = _wait_finished(store, [job.id])
            assert done.status == "done" and (out / job.id / "results.csv").is_file(), done
        finally:
            runner.stop()


def test_a_resumed_job_reads_only_the_files_it_has_no_row_for(tmp_path):
    """README: a stopped job resumes reading only the files without a row; one that read them
    all again paid hours on a large share for nothing (a mutation: no test saw it)."""
    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline
    from service.gate import EngineGate
    from service.jobs.runner import JobRunner
    from service.metrics import Metrics
    from tests.qc_fixtures import fuzz_set, tiny_weights

    root = tmp_path / "photos"
    root.mkdir()
    for i in range(6):
        (root / f"p{i}.jpg").write_bytes(fuzz_set()["ok.jpg"][0] + bytes([i]))
    store, engine = JobStore(tmp_path / "jobs.sqlite"), QCPipeline(tiny_weights(tmp_path / "w", 0.0), QCConfig())
    job = store.create(str(root), None, "resnest", tmp_path / "out")
    store.claim_models(job.id, json.dumps(engine.decision["models"], sort_keys=True))
    store.add_items(job.id, engine.run([root / f"p{i}.jpg" for i in range(3)], [f"p{i}.jpg" for i in range(3)]))
    seen: list[str] = []

    def run_batch(data, names, policy):
        seen.extend(names)
        return engine.run(data, names, policy=policy)

    runner = JobRunner(store, run_batch, EngineGate(), Metrics(), [root], tmp_path / "q", batch_size=2,
                       decision=engine.decision)
    runner.start()
    try:
        assert _wait_finished(store, [job.id])[0].status == "done"
    finally:
        runner.stop()
    assert sorted(seen) == ["p3.jpg", "p4.jpg", "p5.jpg"] and sum(store.counts(job.id).values()) == 6


def test_failing_job_batches_are_counted_and_make_the_engine_failing(tmp_path):
    """An overnight job whose every batch failed left /readyz ready and counted nothing, with no
    uploads coming in to tell (a mutation: no test saw it)."""
    from prometheus_client import generate_latest

    from service.engine_health import EngineHealth
    from service.gate import EngineGate
    from service.jobs.runner import JobRunner
    from service.metrics import Metrics

    root = tmp_path / "photos"
    root.mkdir()
    (root / "p.jpg").write_bytes(b"any bytes")
    store, metrics = JobStore(tmp_path / "jobs.sqlite"), Metrics()
    health = EngineHealth(metrics.engine_errors)

    def run_batch(data, names, policy):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    jobs = [store.create(str(root), None, "resnest", tmp_path / "out").id for _ in range(3)]
    runner = JobRunner(store, run_batch, EngineGate(), metrics, [root], tmp_path / "q", batch_size=2, health=health)
    runner.start()
    try:
        assert {j.status for j in _wait_finished(store, jobs)} == {"failed"}
    finally:
        runner.stop()
    assert health.failing() == "the last 3 engine calls failed (RuntimeError)"
    scraped = generate_latest(metrics.registry).decode()
    assert re.search(r'^cervixqc_engine_errors_total\{origin="job"\} 3\.0$', scraped, re.M), scraped


def test_the_active_jobs_gauge_counts_every_queued_and_running_job_at_each_scrape(tmp_path):
    """Set only when the runner took a job up, it read 1 while three more queued behind it."""
    from prometheus_client import generate_latest

    from service.metrics import Metrics

    store, metrics = JobStore(tmp_path / "jobs.sqlite"), Metrics()
    metrics.count_jobs(store.count_by_status)
    scrape = lambda: re.search(r"^cervixqc_jobs_active (\S+)$", generate_latest(metrics.registry).decode(), re.M)[1]  # noqa: E731
    jobs = [store.create("src", None, "resnest", tmp_path) for _ in range(4)]
    store.transition(jobs[0].id, "running")
    assert float(scrape()) == 4
    store.transition(jobs[0].id, "running")  # done ends a running job only
    store.transition(jobs[0].id, "done")
    assert float(scrape()) == 3


def _photos_store_engine(tmp_path, n: int):
    """What a job runner's test needs: a folder of n distinct photos, a job store, and an engine
    on tiny weights."""
    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline
    from tests.qc_fixtures import fuzz_set, tiny_weights

    root = tmp_path / "photos"
    root.mkdir()
    for i in range(n):
        (root / f"p{i}.jpg").write_bytes(fuzz_set()["ok.jpg"][0] + bytes([i]))
    engine = QCPipeline(tiny_weights(tmp_path / "w", 0.0), QCConfig(device="cpu"))
    return root, JobStore(tmp_path / "jobs.sqlite"), engine


def test_a_cancel_during_a_batch_stores_nothing_more_and_one_after_a_batch_runs_no_other(tmp_path):
    """The runner looks at the job's status after each batch runs (a cancel that landed during
    it: the batch is not stored, nor copied into the quarantine) and before the next (not run).
    Each check alone was covered only by the other: removing either passed every test (a
    mutation). The real engine runs; the wrappers cancel where a user's click would land."""
    from service.gate import EngineGate
    from service.jobs.runner import JobRunner
    from service.metrics import Metrics

    root, store, engine = _photos_store_engine(tmp_path, 6)
    during, after = (store.create(str(root), f"q-{k}", "resnest", tmp_path / f"out-{k}") for k in ("during", "after"))
    runs = {during.id: 0, after.id: 0}

    def run_batch(data, names, policy):
        job = during.id if runner.holds(during.id) else after.id  # the job the runner is on
        runs[job] += 1
        if job == during.id:
            store.cancel(job)  # clicked while the engine ran this batch
        return engine.run(data, names, policy=policy)

    add_items = store.add_items

    def add_then_cancel(job_id, results):
        add_items(job_id, results)
        if job_id == after.id:
            store.cancel(job_id)  # clicked just after the first batch was stored

    store.add_items = add_then_cancel
    runner = JobRunner(store, run_batch, EngineGate(), Metrics(), [tmp_path], tmp_path / "q", batch_size=2)
    runner.start()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and (runs[after.id] == 0 or store.status(after.id) != "cancelled"
                                          or runner.holds(after.id)):
            time.sleep(0.05)
    finally:
        runner.stop()
    assert (store.status(during.id), store.status(after.id)) == ("cancelled", "cancelled")
    assert runs == {during.id: 1, after.id: 1}
    assert sum(store.counts(during.id).values()) == 0 and sum(store.counts(after.id).values()) == 2
    assert not any((tmp_path / "q" / "q-during").rglob("*.jpg"))  # no copy of the batch not stored


def test_a_job_begun_by_other_models_or_thresholds_is_not_resumed_under_these(tmp_path):
    """A job stopped by a restart with new weights went on under them: its results mixed two
    models' labels, and nothing said which rows were whose."""
    from service.gate import EngineGate
    from service.jobs.runner import JobRunner
    from service.metrics import Metrics

    root, store, engine = _photos_store_engine(tmp_path, 3)
    begun, fresh, older, recalibrated, unrecorded, carded, uncarded = (
        store.create(str(root), None, "resnest", tmp_path / "out") for _ in range(7))
    store.claim_models(begun.id, json.dumps({"detector": "0" * 64}))  # as the weights before the restart
    # the same networks with a threshold chosen again since (`cervixqc calibrate-stage2`)
    moved = json.loads(json.dumps(engine.decision["thresholds"]))
    moved["deep_sad"]["distance"] += 0.5
    store.claim_models(recalibrated.id, json.dumps({"models": engine.decision["models"], "thresholds": moved}))
    # begun under a findings card these weights do not have: its rows' flags were another card's
    store.claim_models(carded.id, json.dumps({k: engine.decision[k] for k in ("models", "thresholds")}
                                             | {"findings": {"scores_version": 2, "thresholds": {"blur": 0.5}}}))
    # begun by a version that recorded no findings card: taken as under this one, resumed, completed
    store.claim_models(uncarded.id, json.dumps({k: engine.decision[k] for k in ("models", "thresholds")}))
    # begun by a version that recorded the sha256s alone: these models, so resumed, its record completed
    store.claim_models(unrecorded.id, json.dumps(engine.decision["models"], sort_keys=True))
    store.add_items(unrecorded.id, engine.run([root / "p0.jpg"], ["p0.jpg"]))
    # rows stored by a version that recorded no models (schema < 4): they were claimed as these
    store.add_items(older.id, engine.run([root / "p0.jpg"], ["p0.jpg"]))
    runner = JobRunner(store, lambda paths, names, policy: engine.run(paths, names, policy=policy), EngineGate(),
                       Metrics(), [root], tmp_path / "quarantine", batch_size=2, decision=engine.decision)
    runner.start()
    try:
        deadline = time.time() + 60
        while ({store.get(j).status for j in (fresh.id, unrecorded.id, uncarded.id)} != {"done"}
               and time.time() < deadline):
            time.sleep(0.1)
    finally:
        runner.stop()
    for job in (begun, recalibrated, carded):
        assert store.get(job.id).status == "failed" and "begun by other models" in store.get(job.id).error
    assert store.get(older.id).status == "failed" and store.get(older.id).models is None
    assert "begun by a version that did not record its models, 1 rows stored" in store.get(older.id).error
    assert store.counts(begun.id) == {} and sum(store.counts(fresh.id).values()) == 3
    labelled_by = {k: engine.decision[k] for k in ("models", "thresholds", "findings")}
    assert json.loads(store.get(fresh.id).models) == labelled_by
    assert json.loads(store.get(uncarded.id).models) == labelled_by and sum(store.counts(uncarded.id).values()) == 3
    assert json.loads(store.get(unrecorded.id).models) == labelled_by and sum(store.counts(unrecorded.id).values()) == 3
    # not once a site has chosen thresholds again: the old rows' thresholds are then unknown
    older_record = store.create(str(root), None, "resnest", tmp_path / "out")
    store.claim_models(older_record.id, json.dumps(engine.decision["models"], sort_keys=True))
    store.add_items(older_record.id, engine.run([root / "p0.jpg"], ["p0.jpg"]))
    runner = JobRunner(store, lambda paths, names, policy: engine.run(paths, names, policy=policy), EngineGate(),
                       Metrics(), [root], tmp_path / "quarantine", batch_size=2,
                       decision=engine.decision | {"site_calibrated": ["deep_sad"]})
    runner.start()
    try:
        deadline = time.time() + 60
        while store.get(older_record.id).status != "failed" and time.time() < deadline:
            time.sleep(0.1)
    finally:
        runner.stop()
    assert "begun by other models, thresholds or quality findings' card" in store.get(older_record.id).error


def test_a_job_whose_rows_were_flagged_under_another_findings_card_is_not_resumed_without_it(tmp_path):
    """A job an older cervixqc (which recorded no findings card) stopped was resumed under
    weights without its card: 48 rows kept their old flags beside 252 without any, and the job
    said it was labelled by no card (an audit)."""
    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline
    from pipelines.engine.qc_result import FINDINGS
    from service.gate import EngineGate
    from service.jobs.runner import JobRunner
    from service.metrics import Metrics
    from tests.qc_fixtures import tiny_weights

    root, store, engine = _photos_store_engine(tmp_path, 3)
    carded = QCPipeline(tiny_weights(tmp_path / "wf", 0.0, findings=dict.fromkeys(FINDINGS, 0.5)),
                        QCConfig(device="cpu"))
    older = {k: engine.decision[k] for k in ("models", "thresholds")}  # as recorded before findings were
    jobs = []
    for under in (engine, carded):  # one job each, queued once the runner before has stopped
        job = store.create(str(root), None, "resnest", tmp_path / "out")
        store.claim_models(job.id, json.dumps(older))
        store.add_items(job.id, carded.run([root / "p0.jpg"], ["p0.jpg"]))  # flagged under the card
        assert [set(r.findings) for _, r in store.item_records(job.id)] == [set(FINDINGS)]
        jobs.append(job)
        runner = JobRunner(store, lambda paths, names, policy, e=under: e.run(paths, names, policy=policy),
                           EngineGate(), Metrics(), [root], tmp_path / "quarantine", batch_size=2,
                           decision=under.decision)
        runner.start()
        try:
            deadline = time.time() + 60
            while store.get(job.id).status not in ("done", "failed") and time.time() < deadline:
                time.sleep(0.1)
        finally:
            runner.stop()
    assert store.get(jobs[0].id).status == "failed"
    assert "begun by other models, thresholds or quality findings' card" in store.get(jobs[0].id).error
    assert sum(store.counts(jobs[0].id).values()) == 1
    # under the card its rows were judged by: resumed, and its record completed
    assert store.get(jobs[1].id).status == "done", store.get(jobs[1].id).error
    assert sum(store.counts(jobs[1].id).values()) == 3
    assert json.loads(store.get(jobs[1].id).models)["findings"] == carded.decision["findings"]


def test_the_jobs_gauge_counts_every_status_at_each_scrape(tmp_path):
    """A failed job was visible only by listing the jobs."""
    from prometheus_client import generate_latest

    from service.metrics import Metrics

    store, metrics = JobStore(tmp_path / "jobs.sqlite"), Metrics()
    metrics.count_jobs(store.count_by_status)
    jobs = [store.create("src", None, "resnest", tmp_path) for _ in range(3)]
    store.transition(jobs[0].id, "failed", error="x")
    store.cancel(jobs[1].id)
    text = generate_latest(metrics.registry).decode()
    got = {m[1]: float(m[2]) for m in re.finditer(r'^cervixqc_jobs\{status="(\w+)"\} (\S+)$', text, re.M)}
    assert got == {"queued": 1, "running": 0, "done": 0, "failed": 1, "cancelled": 1}


def test_a_store_of_a_newer_version_is_refused_and_left_as_it_was(tmp_path):
    """The older code rewrote the newer store's schema version down and ignored what it
    records (a job's models), so a downgrade could mix two models' labels."""
    from service.jobs.store import SCHEMA_VERSION, StoreVersionError, store_problem

    path = tmp_path / "jobs.sqlite"
    JobStore(path)
    assert store_problem(path) is None
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreVersionError, match=f"schema v{SCHEMA_VERSION + 1}; this version reads up to"):
        JobStore(path)
    assert f"v{SCHEMA_VERSION + 1}" in store_problem(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    db.close()


def test_a_damaged_store_is_refused_as_it_is_however_the_service_is_started(tmp_path):
    """`serve` checks before the models load; a service started by uvicorn itself upgraded a
    damaged file and kept the damage as its backup (an audit)."""
    from service.jobs.store import StoreDamaged

    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create("src", None, "resnest", tmp_path)
    store.add_items(job.id, [QCResult(path=f"{i}.jpg", label=Label.REGULAR) for i in range(3000)])
    store.close()
    data = store.path.read_bytes()
    store.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreDamaged, match=r"jobs.sqlite is damaged \(.+\); nothing was changed"):
        JobStore(store.path)
    assert store.path.read_bytes() == data[: len(data) // 2] and not list(tmp_path.glob("*.bak"))


def test_a_store_cut_to_nothing_beside_its_jobs_folders_is_refused_and_a_new_empty_one_is_not(tmp_path):
    """SQLite opens a 0-byte file as a new store: the service started with no jobs, their
    results folders orphaned, without a word (an audit)."""
    from service.jobs.store import StoreDamaged, store_problem

    store = JobStore(tmp_path / "jobs.sqlite")
    store.create("src", None, "resnest", tmp_path / "jobs")
    store.close()
    store._db().close()  # as the service's process ends
    (tmp_path / "jobs" / "0123456789abcdef").mkdir(parents=True)  # as the job runner makes a job's folder
    os.truncate(store.path, 0)
    with pytest.raises(StoreDamaged, match=r"jobs.sqlite is empty \(0 bytes\) while 1 job results folder"):
        JobStore(store.path)
    assert "is empty (0 bytes)" in store_problem(store.path) and store.path.stat().st_size == 0
    fresh = tmp_path / "fresh" / "jobs.sqlite"  # a start that stopped before its first write
    fresh.parent.mkdir()
    fresh.touch()
    assert store_problem(fresh) is None and JobStore(fresh).list() == []


def test_a_file_the_os_could_not_read_is_read_again_when_its_done_job_is_retried(tmp_path):
    """A share briefly away left `cannot read file` rows in a done job for good: `retry` took
    only failed or cancelled jobs, and a resumed job skipped every stored row. `clean` reruns
    read such files again; jobs now do too, replacing the row and moving the label counts."""
    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline
    from service.gate import EngineGate
    from service.jobs.runner import JobRunner
    from service.metrics import Metrics
    from tests.qc_fixtures import fuzz_set, tiny_weights

    ok, empty = fuzz_set()["ok.jpg"][0], fuzz_set()["zero.jpg"][0]
    root, clean_root = tmp_path / "photos", tmp_path / "clean"
    (root / ".away").mkdir(parents=True)
    clean_root.mkdir()
    (root / "p0.jpg").write_bytes(ok)
    (root / "empty.jpg").write_bytes(empty)  # read, and no image: stays done
    (root / "late.jpg").symlink_to(root / ".away" / "late.jpg")  # not there yet: cannot read file
    (clean_root / "p0.jpg").write_bytes(ok)
    store = JobStore(tmp_path / "jobs.sqlite")
    engine = QCPipeline(tiny_weights(tmp_path / "w", 0.0), QCConfig(device="cpu"))
    runner = JobRunner(store, lambda paths, names, policy: engine.run(paths, names, policy=policy), EngineGate(),
                       Metrics(), [root, clean_root], tmp_path / "quarantine", batch_size=2,
                       decision=engine.decision)

    def run_to_done(job_id):
        deadline = time.time() + 60
        while store.get(job_id).status != "done" and time.time() < deadline:
            runner.wake()
            time.sleep(0.1)
        assert store.get(job_id).status == "done"

    job, other = store.create(str(root), None, "resnest", tmp_path / "out"), store.create(
        str(clean_root), None, "resnest", tmp_path / "out")
    runner.start()
    try:
        run_to_done(job.id)
        run_to_done(other.id)
        rows = {r.path: r for r in store.records(job.id)}
        assert rows["late.jpg"].error.startswith("cannot read file") and store.counts(job.id)["unreadable"] == 2
        assert not store.requeue(other.id)  # done, nothing to read again
        assert store.has_read_again(job.id) and not store.has_read_again(other.id)
        (root / ".away" / "late.jpg").write_bytes(ok)
        assert store.requeue(job.id)
        run_to_done(job.id)
    finally:
        runner.stop()
    rows = {r.path: r for r in store.records(job.id)}
    assert rows["late.jpg"].label != Label.UNREADABLE and rows["empty.jpg"].error == "empty file (0 bytes)"
    counts = store.counts(job.id)
    assert counts["unreadable"] == 1 and sum(counts.values()) == 3 == len(rows)
    assert not store.requeue(job.id) and not store.has_read_again(job.id)


def test_a_job_store_deleted_or_replaced_under_the_service_takes_no_more_writes(tmp_path):
    """The open connections went on writing to the unlinked file: a job posted then was
    answered 202 and gone at the next start (an audit). Now every use is refused, as a store
    that is failing (an OperationalError: 503 `store_unavailable`, the runner waits)."""
    from service.jobs.reviews import ReviewStore

    path = tmp_path / "jobs.sqlite"
    store, reviews = JobStore(path), ReviewStore(path)
    job = store.create("src", None, "resnest", tmp_path / "jobs")
    path.unlink()
    with pytest.raises(sqlite3.OperationalError, match="jobs.sqlite was deleted or replaced while the service ran"):
        store.create("src", "q", "resnest", tmp_path / "jobs")
    with pytest.raises(sqlite3.OperationalError, match="deleted or replaced"):
        reviews.decide(job.id, 0, "a.jpg", "k1", "label", "regular", "iodine")
    JobStore(tmp_path / "other" / "jobs.sqlite").close()
    os.replace(tmp_path / "other" / "jobs.sqlite", path)  # a copy put back while the service runs
    with pytest.raises(sqlite3.OperationalError, match="deleted or replaced"):
        store.get(job.id)
    with pytest.raises(sqlite3.OperationalError, match="deleted or replaced"):  # readiness too: it was ready
        store.probe()
    assert JobStore(path).list() == []  # what the next start reads: the copy, nothing written into it since


def test_rows_of_files_deleted_before_a_resume_count_in_the_jobs_total(tmp_path):
    """A job resumed after some of its done files were deleted read "380 processed of 365",
    progress 1.04 (an audit): their rows stay (they were checked), so the total holds them."""
    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline
    from service.gate import EngineGate
    from service.jobs.runner import JobRunner
    from service.metrics import Metrics
    from tests.qc_fixtures import fuzz_set, tiny_weights

    root = tmp_path / "photos"
    (root / ".away").mkdir(parents=True)
    for name in ("p0.jpg", "p1.jpg", "p2.jpg", "gone.jpg"):
        (root / name).write_bytes(fuzz_set()["ok.jpg"][0])
    (root / "away.jpg").symlink_to(root / ".away" / "away.jpg")  # cannot read file: a retry reads it again
    store = JobStore(tmp_path / "jobs.sqlite")
    engine = QCPipeline(tiny_weights(tmp_path / "w", 0.0), QCConfig(device="cpu"))
    runner = JobRunner(store, lambda paths, names, policy: engine.run(paths, names, policy=policy), EngineGate(),
                       Metrics(), [root], tmp_path / "quarantine", batch_size=2, decision=engine.decision)

    def run_to_end(job_id: str):
        deadline = time.time() + 60
        while store.get(job_id).status not in ("done", "failed") and time.time() < deadline:
            runner.wake()
            time.sleep(0.1)
        return store.get(job_id)

    job = store.create(str(root), None, "resnest", tmp_path / "out")
    runner.start()
    try:
        assert run_to_end(job.id).total == 5
        (root / "gone.jpg").unlink()
        (root / "away.jpg").unlink()
        assert store.requeue(job.id)
        again = run_to_end(job.id)
    finally:
        runner.stop()
    assert again.status == "done" and sum(store.counts(job.id).values()) == again.total == 5, again


def test_a_deleted_job_store_is_not_created_again_empty_by_another_thread(tmp_path):
    """A metrics scrape (a worker thread, its own connection) created a deleted jobs.sqlite
    again, empty: the loss of every job looked like a fresh install."""
    import threading

    path = tmp_path / "jobs.sqlite"
    store = JobStore(path)
    path.unlink()
    errors = []

    def scrape():
        try:
            store.count_by_status()
        except sqlite3.Error as e:
            errors.append(e)

    t = threading.Thread(target=scrape)
    t.start()
    t.join()
    assert len(errors) == 1 and not path.exists()
    with pytest.raises(sqlite3.Error):  # the results download and the exports read on their own connection
        list(store.records("any"))
    assert not path.exists()


def test_a_job_cancelled_during_its_exports_is_held_by_the_runner_until_they_are_written(tmp_path):
    """Cancelled while its duplicate search and exports ran (no longer active), a job deleted
    then had its results folder written back by the runner's exports."""
    import shutil
    import threading

    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline
    from service.gate import EngineGate
    from service.jobs.runner import JobRunner
    from service.metrics import Metrics
    from tests.qc_fixtures import jpeg_bytes, textured_scene, tiny_weights

    root = tmp_path / "photos"
    root.mkdir()
    for i in range(80):  # distinct scenes: the pixel check reads them all after the last batch
        (root / f"p{i:02d}.jpg").write_bytes(jpeg_bytes(textured_scene(i, (480, 360))))
    store = JobStore(tmp_path / "jobs.sqlite")
    engine = QCPipeline(tiny_weights(tmp_path / "w", 0.0), QCConfig(device="cpu"))
    runner = JobRunner(store, lambda paths, names, policy: engine.run(paths, names, policy=policy), EngineGate(),
                       Metrics(), [root], tmp_path / "quarantine", batch_size=16)
    job = store.create(str(root), None, "resnest", tmp_path / "out")
    runner.start()
    try:
        deadline = time.time() + 120
        while sum(store.counts(job.id).values()) < 80 and time.time() < deadline:
            time.sleep(0.005)
        assert store.cancel(job.id), "the last batch is stored: the job is in its duplicate search"
        assert runner.holds(job.id)  # so DELETE answers 409 (service/routes/jobs.py)
        while runner.holds(job.id) and time.time() < deadline:
            time.sleep(0.01)
        assert not runner.holds(job.id) and store.get(job.id).status == "cancelled"
        assert store.delete(job.id)
        shutil.rmtree(tmp_path / "out" / job.id, ignore_errors=True)
        time.sleep(0.5)
        assert not (tmp_path / "out" / job.id).exists() and store.get(job.id) is None
    finally:
        runner.stop()
        assert not any(t.name == "job-runner" and t.is_alive() for t in threading.enumerate())


def test_a_deleted_job_leaves_no_rows_and_a_purge_cut_short_is_finished_at_the_next_open(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    a, b = store.create("src", None, "resnest", tmp_path), store.create("src", None, "resnest", tmp_path)
    for job in (a, b):
        store.add_items(job.id, [QCResult(path=f"{i}.jpg", label=Label.REGULAR) for i in range(25)])
    assert not store.delete(a.id)  # queued: cancel it first
    store.cancel(a.id)
    store.purge = lambda job_id, chunk=10_000: JobStore.purge(store, job_id, chunk=7)  # several chunks
    assert store.delete(a.id) and store.get(a.id) is None and a.id not in {j.id for j in store.list()}
    assert _group_by(store.path, a.id) == {} and store.counts(b.id) == {"regular": 25}
    with sqlite3.connect(store.path) as db:  # b deleted with its rows left, as by a kill mid-purge
        db.execute("UPDATE jobs SET status = 'deleted' WHERE id = ?", (b.id,))
    assert _group_by(store.path, b.id) == {"regular": 25}
    JobStore(store.path)
    assert _group_by(store.path, b.id) == {}
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 5  # an older version refuses the file


def _a_finished_job_on_a_full_disk(folder: Path) -> tuple[JobStore, object]:
    """A cancelled job of 1,500 rows in a store whose disk has room left for its status to
    change, not for the purge of its rows."""
    from tests.small_disk import fill

    store = JobStore(folder / "jobs.sqlite")
    job = store.create("src", None, "resnest", folder / "jobs")
    store.add_items(job.id, [QCResult(path=f"{i}.jpg", label=Label.REGULAR) for i in range(1500)])
    store.cancel(job.id)
    store._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    fill(folder, leave=24 * 1024)
    return store, job


def test_a_delete_on_a_full_disk_deletes_the_job_and_purges_its_rows_once_there_is_room(tmp_path):
    """The status moved, then the purge met the full disk and the service answered 503 "nothing
    changed, retry" for a job already gone (an audit): the delete stands, the rows wait. They
    waited for the next start, even after the disk had room again."""
    from tests.small_disk import small_tmpfs

    with small_tmpfs(tmp_path / "state", "8m") as folder:
        store, job = _a_finished_job_on_a_full_disk(folder)
        assert store.delete(job.id) and store.get(job.id) is None
        assert _group_by(store.path, job.id) == {"regular": 1500}  # the purge did not fit
        JobStore(store.path).close()  # started while still full: its purge waits again (a traceback stopped it)
        store.purge_deferred()
        assert _group_by(store.path, job.id) == {"regular": 1500}
        (folder / "filler").unlink()
        store.purge_deferred()
        assert _group_by(store.path, job.id) == {}
        store.purge_deferred()  # nothing left to do


def test_a_store_stopped_cleanly_opens_again_on_a_full_disk_and_says_it_is_not_ready(tmp_path):
    """Every start wrote the schema version, whether it had changed or not: on a full state disk
    the service then ended its start in a traceback, where readiness says 503 and jobs wait
    for room (an audit)."""
    from tests.small_disk import fill, small_tmpfs

    with small_tmpfs(tmp_path / "state", "8m") as folder:
        store = JobStore(folder / "jobs.sqlite")
        job = store.create("src", None, "resnest", folder / "jobs")
        store.add_items(job.id, [QCResult(path=f"{i}.jpg", label=Label.REGULAR) for i in range(100)])
        store.close()  # a clean stop: SQLite's log emptied, so any write needs new room
        fill(folder)
        again = JobStore(folder / "jobs.sqlite")
        assert again.get(job.id).status == "queued" and again.counts(job.id) == {"regular": 100}
        with pytest.raises(OSError, match="MiB free"):
            again.probe()


def test_the_idle_job_runner_finishes_a_purge_the_full_disk_deferred(tmp_path):
    from service.gate import EngineGate
    from service.jobs.runner import JobRunner
    from service.metrics import Metrics
    from tests.small_disk import small_tmpfs

    with small_tmpfs(tmp_path / "state", "8m") as folder:
        store, job = _a_finished_job_on_a_full_disk(folder)
        assert store.delete(job.id) and _group_by(store.path, job.id) == {"regular": 1500}
        runner = JobRunner(store, lambda *batch: pytest.fail("no job is queued"), EngineGate(), Metrics(),
                           [tmp_path], tmp_path / "q", batch_size=2)
        runner.start()
        try:
            time.sleep(1.5)
            assert _group_by(store.path, job.id) == {"regular": 1500} and runner.alive()
            (folder / "filler").unlink()
            deadline = time.time() + 30
            while _group_by(store.path, job.id) and time.time() < deadline:
                time.sleep(0.2)
            assert _group_by(store.path, job.id) == {}
        finally:
            runner.stop()
            store.close()


def test_a_delete_killed_after_the_items_finishes_the_counts_and_decisions_at_the_next_open(tmp_path):
    from service.jobs.reviews import ReviewStore

    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create("src", None, "resnest", tmp_path)
    store.add_items(job.id, [QCResult(path="a.jpg", label=Label.REGULAR)])
    store.transition(job.id, "running")  # done ends a running job only
    store.transition(job.id, "done")
    ReviewStore(store.path).decide(job.id, 0, "a.jpg", "k1", "label", "regular", "iodine")
    with sqlite3.connect(store.path) as db:  # killed after the items' chunks: counts and decisions left
        db.execute("UPDATE jobs SET status = 'deleted' WHERE id = ?", (job.id,))
        db.execute("DELETE FROM items WHERE job_id = ?", (job.id,))
    JobStore(store.path)
    with sqlite3.connect(store.path) as db:
        left = [db.execute(f"SELECT count(*) FROM {t} WHERE job_id = ?", (job.id,)).fetchone()[0]
                for t in ("items", "label_counts", "decisions")]
    assert left == [0, 0, 0]


def test_folders_a_delete_left_behind_are_removed_at_the_next_start_and_live_jobs_keep_theirs(tmp_path):
    """A service killed between a delete's rows and its folders, or a thumbnail drawn while its
    job was being deleted, left folders no job owned, for good."""
    from service.jobs.folders import sweep_deleted

    store, thumbs = JobStore(tmp_path / "jobs.sqlite"), tmp_path / "thumbs"
    gone, kept = (store.create("src", None, "resnest", tmp_path / "out") for _ in range(2))
    for job in (gone, kept):
        store.transition(job.id, "running")  # done ends a running job only
        store.transition(job.id, "done")
        for folder in (Path(job.out_dir), thumbs / job.id):
            folder.mkdir(parents=True)
            (folder / "1-thumb.jpg").write_bytes(b"picture")
    (thumbs / "0123456789abcdef").mkdir()  # a job this store never had (restored from a backup)
    with sqlite3.connect(store.path) as db:  # deleted, then killed before its folders went
        db.execute("UPDATE jobs SET status = 'deleted' WHERE id = ?", (gone.id,))
    sweep_deleted(JobStore(store.path), thumbs)
    assert sorted(p.name for p in thumbs.iterdir()) == [kept.id]
    assert not Path(gone.out_dir).exists() and (Path(kept.out_dir) / "1-thumb.jpg").is_file()
    assert (thumbs / kept.id / "1-thumb.jpg").is_file()


def test_temporary_files_of_killed_writes_in_the_state_and_quarantine_folders_go_at_the_start(tmp_path):
    """A kill during the backup before an upgrade left a hidden copy of jobs.sqlite in the state
    folder at every start, and half-copied photos stayed in a quarantine no job started again."""
    from service.jobs.folders import sweep_killed_writes

    state, quarantine = tmp_path / "state", tmp_path / "elsewhere" / "quarantine"
    left = [state / ".0123456789abcdef.tmp", state / "jobs" / "j1" / ".00000000000000aa.tmp",
            quarantine / "q1" / "green" / ".00000000000000bb.tmp"]
    kept = [state / "jobs.sqlite", state / "jobs.sqlite.v5-20261201T000000Z.bak", quarantine / "q1" / "green" / "a.jpg"]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    sweep_killed_writes({"state": state, "quarantine": quarantine})
    assert all(p.exists() for p in left + kept)  # written just now: a live writer's, for all it knows
    sweep_killed_writes({"state": state, "quarantine": quarantine}, older_than_s=-1)
    assert [p for p in left if p.exists()] == [] and all(p.exists() for p in kept)


def test_a_copy_of_the_state_folder_writes_and_deletes_its_own_results_folders_and_an_upgrade_keeps_the_old_file(
        tmp_path):
    """out_dir was stored absolute: a service on a backup restored elsewhere (or a copy made to
    try something) finished the original's jobs into the original's results folders, and a
    DELETE there removed the original's (an audit). The upgrade that makes it relative keeps
    the file as it was: the older cervixqc refuses the upgraded one."""
    import shutil

    first = JobStore(tmp_path / "a" / "jobs.sqlite")
    job = first.create("src", None, "resnest", tmp_path / "a" / "jobs")
    assert first.get(job.id).out_dir == str(tmp_path / "a" / "jobs" / job.id)
    with sqlite3.connect(first.path) as db:  # as schema v5 stored it
        db.execute("UPDATE jobs SET out_dir = ? WHERE id = ?", (str(tmp_path / "a" / "jobs" / job.id), job.id))
        db.execute("PRAGMA user_version = 5")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = JobStore(tmp_path / "b" / "jobs.sqlite")
    assert copy.get(job.id).out_dir == str(tmp_path / "b" / "jobs" / job.id)
    new = copy.create("src", None, "resnest", tmp_path / "b" / "jobs")
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    assert JobStore(tmp_path / "c" / "jobs.sqlite").get(new.id).out_dir == str(tmp_path / "c" / "jobs" / new.id)
    (kept_path,) = (tmp_path / "b").glob("jobs.sqlite.v5-*.bak")  # named by the upgrade's time
    kept = sqlite3.connect(kept_path)
    try:
        assert kept.execute("PRAGMA user_version").fetchone()[0] == 5
        assert kept.execute("SELECT out_dir FROM jobs").fetchall() == [(str(tmp_path / "a" / "jobs" / job.id),)]
    finally:
        kept.close()


def test_a_store_on_a_full_or_read_only_disk_is_not_ready(tmp_path):
    """The write lock is granted on a full or read-only disk, and readiness said ready while
    every job and decision got 503 (an audit)."""
    from tests.small_disk import small_tmpfs

    with small_tmpfs(tmp_path / "state", "20m") as folder:
        store = JobStore(folder / "jobs.sqlite")
        store.probe()
        (folder / "filler").write_bytes(b"\0" * 10 * 2**20)
        with pytest.raises(OSError, match="the state folder has [0-9] MiB free"):
            store.probe()
        (folder / "filler").unlink()
        store.probe()  # ready again by itself
        # the folder read-only from now on (a read-only view over it: the store's open files keep it busy)
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
            with pytest.raises((OSError, sqlite3.Error), match="read-only|readonly"):  # SQLite's, or ours
                store.probe()
        finally:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_stopped_store_leaves_no_log_to_replay_onto_a_restored_copy(tmp_path):
    """A service stopped with SQLite's log beside the file: a backup copied over jobs.sqlite to
    go back a version got the log replayed onto it, and read as the file it replaced (an audit)."""
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create("src", None, "resnest", tmp_path)
    store.add_items(job.id, [QCResult(path=f"{i}.jpg", label=Label.REGULAR) for i in range(50)])
    assert (tmp_path / "jobs.sqlite-wal").stat().st_size > 0
    store.close()
    assert (tmp_path / "jobs.sqlite-wal").stat().st_size == 0
    assert _group_by(store.path, job.id) == {"regular": 50}  # folded into the file, not lost


def test_a_run_ending_after_its_job_was_cancelled_and_retried_leaves_the_retry_queued(tmp_path):
    """The cancelled run's last step (duplicates, exports) marked the retried, queued job done,
    and the retry never ran: a source emptied meanwhile came out `done`."""
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create("src", None, "deep_sad", tmp_path)
    assert store.transition(job.id, "running")
    assert store.cancel(job.id) and store.requeue(job.id)
    assert not store.transition(job.id, "done", finished=time.time())
    assert store.status(job.id) == "queued"
    assert store.transition(job.id, "running") and store.transition(job.id, "done", finished=time.time())
    assert store.status(job.id) == "done"


def test_two_jobs_asked_for_at_once_cannot_both_take_one_quarantine_for_two_sources(tmp_path):
    """The route checked the quarantine's owners, then inserted: two requests at once both
    passed, both were queued, and the second source's photos at the first's paths were never
    copied (46 of 60 simultaneous pairs in an audit)."""
    import threading

    from service.jobs.store import QuarantineInUse

    store = JobStore(tmp_path / "jobs.sqlite")
    for round_ in range(20):
        start, taken, refused = threading.Barrier(2), [], []

        def ask(source: str) -> None:
            start.wait()
            try:
                taken.append(store.create(source, f"q{round_}", "resnest", tmp_path / "out"))
            except QuarantineInUse as e:
                refused.append(e.args[0])

        threads = [threading.Thread(target=ask, args=(src,)) for src in ("/data/a", "/data/b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert (len(taken), refused) == (1, [f"q{round_}"]), (taken, refused)
    with pytest.raises(QuarantineInUse):  # a folder inside another source's
        store.create("/data/c", "q0/inner", "resnest", tmp_path / "out")
    owner = next(job.source for job in store.list(100) if job.quarantine == "q0")
    assert store.create(owner, "q0", "deep_sad", tmp_path / "out").quarantine == "q0"  # its source again may


def test_a_job_whose_batch_fails_as_the_service_stops_is_left_to_resume_not_failed(tmp_path):
    """The service stops its runner (waiting 30 s at most), then closes the engine: a batch still
    on the engine then failed, and its job was marked failed, to be retried by hand (an audit)."""
    import threading

    from service.gate import EngineGate
    from service.jobs.runner import JobRunner
    from service.metrics import Metrics

    root, store, engine = _photos_store_engine(tmp_path, 4)
    on_engine, closed = threading.Event(), threading.Event()

    def run_batch(paths, names, policy):  # the second batch is on the engine when the service stops
        if names[0] != "p0.jpg":
            on_engine.set()
            closed.wait(30)
        return engine.run(paths, names, policy=policy)

    job = store.create(str(root), None, "resnest", tmp_path / "out")
    runner = JobRunner(store, run_batch, EngineGate(), Metrics(), [root], tmp_path / "quarantine", batch_size=2,
                       decision=engine.decision)
    runner.start()
    assert on_engine.wait(60)
    runner.stop(timeout=0.2)  # as the lifespan's shutdown: gives up waiting, then closes the engine
    engine.close()
    closed.set()
    deadline = time.time() + 30
    while runner.alive() and time.time() < deadline:
        time.sleep(0.05)
    assert not runner.alive()
    assert store.get(job.id).status == "running" and store.get(job.id).error is None
    assert sum(store.counts(job.id).values()) == 2  # the first batch's rows, kept for the resume


def test_reading_a_jobs_rows_breaks_off_when_the_job_is_deleted_meanwhile(tmp_path):
    """The rows ran out and the download ended as if whole: a 200 with a results file that
    looked complete, cut short by a delete (an audit)."""
    from service.jobs.store import JobDeleted

    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create("src", None, "resnest", tmp_path)
    store.add_items(job.id, [QCResult(path=f"{i:03}.jpg", label=Label.REGULAR) for i in range(5)])
    store.transition(job.id, "running")
    store.transition(job.id, "done")
    rows = store.records(job.id, chunk=2)
    assert [next(rows).path for _ in range(2)] == ["000.jpg", "001.jpg"]
    assert store.delete(job.id)
    with pytest.raises(JobDeleted):
        next(rows)
    with pytest.raises(JobDeleted):  # deleted before the first read: not an empty job
        next(store.records(job.id))


def test_a_retry_beside_an_active_job_of_the_same_source_quarantine_and_policy_is_refused_naming_it(tmp_path):
    """Cancel X, create Y for the same folder, retry X: both ran from the start into one
    quarantine, though creating a third was refused as Y's twin (an audit)."""
    from service.jobs.store import ActiveTwin

    store = JobStore(tmp_path / "jobs.sqlite")
    first = store.create("src", "q", "deep_sad", tmp_path, once=True)
    assert store.cancel(first.id)
    second = store.create("src", "q", "deep_sad", tmp_path, once=True)
    with pytest.raises(ActiveTwin) as e:
        store.requeue(first.id)
    assert e.value.args[0] == second.id and store.status(first.id) == "cancelled"
    other = store.create("src", "q", "resnest", tmp_path, once=True)  # another policy: not a twin
    assert store.cancel(other.id) and store.requeue(other.id)
    assert store.cancel(second.id) and store.requeue(first.id)  # once the twin is no longer active
