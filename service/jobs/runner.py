"""The job runner: one background thread that cleans a job's files in small batches through
the same engine as the uploads, yielding to them before every batch (EngineGate).

On start it picks up jobs left `queued` or `running` by a previous process (kill -9
included) and skips the files already in the items table. Each file is checked against the
data roots again (a manifest row or a symlink may point anywhere): outside ones become
`unreadable` rows with the reason, never a read. Originals are only read; the quarantine
gets copies.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path

from pipelines.clean.exports import collection_duplicates, export_records
from pipelines.clean.inputs import list_inputs
from pipelines.clean.quarantine import drop_judged_copies, quarantine_results, to_copy
from pipelines.clean.state import findings_agree, recorded_before_findings
from pipelines.data.manifest import Spellings, name_spellings
from pipelines.data.opened import NotAllowed
from pipelines.data.schema import on_disk
from pipelines.engine.decode import DecodeError, DecodeLimits, read_file, unreadable
from pipelines.engine.qc_result import Label, QCResult
from pipelines.outputs import sweep_temporaries
from service.engine_health import EngineHealth
from service.gate import EngineGate
from service.jobs.store import Job, JobStore
from service.metrics import Metrics
from service.paths import inside, within

log = logging.getLogger(__name__)
PURGE_RETRY_S = 5.0
RunJobBatch = Callable[[list[bytes | Path], list[str], str], list[QCResult]]
# why a job begun by other models is not resumed, as its error and its refused retry say it
NOT_RESUMED = "resumed, its results could mix two models' labels; submit the source again as a new job"
# a running job's step once every photo has its row (`JobRunner.step`)
FINISHING = "finding duplicates and writing the results files"


def begun_by(claimed: str | None) -> str:
    """Who began a job whose models record (`claimed`) cannot be taken as these models'."""
    return ("a version that did not record its models" if claimed is None
            else "other models, thresholds or quality findings' card (the weights changed since)")


