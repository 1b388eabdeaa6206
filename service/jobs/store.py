"""Job state in one SQLite file: a `jobs` table and an `items` table (one row per file).

Items are written one batch per transaction with (job_id, path) as the primary key, so a
server killed with kill -9 restarts with every finished batch kept, none twice, and the
runner simply skips what is there. A path's row is written once (a second result for it is
ignored), but for a row of a file the OS could not read, which a resumed or retried job reads
again and replaces (`READ_AGAIN`). Per-label counts live in `label_counts`, updated in the
same transaction: a status poll that counted with GROUP BY over the items is O(items)
(`python -m tests.benchmarks.job_store` times both on one file), and jobs of 10^7 files are
the point of batch cleaning. Each thread gets its own connection (sqlite3 objects
must not cross threads); WAL lets the routes read while the runner writes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import NamedTuple
from pathlib import Path

from pydantic import BaseModel

from pipelines.clean.state import findings_of_rows
from pipelines.engine.qc_result import QCResult, read_again_sql
from pipelines.outputs import write_atomically

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, source TEXT NOT NULL, quarantine TEXT, policy TEXT NOT NULL,
    out_dir TEXT NOT NULL, total INTEGER, created REAL NOT NULL, started REAL, finished REAL, error TEXT,
    resumed_at REAL, done_before_resume INTEGER DEFAULT 0, models TEXT
);
CREATE TABLE IF NOT EXISTS items (
    job_id TEXT NOT NULL, path TEXT NOT NULL, label TEXT NOT NULL, record TEXT NOT NULL, done_at REAL NOT NULL,
    summary TEXT, PRIMARY KEY (job_id, path)
);
-- the unreadable rows alone, for a done job's retry (`has_read_again`): a few rows, not the job's
CREATE INDEX IF NOT EXISTS items_unreadable ON items (job_id) WHERE label = 'unreadable';
CREATE TABLE IF NOT EXISTS label_counts (
    job_id TEXT NOT NULL, label TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (job_id, label)
);
-- a batch's rows while their quarantine copies are made, until `add_items` stores them: a service
-- killed between the two left copies no row owned (a table older versions leave alone)
CREATE TABLE IF NOT EXISTS pending_copies (
    job_id TEXT NOT NULL, path TEXT NOT NULL, record TEXT NOT NULL, quarantine TEXT NOT NULL,
    PRIMARY KEY (job_id, path)
);
"""
# user_version 1: label_counts kept in step with items (older files are backfilled once)
# user_version 2: items.summary, the review grid's fields as a short JSON array (backfilled once)
# user_version 3: colour_score joins the summary (every summary rebuilt once)
# user_version 4: jobs.models, the sha256 of the models its rows were labelled by
# user_version 5: jobs.status may be 'deleted' (an older version listed such a job and failed
#                 every job list on it)
# user_version 6: jobs.out_dir relative to the store's folder (a copy of the state folder, a
#                 backup restored, wrote its jobs' results into the original's folder and a
#                 DELETE there removed the original's)
SCHEMA_VERSION = 6
ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled")
# A deleted job keeps its row (source and quarantine: a quarantine folder still holds that
# source's copies, `QUARANTINE_SOURCES`) under this status, and nothing else: no item, count or
# review decision. Every read but the quarantine check passes it by.
DELETED = "deleted"


PROBE_ROOM = 16 * 2**20  # bytes free a job store needs to be ready


# (quarantine name, source) of every job, deleted ones too: a job without a quarantine claims
# `job-<id>`, the folder review's Apply fills for it (another source's job could name it, and
# the two sources' copies met there: an audit)
QUARANTINE_SOURCES = "SELECT DISTINCT COALESCE(quarantine, 'job-' || id), source FROM jobs"


class ActiveTwin(Exception):
    """A queued or running job asks for the same work; args[0] is its id."""


class JobDeleted(Exception):
    """The job was deleted while its rows were being read; args[0] is its id."""


class QuarantineInUse(Exception):
    """The quarantine named overlaps one holding another source's copies; args[0] is that name."""


class TooManyJobs(Exception):
    """As many jobs as the limit are queued or running; args[0] is how many."""


def _active_count(db: sqlite3.Connection) -> int:
    return db.execute(f"SELECT count(*) FROM jobs WHERE status IN {ACTIVE}").fetchone()[0]


def overlapping_quarantine(name: str, source: str, used: Iterable[tuple[str, str]]) -> str | None:
    """The quarantine of `used` ((name, source) of the jobs) that `name` lies in, around or is,
    holding another source's copies, or None. A quarantine folder holds one source's copies: a
    copy whose path is already there is taken as done (a resumed job), so a second source's
    photo of the same relative path was silently not copied. The same source again (a job
    rerun) may share it."""
    for other_name, other_source in used:
        overlaps = other_name == name or name.startswith(other_name + "/") or other_name.startswith(name + "/")
        if overlaps and other_source != source:
            return other_name
    return None


class StoreDamaged(RuntimeError):
    pass


class StoreVersionError(RuntimeError):
    """jobs.sqlite written by a newer cervixqc than this one."""


class StoreReplaced(sqlite3.OperationalError):
    """jobs.sqlite deleted or replaced under the running service: its open connections went on
    writing to the unlinked file, and a job posted then was answered 202 and lost at the next
    start (an audit). An OperationalError: routes answer 503 `store_unavailable` and the job
    runner waits, as for a store that is locked or failing."""


class SameFile:
    """The identity (device, inode) of the store's file when this process opened it, checked
    before each use of a connection (a stat, ~2 us)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.opened = self._id()

    def _id(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def check(self) -> None:
        if self._id() != self.opened:
            raise StoreReplaced(f"{self.path} was deleted or replaced while the service ran; nothing more is "
                                "written to it: restart the service (README, \"Backup and restore\")")


def open_db(path: Path, mode: str, timeout: float, **kwargs: object) -> sqlite3.Connection:
    """jobs.sqlite in SQLite's URI `mode`: ro, rw, or rwc where it may be created (only the
    stores' own opening: a deleted file was created again, empty, by the next thread that read
    it, a metrics scrape or an export, and the loss looked like a fresh install)."""
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode={mode}", uri=True, timeout=timeout, **kwargs)


@contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE, COMMIT at the end; on any error ROLLBACK, unless a failed COMMIT (disk
    full) rolled back already: its error is the one to see. `db` in autocommit mode."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _backup(db: sqlite3.Connection, to: Path) -> None:
    target = sqlite3.connect(to)
    try:
        db.backup(target)
    finally:
        target.close()


def newer_store(version: int) -> str:
    return (f"jobs.sqlite was written by a newer cervixqc (schema v{version}; this version reads up to "
            f"v{SCHEMA_VERSION}): run the newer version, or give this one another CERVIXQC_STATE_DIR")


def store_problem(path: Path, versions: bool = True) -> str | None:
    """What `serve` says before the models load where `path` is a newer version's store
    (`versions`) or a damaged one: opened read-only, so that neither changes. A downgrade
    rewrote the schema version down (a v0 runner then backed off for good on its first
    insert). A damaged page started a service that said ready and failed every job on it, and
    an upgrade kept the damaged file as its backup; a truncated file or one that is no SQLite
    ended the start in a 60-line traceback naming neither the file nor the variable (an
    audit). SQLite's quick_check reads every page, once per start: 0.06-0.07 s for a 70 MiB
    store of 10^5 results on the 2-core CPU, in the page cache."""
    if not path.is_file():
        return None
    if (lost := _emptied(path)) is not None:
        return lost
    try:
        db = open_db(path, "ro", 5)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if versions and version > SCHEMA_VERSION:
                return newer_store(version)
            found = db.execute("PRAGMA quick_check(1)").fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError:
        return None  # locked or unopenable: the store's own error, named where it is opened
    except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
        found = str(e)
    return None if found == "ok" else (
        f"CERVIXQC_STATE_DIR: {path} is damaged ({' '.join(found.split())}); nothing was changed: restore it from "
        "a backup (README, \"Backup and restore\"), or move it aside to start with an empty job store")


def _emptied(path: Path) -> str | None:
    """A store of 0 bytes where jobs' results folders lie beside it: the file was cut to nothing
    (SQLite opens one as a new store, and started with no jobs and their folders orphaned, an
    audit). A 0-byte file without them is a start that stopped before its first write."""
    wal = path.with_name(f"{path.name}-wal")
    if path.stat().st_size or (wal.is_file() and wal.stat().st_size):
        return None
    jobs = path.parent / "jobs"
    folders = sum(1 for p in jobs.iterdir() if p.is_dir()) if jobs.is_dir() else 0
    return None if not folders else (
        f"CERVIXQC_STATE_DIR: {path} is empty (0 bytes) while {folders} job results folder(s) lie in {jobs}: "
        "the store was cut or replaced; nothing was changed: restore it from a backup (README, \"Backup and "
        "restore\"), or move it and those folders aside to start with an empty job store")


class Job(BaseModel):
    id: str
    status: str  # queued | running | done | failed | cancelled
    source: str
    quarantine: str | None
    policy: str
    out_dir: str
    total: int | None
    created: float
    started: float | None
    finished: float | None
    error: str | None
    resumed_at: float | None = None
    done_before_resume: int = 0
    # JSON {"models": {name: sha256}, "thresholds": {name: {...}}}, the models its rows were labelled
    # by (JobStore.claim_models); {name: sha256} alone in a job begun before thresholds were recorded
    models: str | None = None

    def root(self) -> Path:
        """The folder its records' paths are relative to: the folder itself, or a manifest's."""
        src = Path(self.source)
        return src.parent if src.is_file() else src


class ItemSummary(NamedTuple):
    """One item as the review grid needs it; the fields after `label` are SUMMARY_FIELDS in order
    (a tuple: 10^4 of them are made per page view)."""

    item: int  # the row id
    path: str
    label: str
    kind: str | None
    deep_sad_score: float | None
    resnest_prob: float | None
    colour_score: float | None
    cervix_score: float | None
    presence_score: float | None
    cervix_box: list[float] | None
    width: int | None
    height: int | None
    error: str | None


# The review grid sorts and filters every item of a job on these fields, so each row keeps them
# apart as a short JSON array: json_extract over the whole records (about 1 kB each, embedding
# included) took ~100 ms for 10^4 items, the short arrays read as one document ~60 ms.
SUMMARY_FIELDS = ("kind", "deep_sad_score", "resnest_prob", "colour_score", "cervix_score", "presence_score",
                  "cervix_box", "width", "height", "error")
_SUMMARY_SQL = ", ".join(f"json_extract(record, '$.{f}')" for f in SUMMARY_FIELDS)


def summary_of(r: QCResult) -> str:
    return json.dumps([getattr(r, f) for f in SUMMARY_FIELDS])


class JobStore:
    def __init__(self, path: Path, busy_timeout_s: float = 30.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.busy_timeout_s = busy_timeout_s  # how long a call waits on another writer's lock
        # `serve` says it before the models load; a service started by uvicorn itself (README,
        # "HTTP service") upgraded a damaged file and kept the damage as its backup (an audit)
        damage = store_problem(path, versions=False)  # a newer version's: refused below, in the transaction
        if damage is not None:
            raise StoreDamaged(damage)
        self._local = threading.local()
        self._deferred: set[str] = set()  # deleted jobs whose rows a full disk or a lock kept (`purge_deferred`)
        self._file: SameFile | None = None
        db = self._db(create=True)
        self._file = SameFile(path)
        db.execute("BEGIN IMMEDIATE")  # two processes opening an old file: one backfills
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:  # a downgrade: this code would rewrite the version down and
            db.execute("ROLLBACK")    # ignore what the newer one records (the models of a job)
            raise StoreVersionError(newer_store(version))
        db.execute("COMMIT")
        if 0 < version < SCHEMA_VERSION:
            self._keep_before_upgrade(db, version)
        db.executescript(SCHEMA)
        db.execute("BEGIN IMMEDIATE")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        # a new file is "v0" too: only an older file's upgrade is logged (every install said it upgraded)
        upgrading = False
        if version < SCHEMA_VERSION:
            t0, n = time.perf_counter(), db.execute("SELECT count(*) FROM items").fetchone()[0]
            upgrading = version > 0 or n > 0 or db.execute("SELECT 1 FROM jobs LIMIT 1").fetchone() is not None
            if upgrading:
                log.info("jobs.sqlite: upgrading schema v%d to v%d (%d items)", version, SCHEMA_VERSION, n)
        if version < 1:
            db.execute("DELETE FROM label_counts")
            db.execute("INSERT INTO label_counts SELECT job_id, label, count(*) FROM items GROUP BY job_id, label")
        if version < 2 and "summary" not in {r[1] for r in db.execute("PRAGMA table_info(items)")}:
            db.execute("ALTER TABLE items ADD COLUMN summary TEXT")
        if version < 3:  # the summaries of older files lack fields: every one is rebuilt from its record
            db.execute(f"UPDATE items SET summary = json_array({_SUMMARY_SQL})")
        if version < 4 and "models" not in {r[1] for r in db.execute("PRAGMA table_info(jobs)")}:
            db.execute("ALTER TABLE jobs ADD COLUMN models TEXT")
        if version < 6:  # the service's own results folders, <state>/jobs/<id>, wherever the state is now
            db.execute("UPDATE jobs SET out_dir = 'jobs/' || id "
                       "WHERE substr(out_dir, -length(id) - 6) = '/jobs/' || id")
        if version < SCHEMA_VERSION:  # written at every start, it made a start on a full disk a traceback (an audit)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
        if upgrading:
            log.info("jobs.sqlite: upgraded in %.1f s", time.perf_counter() - t0)
        left = " OR ".join(f"EXISTS (SELECT 1 FROM {t} WHERE job_id = jobs.id)" for t in self._purged_tables(db))
        for (job_id,) in db.execute(f"SELECT id FROM jobs WHERE status = ? AND ({left})", (DELETED,)).fetchall():
            self._purge_or_defer(job_id)  # a delete stopped half-way (the service killed, or the disk full)

    def _keep_before_upgrade(self, db: sqlite3.Connection, version: int) -> None:
        """The file as it was, beside it, before an upgrade rewrites it (SQLite's backup: whole
        even while another process writes): going back to the older cervixqc needs it, since
        that version refuses the upgraded file. One per upgrade, named by its time: kept once
        per version, a second upgrade after going back found the first's copy and kept nothing
        of what the older version had done since (an audit)."""
        when = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        kept = self.path.with_name(f"{self.path.name}.v{version}-{when}.bak")
        try:
            write_atomically(kept, lambda tmp: _backup(db, tmp))
        except (OSError, sqlite3.Error) as e:  # a full disk: the upgrade would not fit either
            raise OSError(errno.ENOSPC, f"cannot keep jobs.sqlite as {kept.name} before upgrading it to v"
                                        f"{SCHEMA_VERSION} ({e}): free some space in its folder", str(kept)) from e
        log.info("jobs.sqlite: the v%d file kept as %s before the upgrade", version, kept.name)

    def close(self) -> None:
        """At the service's stop: SQLite's log folded into the file and emptied. Left behind, it
        was replayed onto a backup copied over jobs.sqlite to go back a version, and the
        "restored" file read as the upgraded one (an audit). A failure is logged: the stop goes on."""
        try:
            db = open_db(self.path, "rw", self.busy_timeout_s, isolation_level=None)
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                db.close()
        except sqlite3.Error as e:
            log.warning("jobs.sqlite: its log could not be emptied at stop (%s)", e)

    def _job(self, row: sqlite3.Row) -> Job:
        fields = dict(row)
        fields["out_dir"] = str(self.path.parent / fields["out_dir"])  # relative since v6
        return Job(**fields)

    def _db(self, create: bool = False) -> sqlite3.Connection:
        """This thread's connection, to the file the store opened (`StoreReplaced` otherwise);
        only the store's opening creates the file (`open_db`)."""
        if self._file is not None:
            self._file.check()
        db = getattr(self._local, "db", None)
        if db is None:
            db = open_db(self.path, "rwc" if create else "rw", self.busy_timeout_s, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    def probe(self, timeout_s: float = 2.0) -> None:
        """Raises sqlite3.Error unless a job could be written now, for readiness: the file
        deleted or its folder unmounted (the service's open connections went on writing to
        the unlinked file, and every job was lost at the next start), an I/O error, or a writer
        holding the lock past `timeout_s`. Its own connection, opened `mode=rw` so that a
        missing file is not created, and a write transaction rolled back: nothing is written.
        The lock is granted on a full or read-only disk too, where every write then failed while
        readiness said ready (an audit): OSError for a read-only folder or one with less than
        `PROBE_ROOM` free (SQLite's log needs some room to take a batch). A file put in its
        place is not the store's (`StoreReplaced`): readiness said ready while every route refused."""
        if self._file is not None:
            self._file.check()
        db = open_db(self.path, "rw", timeout_s, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("SELECT count(*) FROM jobs WHERE id = ''").fetchone()
            db.execute("ROLLBACK")
        finally:
            db.close()
        disk = os.statvfs(self.path.parent)
        if disk.f_flag & os.ST_RDONLY:
            raise OSError(errno.EROFS, "the state folder is read-only")
        if disk.f_bavail * disk.f_frsize < PROBE_ROOM:
            raise OSError(errno.ENOSPC, f"the state folder has {disk.f_bavail * disk.f_frsize // 2**20} MiB free")

    # jobs -------------------------------------------------------------------------------
    def create(self, source: str, quarantine: str | None, policy: str, out_root: Path, once: bool = False,
               max_active: int | None = None) -> Job:
        """`once`: raises ActiveTwin where a queued or running job has the same source, quarantine
        and policy: a client that resent its request after a timeout queued the same hours of
        work again. QuarantineInUse where the quarantine overlaps another source's
        (`overlapping_quarantine`). TooManyJobs where `max_active` jobs are queued or running
        already (a client's loop queued 300 jobs in 2 s, each a row and a folder, and any one
        job then waited behind them all). All are checked in the insert's own transaction: two
        requests at once passed a check made before it, and both jobs were queued (an audit)."""
        job_id = uuid.uuid4().hex[:16]
        out = out_root / job_id
        stored = out.relative_to(self.path.parent) if out.is_relative_to(self.path.parent) else out
        twin = f"SELECT id FROM jobs WHERE source = ? AND quarantine IS ? AND policy = ? AND status IN {ACTIVE}"
        sql = ("INSERT INTO jobs (id, status, source, quarantine, policy, out_dir, created) "
               "SELECT ?, 'queued', ?, ?, ?, ?, ?")
        params: tuple = (job_id, source, quarantine, policy, str(stored), time.time())
        if once:
            sql, params = f"{sql} WHERE NOT EXISTS ({twin})", (*params, source, quarantine, policy)
        with write_transaction(self._db()) as db:
            if quarantine is not None:
                used = overlapping_quarantine(quarantine, source, db.execute(QUARANTINE_SOURCES).fetchall())
                if used is not None:
                    raise QuarantineInUse(used)
            if max_active is not None and (active := _active_count(db)) >= max_active:
                row = db.execute(twin, (source, quarantine, policy)).fetchone() if once else None
                if row is None:  # a resent request still gets its twin's id (409), not a refusal
                    raise TooManyJobs(active)
                raise ActiveTwin(row[0])
            if db.execute(sql, params).rowcount != 1:
                row = db.execute(twin, (source, quarantine, policy)).fetchone()
                raise ActiveTwin(row[0] if row else "")
        return self.get(job_id)  # type: ignore[return-value]

    def claim_models(self, job_id: str, models: str) -> str | None:
        """Record `models` as the job's, unless it has some already; returns the job's, None
        for a job with rows stored by a version that recorded no models (schema < 4): its rows'
        models are unknown, and claimed they were passed off as these ones'."""
        db = self._db()
        db.execute("UPDATE jobs SET models = ? WHERE id = ? AND models IS NULL "
                   "AND NOT EXISTS (SELECT 1 FROM items WHERE job_id = ?)", (models, job_id, job_id))
        return db.execute("SELECT models FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]

    def findings_of_rows(self, job_id: str) -> tuple[frozenset, int]:
        """The findings' thresholds the job's stored rows were judged under (`findings_of_rows`)."""
        return findings_of_rows(self._db(), "items", "items.job_id = ?", (job_id,))

    def replace_models(self, job_id: str, old: str, new: str) -> str | None:
        """The job's models record `old` made `new` (unless it changed meanwhile); returns the job's."""
        db = self._db()
        db.execute("UPDATE jobs SET models = ? WHERE id = ? AND models = ?", (new, job_id, old))
        return db.execute("SELECT models FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]

    def get(self, job_id: str) -> Job | None:
        row = self._db().execute("SELECT * FROM jobs WHERE id = ? AND status != ?", (job_id, DELETED)).fetchone()
        return self._job(row) if row else None

    def list(self, limit: int = 100) -> list[Job]:
        rows = self._db().execute("SELECT * FROM jobs WHERE status != ? ORDER BY created DESC LIMIT ?",
                                  (DELETED, limit)).fetchall()
        return [self._job(r) for r in rows]

    def delete(self, job_id: str) -> bool:
        """True when a finished job is DELETED (its row kept) and its items, counts and review
        decisions gone; False when it is queued or running. A site running for years had no
        way to let a job go: jobs.sqlite grew by every job's rows. The status moves first, in
        a transaction of its own: every read passes the job by from then on. A purge the disk
        or a lock stops is tried again (`purge_deferred`), and the job is deleted all the same:
        it answered 503 "nothing changed, retry" while the job was gone, its results folder kept
        and its rows purged only at the restart (an audit, a full state disk)."""
        if self._db().execute(f"UPDATE jobs SET status = ? WHERE id = ? AND status IN {FINAL}",
                              (DELETED, job_id)).rowcount != 1:
            return False
        self._purge_or_defer(job_id)
        return True

    def _purge_or_defer(self, job_id: str) -> None:
        """A deleted job's rows purged, or deferred where a full disk or a lock stops it: a
        start on a disk still full failed in a traceback (an audit)."""
        try:
            self.purge(job_id)
        except sqlite3.OperationalError as e:
            if job_id not in self._deferred:
                log.warning("job %s deleted; its rows are purged once the job store takes writes again (%s)",
                            job_id, e)
            self._deferred.add(job_id)
        else:
            self._deferred.discard(job_id)

    def purge_deferred(self) -> None:
        """The purges a full disk or a lock deferred, tried again (the job runner calls this
        while idle). They waited for the next start: a site that freed its disk kept a deleted
        job's rows, up to 10^6 of them, until someone restarted the service."""
        for job_id in list(self._deferred):
            self._purge_or_defer(job_id)

    def purge(self, job_id: str, chunk: int = 10_000) -> None:
        """A deleted job's rows, `chunk` at a time: in one transaction 10^5 rows held the write
        lock 0.87 s (readiness waits 2 s for it), 10^6 would hold it about 9 s. Rows a purge cut
        short left are purged at the next start (`__init__`)."""
        db = self._db()
        for table in self._purged_tables(db):
            while db.execute(f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE job_id = ? "
                             "LIMIT ?)", (job_id, chunk)).rowcount:
                pass

    @staticmethod
    def _purged_tables(db: sqlite3.Connection) -> list[str]:
        """Every table with a job's rows. The start-up sweep looked at items alone: a delete
        killed after them left the job's counts and review decisions for good (an audit)."""
        has_decisions = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'decisions'").fetchone()
        return ["items", "label_counts", "pending_copies", *(["decisions"] if has_decisions else [])]

    def deleted(self) -> list[Job]:
        return [self._job(r) for r in self._db().execute("SELECT * FROM jobs WHERE status = ?", (DELETED,))]

    def next_active(self) -> Job | None:
        row = self._db().execute(f"SELECT * FROM jobs WHERE status IN {ACTIVE} ORDER BY created LIMIT 1").fetchone()
        return self._job(row) if row else None

    def count_by_status(self) -> dict[str, int]:
        """Every status, those without a job at 0."""
        counts = dict.fromkeys((*ACTIVE, *FINAL), 0)
        counts.update(self._db().execute("SELECT status, count(*) FROM jobs WHERE status != ? GROUP BY status",
                                         (DELETED,)).fetchall())
        return counts

    def transition(self, job_id: str, to: str, **fields: object) -> bool:
        """Move an active job to `to` (running, done, failed), only if it is still active: a
        cancel that lands between the runner's read and its write must win. `done` ends a
        running job only: a run cancelled during its last step, and the job retried meanwhile
        (queued), marked the queued job done, and the retry never ran."""
        cols = ", ".join(["status = ?", *(f"{k} = ?" for k in fields)])
        states = "('running')" if to == "done" else ACTIVE
        cur = self._db().execute(f"UPDATE jobs SET {cols} WHERE id = ? AND status IN {states}",
                                 (to, *fields.values(), job_id))
        return cur.rowcount == 1

    def cancel(self, job_id: str) -> bool:
        """True when the job was active and is now cancelled (the runner stops before its next batch)."""
        cur = self._db().execute(f"UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ? "
                                 f"AND status IN {ACTIVE}", (time.time(), job_id))
        return cur.rowcount == 1

    def requeue(self, job_id: str, max_active: int | None = None) -> bool:
        """True when a failed or cancelled job is queued again, or a done one that has files the
        OS could not read (`READ_AGAIN`: a share briefly away): the runner resumes it, reading
        only the files without a final row. TooManyJobs, as `create`, for one it would queue
        past `max_active`. ActiveTwin, as `create(once=True)`, where a queued or running job has
        its source, quarantine and policy: a retry of a cancelled job beside the new job made for
        the same folder ran both from the start, into one quarantine (an audit)."""
        retryable = (f"id = ? AND (status IN ('failed', 'cancelled') OR (status = 'done' AND EXISTS (SELECT 1 "
                     f"FROM items WHERE job_id = jobs.id AND {read_again_sql()})))")
        with write_transaction(self._db()) as db:
            twin = db.execute(f"SELECT twin.id FROM jobs AS twin, jobs AS job WHERE job.id = ? AND twin.id != job.id "
                              "AND twin.source = job.source AND twin.quarantine IS job.quarantine "
                              f"AND twin.policy = job.policy AND twin.status IN {ACTIVE}", (job_id,)).fetchone()
            if twin is not None and db.execute(f"SELECT 1 FROM jobs WHERE {retryable}", (job_id,)).fetchone():
                raise ActiveTwin(twin[0])
            if max_active is not None and (active := _active_count(db)) >= max_active:
                if db.execute(f"SELECT 1 FROM jobs WHERE {retryable}", (job_id,)).fetchone() is not None:
                    raise TooManyJobs(active)
                return False
            cur = db.execute(f"UPDATE jobs SET status = 'queued', error = NULL, finished = NULL WHERE {retryable}",
                             (job_id,))
            return cur.rowcount == 1

    def has_read_again(self, job_id: str) -> bool:
        """Whether the job has rows of files the OS could not read (`requeue` takes a done one then)."""
        return self._db().execute(f"SELECT EXISTS (SELECT 1 FROM items WHERE job_id = ? AND {read_again_sql()})",
                                  (job_id,)).fetchone()[0] == 1

    def status(self, job_id: str) -> str | None:
        row = self._db().execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    # items ------------------------------------------------------------------------------
    def copies_pending(self, job_id: str, results: list[QCResult], quarantine: Path) -> None:
        """Before a batch's quarantine copies are made: its rows, which `add_items` clears."""
        if not results:
            return
        with write_transaction(self._db()) as db:
            db.executemany("INSERT OR REPLACE INTO pending_copies VALUES (?, ?, ?, ?)",
                           [(job_id, r.path, r.model_dump_json(exclude={"timings_ms"}), str(quarantine))
                            for r in results])

    def pending_copies(self, job_id: str) -> list[tuple[QCResult, Path]]:
        """The rows of a batch stopped between its copies and its rows' storing, with their quarantine."""
        return [(QCResult.model_validate_json(rec), Path(q)) for rec, q in self._db().execute(
            "SELECT record, quarantine FROM pending_copies WHERE job_id = ?", (job_id,))]

    def forget_pending(self, job_id: str) -> None:
        with write_transaction(self._db()) as db:
            db.execute("DELETE FROM pending_copies WHERE job_id = ?", (job_id,))

    def add_items(self, job_id: str, results: list[QCResult]) -> None:
        now = time.time()
        with write_transaction(self._db()) as db:
            db.executemany("DELETE FROM pending_copies WHERE job_id = ? AND path = ?",
                           [(job_id, r.path) for r in results])
            added: dict[str, int] = {}
            for r in results:
                row = (r.label.value, r.model_dump_json(exclude={"timings_ms"}), now, summary_of(r))
                cur = db.execute("INSERT OR IGNORE INTO items (label, record, done_at, summary, job_id, path) "
                                 "VALUES (?, ?, ?, ?, ?, ?)", (*row, job_id, r.path))
                if cur.rowcount == 0:  # a row there already: replaced only where it is to be read again
                    cur = db.execute("UPDATE items SET label = ?, record = ?, done_at = ?, summary = ? "
                                     f"WHERE job_id = ? AND path = ? AND {read_again_sql()}", (*row, job_id, r.path))
                    if cur.rowcount == 1:
                        added["unreadable"] = added.get("unreadable", 0) - 1
                if cur.rowcount == 1:
                    added[r.label.value] = added.get(r.label.value, 0) + 1
            db.executemany("INSERT INTO label_counts VALUES (?, ?, ?) "
                           "ON CONFLICT (job_id, label) DO UPDATE SET n = n + excluded.n",
                           [(job_id, label, n) for label, n in added.items()])

    def set_duplicates(self, job_id: str, groups: Iterable[tuple[str, int, str, str]]) -> int:
        """Write each (path, group, duplicate_of, kind) into its item's record, one transaction:
        duplicates are known only once the whole job is in, and the results route streams
        the records, so that is where they must be. Returns the rows updated. The groups of an
        earlier search (a retried job searches again) are cleared first: a photo no longer in a
        group kept its old group number, which may now be another group's, in the results route
        while results.csv had none (an audit)."""
        with write_transaction(self._db()) as db:
            db.execute("UPDATE items SET record = json_set(record, '$.duplicate_group', NULL, '$.duplicate_of', NULL, "
                       "'$.duplicate_kind', NULL) WHERE job_id = ? AND json_extract(record, '$.duplicate_group') "
                       "IS NOT NULL", (job_id,))
            n = 0
            for path, group, of, kind in groups:
                row = db.execute("SELECT record FROM items WHERE job_id = ? AND path = ?", (job_id, path)).fetchone()
                if row is None:
                    continue
                rec = QCResult.model_validate_json(row[0]).model_copy(
                    update={"duplicate_group": int(group), "duplicate_of": of, "duplicate_kind": kind})
                db.execute("UPDATE items SET record = ? WHERE job_id = ? AND path = ?",
                           (rec.model_dump_json(exclude={"timings_ms"}), job_id, path))
                n += 1
        return n

    def stored_paths(self, job_id: str) -> tuple[set[str], set[str]]:
        """The paths with a row, and those of them whose row is of a file the OS could not read
        (`READ_AGAIN`), which a resumed or retried job reads again, as a rerun of `clean` does."""
        paths: set[str] = set()
        again: set[str] = set()
        for path, read_again in self._db().execute(f"SELECT path, {read_again_sql()} FROM items WHERE job_id = ?",
                                                   (job_id,)):
            paths.add(path)
            if read_again:
                again.add(path)
        return paths, again

    def counts(self, job_id: str) -> dict[str, int]:
        rows = self._db().execute("SELECT label, n FROM label_counts WHERE job_id = ? AND n > 0", (job_id,))
        return {label: n for label, n in rows}

    def item(self, job_id: str, item_id: int) -> QCResult | None:
        """One item by its row id (what the review pages link to: never a path from the client)."""
        row = self._db().execute("SELECT record FROM items WHERE job_id = ? AND rowid = ?",
                                 (job_id, item_id)).fetchone()
        return QCResult.model_validate_json(row[0]) if row else None

    def summaries(self, job_id: str) -> list[ItemSummary]:
        """What the review grid sorts and filters on, for every item of a job (SUMMARY_FIELDS)."""
        # one JSON document from SQLite, one json.loads: 10^4 separate loads cost twice as much
        (doc,) = self._db().execute("SELECT json_group_array(json_array(rowid, path, label, json(summary))) "
                                    "FROM items WHERE job_id = ?", (job_id,)).fetchone()
        return [ItemSummary(item, path, label, *fields) for item, path, label, fields in json.loads(doc)]

    def records(self, job_id: str, chunk: int = 1000) -> Iterator[QCResult]:
        """In path order, read in chunks, each on a connection of its own (safe to stream)."""
        return (record for _, record in self.item_records(job_id, chunk))

    def item_records(self, job_id: str, chunk: int = 1000) -> Iterator[tuple[int, QCResult]]:
        """(row id, record) in path order, as `records`: the review exports need the id that
        ties each record to its reviewers' decisions.

        Each chunk on a connection opened and closed before its rows are yielded: a streamed
        download pulls the generator from whichever thread-pool thread is free, and a
        connection held across chunks failed sqlite3's same-thread check there (4 concurrent
        downloads of a 20,000-row job: 17 of 20 broke off after the first chunk), and one
        abandoned by a client that hung up stayed open until the garbage collector ran.
        JobDeleted where the job is deleted meanwhile: its rows ran out, and a download cut
        short ended as if whole, a 200 with a results file that looked complete (an audit)."""
        last = ""
        while True:
            db = open_db(self.path, "rw", 30)
            try:
                status = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if status is None or status[0] == DELETED:
                    raise JobDeleted(job_id)
                rows = db.execute("SELECT rowid, path, record FROM items WHERE job_id = ? AND path > ? "
                                  "ORDER BY path LIMIT ?", (job_id, last, chunk)).fetchall()
            finally:
                db.close()
            if not rows:
                return
            for item, _, rec in rows:
                yield item, QCResult.model_validate_json(rec)
            last = rows[-1][1]