class JobRunner:
    def __init__(self, store: JobStore, run_batch: RunJobBatch, gate: EngineGate, metrics: Metrics,
                 roots: list[Path], quarantine_root: Path, batch_size: int,
                 quarantine_findings: Collection[str] = (), pixel_check: bool = True,
                 limits: DecodeLimits = DecodeLimits(), decision: dict | None = None,
                 health: EngineHealth | None = None) -> None:
        self.store, self.run_batch, self.gate, self.metrics = store, run_batch, gate, metrics
        self.health = health or EngineHealth(metrics.engine_errors)
        self.limits = limits
        # the engine's models, their thresholds and the findings' card (`QCPipeline.decision`
        # without the policy, which is the job's own): a job resumed under others would mix two
        # models' labels, or two cards' flags
        self.models = json.dumps({k: (decision or {}).get(k, {}) for k in ("models", "thresholds")}
                                 | {"findings": (decision or {}).get("findings")}, sort_keys=True)
        self.site_calibrated = bool((decision or {}).get("site_calibrated"))
        self.quarantine_findings, self.pixel_check = quarantine_findings, pixel_check
        self.roots, self.quarantine_root, self.batch_size = roots, quarantine_root, batch_size
        self.allowed = within(roots)  # the roots' check on each file opened
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
        # the job this runner holds, from before its first read until after its last write: a
        # job cancelled during its duplicate search and exports (minutes at scale) is no longer
        # active, and deleted then, the exports wrote its folder back (`holds`)
        self._holding: str | None = None
        self._waiting: tuple[str, str] | None = None  # (job, why) while the store turns the job away
        self._finishing: str | None = None  # the job whose duplicate search and exports are running
        self._next_purge = 0.0  # monotonic time of the next try at the purges the store deferred

    def start(self) -> None:
        self._thread.start()

    def _recorded_before(self, claimed: str, job_id: str) -> bool:
        """A record of these models made by a version that recorded less: before thresholds
        were recorded (they moved only with the models then, so the rows were labelled under
        the cards' trained thresholds; not under thresholds a site chose since, with
        calibrate-stage2), or before the findings' card was (taken as this one where the job's
        rows were judged under it: `findings_agree`)."""
        before, now = json.loads(claimed), json.loads(self.models)
        if before == now["models"]:
            recorded = not self.site_calibrated
        else:
            recorded = recorded_before_findings(before, now)
        return recorded and findings_agree(self.store.findings_of_rows(job_id), now)

    def begun_by_others(self, job: Job) -> str | None:
        """Why the job's stored rows cannot be resumed under these models (`_run` fails it
        then), None when they can: such a job was offered a Retry that failed it again the same
        way (an audit)."""
        claimed = job.models
        if claimed is None:
            return begun_by(None) if any(self.store.counts(job.id).values()) else None
        if claimed == self.models or self._recorded_before(claimed, job.id):
            return None
        return begun_by(claimed)

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def holds(self, job_id: str) -> bool:
        """Whether the runner may still write this job's rows or files (DELETE waits for it)."""
        return self._holding == job_id

    def waiting(self, job_id: str) -> str | None:
        """Why the job is not moving, while the job store cannot take its rows: a job on a full
        or read-only state disk showed `running` and nothing else (only the log said why)."""
        waiting = self._waiting
        return waiting[1] if waiting is not None and waiting[0] == job_id else None

    def step(self, job_id: str) -> str | None:
        """What a running job does once every photo has its row: its duplicate search and
        exports took 11 s after 805 real photos, and the job read `running`, progress 1.0 and
        ETA 0 all along, as if stuck (an audit)."""
        return FINISHING if self._finishing == job_id else None

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        """Never ends but by `stop`. Where the job store itself fails (locked past its busy
        timeout by another writer, disk full, I/O error), the job is not the one at fault: it
        stays as it is (`running`, its stored rows kept) and is taken up again after a back-off
        of 1 s doubling to 30 s; before, the error escaped the failure handler and ended the
        thread, leaving the job `running` and no job run until a restart."""
        backoff = 0.0
        while not self._stop.is_set():
            try:
                self._step()
                backoff = 0.0
            except sqlite3.OperationalError as e:
                backoff = min(30.0, max(1.0, 2 * backoff))
                log.warning("job store unavailable (%s); jobs resume in %.0f s", e, backoff)
                self._stop.wait(backoff)
            except Exception as e:  # noqa: BLE001 - a runner that dies runs no job until a restart
                log.error("job runner step failed (%s)", type(e).__name__)
                log.debug("job runner step failed", exc_info=True)
                self._stop.wait(1.0)

    def _step(self) -> None:
        job = self.store.next_active()
        if job is None:
            if time.monotonic() >= self._next_purge:  # a failing purge every 5 s at most, not every 1
                self._next_purge = time.monotonic() + PURGE_RETRY_S
                self.store.purge_deferred()
            self._wake.wait(1.0)
            self._wake.clear()
            return
        # held before `_run` reads anything: a job deleted between next_active and here is no
        # longer active, so `_run`'s first write (the move to running) does not take it
        self._holding, self._waiting = job.id, None
        try:
            self._run(job)
        except sqlite3.OperationalError as e:
            # the store's fault, not the job's: `_loop` waits and the job is taken up again
            self._waiting = (job.id, f"the job store cannot take its rows ({e}); it goes on by itself once it can")
            raise
        except Exception as e:  # noqa: BLE001 - a broken job must not stop the runner
            if self._stop.is_set():
                # shutting down: a batch still running when `stop` gave up waiting fails as the
                # engine closes under it, and the job was marked failed, to be retried by hand;
                # left `running`, the next start resumes it (an audit)
                log.info("job %s: stopped with the service (%s); resumed at the next start", job.id,
                         type(e).__name__)
                return
            # the kind only: the message (in the job's error, for keyed clients) names files
            log.error("job %s failed (%s)", job.id, type(e).__name__)
            log.debug("job %s failed", job.id, exc_info=True)
            self.store.transition(job.id, "failed", error=f"{type(e).__name__}: {e}", finished=time.time())
        finally:
            self._holding = None

    def _run(self, job: Job) -> None:
        src = Path(job.source)
        if not src.exists():
            self.store.transition(job.id, "failed", error="source no longer exists", finished=time.time())
            return
        if not inside(src, self.roots):  # checked when accepted; a folder swapped for a link out since then
            # had its file names listed as rows by a retry, though no file was read (an audit)
            self.store.transition(job.id, "failed", finished=time.time(), error=(
                "the source now lies outside the allowed data roots (replaced by a link?); nothing was read"))
            return
        root = job.root()
        inputs = list_inputs(src)
        if not inputs:  # emptied since it was accepted (a share unmounted under its mount point)
            self.store.transition(job.id, "failed", finished=time.time(),
                                  error="the source holds no files to clean (an unmounted share?); retry the job "
                                        "once they are back")
            return
        done, again = self.store.stored_paths(job.id)
        # rows of files gone from the source since they were stored count in the total, as they
        # count as processed: a resume after 35 deletions read 380 processed of 365 (an audit)
        gone = len(done) - sum(1 for p in inputs if p in done)
        done -= again
        now = time.time()
        # every stored row, those to be read again too: they count as processed all along
        stored = sum(self.store.counts(job.id).values())
        if not self.store.transition(job.id, "running", total=len(inputs) + gone, started=job.started or now,
                                     resumed_at=now, done_before_resume=stored):
            return  # cancelled meanwhile
        claimed = self.store.claim_models(job.id, self.models)
        if claimed is not None and claimed != self.models and self._recorded_before(claimed, job.id):
            claimed = self.store.replace_models(job.id, claimed, self.models)  # the record completed
        if claimed != self.models:
            log.warning("job %s: begun by other models; not resumed", job.id)
            self.store.transition(job.id, "failed", finished=time.time(),
                                  error=f"begun by {begun_by(claimed)}, {len(done)} rows stored: {NOT_RESUMED}")
            return
        log.info("job %s: %d files, %d already done", job.id, len(inputs), len(done))
        todo = [p for p in inputs if p not in done]
        qdir = self.quarantine_root / job.quarantine if job.quarantine else None
        spellings = Spellings(root) if src.is_file() else None  # a manifest's rows may name files spelt otherwise

        def told(near: str) -> bool:  # a file the hint names: inside the data roots only
            return inside(on_disk(root, near), self.roots)
        swept = sum(sweep_temporaries(d) for d in (qdir, Path(job.out_dir)) if d is not None and d.is_dir())
        if swept:
            log.info("job %s: removed %d temporary files an earlier, killed run left", job.id, swept)
        orphans = drop_judged_copies(self.store.pending_copies(job.id))  # of a batch stopped before its rows
        self.store.forget_pending(job.id)
        if orphans:
            log.info("job %s: removed %d quarantine copies of a batch stopped before its rows were stored",
                     job.id, orphans)
        for start in range(0, len(todo), self.batch_size):
            if self._stop.is_set():
                return  # left `running`: the next start resumes it
            if self.store.status(job.id) != "running":
                log.info("job %s: %s", job.id, self.store.status(job.id))
                return
            chunk = todo[start : start + self.batch_size]
            results = name_spellings(self._batch(root, chunk, job.policy), spellings, told)
            # cancelled while this batch ran: not stored. A cancel after this check lets this batch's
            # copies and rows be stored, one batch more than the cancel's answer counted (DELETE
            # waits for it: `holds`); the rows are right, and a retry reads none of them again
            if self.store.status(job.id) != "running":
                log.info("job %s: %s", job.id, self.store.status(job.id))
                return
            if not (src.exists() and root.is_dir()):  # an unmounted share: every file would read as missing
                done_now = len(done) + start
                log.warning("job %s: source gone after %d of %d files", job.id, done_now, len(inputs))
                self.store.transition(job.id, "failed", finished=time.time(),
                                      error=f"source disappeared after {done_now} of {len(inputs)} files "
                                            "(this batch was not stored); retry the job once it is back")
                return
            if qdir is not None:  # the roots checked again on the file copied: it may have become a link out
                self.store.copies_pending(job.id, to_copy(results, self.quarantine_findings), qdir)
                failed = quarantine_results(root, [r for r in results if r.error != OUTSIDE], qdir,
                                            self.quarantine_findings, link=False, allowed=self.allowed)
                self.metrics.quarantine_failures.inc(failed)
            self.store.add_items(job.id, results)
            self.metrics.job_items.inc(len(results))
            for r in results:
                self.metrics.images.labels(r.label.value, "job").inc()
        self._finishing = job.id
        try:
            dups = collection_duplicates(self.store.records(job.id), self._reader(root) if self.pixel_check else None)
            self.store.set_duplicates(job.id, dups[["path", "group", "duplicate_of", "kind"]].itertuples(index=False))
            try:
                export_records(lambda: self.store.records(job.id), Path(job.out_dir), duplicates=dups)
            except OSError as e:  # said as the export's: a bare "[Errno 28] No space left on device" before (an audit)
                raise OSError(e.errno, f"the results files could not be written in the state folder's jobs/ "
                                       f"({e.strerror or e}); retry the job once they can be") from e
        finally:
            self._finishing = None
        if self.store.transition(job.id, "done", finished=time.time()):
            counts = self.store.counts(job.id)
            log.info("job %s: done, %d files (%s) in %.0f s", job.id, sum(counts.values()),
                     ", ".join(f"{label} {n}" for label, n in sorted(counts.items())), time.time() - now)

    def _reader(self, root: Path) -> Callable[[str], bytes]:
        """A job's photos for the duplicate search's pixel check, under the rule every read
        of the job follows (inside the data roots, checked at each read)."""
        def read(rel: str) -> bytes:
            path = on_disk(root, rel)
            if not inside(path, self.roots):
                raise OSError(f"{rel}: outside the data roots")
            return read_file(path, self.limits, self.allowed)  # and on the file opened (NotAllowed)
        return read

    def _batch(self, root: Path, chunk: list[str], policy: str) -> list[QCResult]:
        files = {rel: on_disk(root, rel) for rel in chunk}
        # read before the engine is taken: the engine read them under the gate, so a slow or hung
        # share kept every upload waiting on this job's I/O, not on one engine batch. The roots
        # are checked on the file opened (`_read`): checked on the name first, a link swapped in
        # between had a file from outside read, its hashes stored (an audit)
        read = {rel: self._read(files[rel]) for rel in chunk if inside(files[rel], self.roots)}
        allowed = [rel for rel, data in read.items() if isinstance(data, bytes)]
        by_path = {rel: QCResult(path=rel, label=Label.UNREADABLE, error=data.reason) for rel, data in read.items()
                   if isinstance(data, DecodeError)}
        if allowed:
            inputs = [read[rel] for rel in allowed]
            with self.gate.background():
                try:
                    results = self.run_batch(inputs, allowed, policy)
                except Exception as e:
                    self.health.failed("job", e)
                    raise
            self.health.succeeded()
            by_path |= {r.path: r for r in results}
        return [by_path.get(rel) or QCResult(path=rel, label=Label.UNREADABLE, error=OUTSIDE) for rel in chunk]

    def _read(self, path: Path) -> bytes | DecodeError | None:
        """The file's bytes under the engine's limits; None where the file opened lies outside
        the roots; the engine's reason where the limits refuse it or the OS cannot read it. The
        engine was handed the path then, to write its own reason, and opened it again: a link
        swapped in between was read from outside the roots."""
        try:
            return read_file(path, self.limits, self.allowed)
        except NotAllowed:
            return None
        except DecodeError as e:
            return e
        except OSError as e:
            return unreadable(e)


OUTSIDE = "outside the allowed data roots (not read)"
