"""Reviewers' decisions on a job's items, in the job database beside the items.

An append-only log: each decision keeps who (a key id, never the key), when, the field
(`label` or `box`) and old -> new, so an audit can replay any item's history. Undo marks the
item's latest live decision undone (and by whom) rather than deleting it. An item's reviewed
value is its latest live decision for that field; the model's own record in `items` is never
rewritten.

Several reviewers work on one job: each change of an item is one transaction that reads the
item's `old` value and writes, and a page says which state of the item it showed (`version`,
one more for every decision and every undo). A page that is no longer current is refused
(`Stale`), so nobody overrides or undoes a change they never saw (an audit: a page still
showing the model's label confirmed it over another reviewer's iodine, two undos at once
answered twice for one row, and 65 of 200 concurrent decisions had an `old` no one had set).

Labels are the five a reviewer can choose (keys 1-5 on the image page): `regular`, `green`,
`iodine` (both non_regular, with the kind), `no_cervix`, `unreadable`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from pipelines.engine.qc_result import Label, QCResult
from service.jobs.store import DELETED, SameFile, open_db, write_transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, item INTEGER NOT NULL, path TEXT NOT NULL,
    who TEXT NOT NULL, at REAL NOT NULL, field TEXT NOT NULL, old TEXT, new TEXT NOT NULL, undone_at REAL,
    undone_by TEXT
);
CREATE INDEX IF NOT EXISTS decisions_by_item ON decisions (job_id, item);
"""
_COLUMNS = "id, item, path, who, at, field, old, new, undone_at, undone_by"
CLASSES = ("regular", "green", "iodine", "no_cervix", "unreadable")
# in words on every card and button: a label is never told by colour alone
CLASS_WORDS = {"regular": "regular", "green": "non-regular: green filter", "iodine": "non-regular: Lugol's iodine",
               "non_regular": "non-regular", "no_cervix": "no cervix", "unreadable": "unreadable"}


def class_of(label: str, kind: str | None) -> str:
    """A record's label and kind as one of CLASSES (a non_regular without a kind stays as is)."""
    return kind if label == Label.NON_REGULAR and kind in ("green", "iodine") else label


def label_and_kind(cls: str) -> tuple[str, str | None]:
    return ("non_regular", cls) if cls in ("green", "iodine") else (cls, None)


class JobGone(LookupError):
    """The job is deleted, or was never there."""


class Stale(Exception):
    """The item changed since the page that asks was made."""

    def __init__(self, who: str | None) -> None:
        super().__init__(who)
        self.who = who


@dataclass(frozen=True)
class Decision:
    id: int
    item: int
    path: str
    who: str
    at: float
    field: str
    old: str | None
    new: str
    undone_at: float | None
    undone_by: str | None = None


@dataclass(frozen=True)
class Reviewed:
    """An item's live review: the chosen class and box (None: the model's stands), each with
    who decided it and when (one who for both credited a label to whoever last moved the box)."""

    label: str | None = None
    box: list[float] | None = None
    who: str | None = None  # the label's
    at: float | None = None
    box_who: str | None = None
    box_at: float | None = None


class ReviewStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        self._file: SameFile | None = None
        db = self._db(create=True)
        self._file = SameFile(path)
        db.executescript(SCHEMA)
        if "undone_by" not in {r[1] for r in db.execute("PRAGMA table_info(decisions)")}:
            db.execute("ALTER TABLE decisions ADD COLUMN undone_by TEXT")  # a log from before undos were signed

    def _db(self, create: bool = False) -> sqlite3.Connection:
        """This thread's connection, to the file the store opened (`StoreReplaced` otherwise);
        only the store's opening creates the file (`open_db`)."""
        if self._file is not None:
            self._file.check()
        db = getattr(self._local, "db", None)
        if db is None:
            db = open_db(self.path, "rwc" if create else "rw", 30, isolation_level=None)
            db.execute("PRAGMA busy_timeout=30000")
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    def decide(self, job_id: str, item: int, path: str, who: str, field: str, model: object, new: object,
               seen: int | None = None) -> Decision:
        """`field` set to `new`; its `old` is the live decision's value, or the `model`'s.
        Raises Stale when the item is no longer at version `seen` (None: not asked, a script),
        JobGone when the job is deleted: a decision sent while its job was being deleted (the
        route had found the job) was stored after the purge, a row no job owned."""
        if field == "label" and new not in CLASSES:
            raise ValueError(f"label must be one of {', '.join(CLASSES)}")
        enc = (lambda v: None if v is None else json.dumps(v)) if field == "box" else (lambda v: v)
        with self._change(job_id, item, seen) as db:
            live = self.reviewed(job_id, item).get(item)
            current = (live.label if field == "label" else live.box) if live else None
            old = model if current is None else current
            cur = db.execute("INSERT INTO decisions (job_id, item, path, who, at, field, old, new) "
                             "SELECT ?, ?, ?, ?, ?, ?, ?, ? "
                             "WHERE EXISTS (SELECT 1 FROM jobs WHERE id = ? AND status != ?)",
                             (job_id, item, path, who, time.time(), field, enc(old), enc(new), job_id, DELETED))
            if cur.rowcount != 1:
                raise JobGone(job_id)
            return self._get(cur.lastrowid)  # type: ignore[arg-type]

    def undo(self, job_id: str, item: int, who: str, seen: int | None = None) -> Decision | None:
        """Undo the item's latest live decision, signed by `who`; None when there is nothing to
        undo. Raises Stale as `decide` does."""
        with self._change(job_id, item, seen) as db:
            row = db.execute("SELECT id FROM decisions WHERE job_id = ? AND item = ? AND undone_at IS NULL "
                             "ORDER BY id DESC LIMIT 1", (job_id, item)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE decisions SET undone_at = ?, undone_by = ? WHERE id = ?", (time.time(), who, row[0]))
            return self._get(row[0])

    def version(self, job_id: str, item: int) -> int:
        """How many times the item's review changed: decisions and undos."""
        return self._db().execute("SELECT count(*) + count(undone_at) FROM decisions WHERE job_id = ? AND item = ?",
                                  (job_id, item)).fetchone()[0]

    @contextmanager
    def _change(self, job_id: str, item: int, seen: int | None) -> Iterator[sqlite3.Connection]:
        """One writer's transaction: the check, the read of `old` and the write together."""
        with write_transaction(self._db()) as db:
            if seen is not None and self.version(job_id, item) != seen:
                last = db.execute("SELECT coalesce(undone_by, who) FROM decisions WHERE job_id = ? AND item = ? "
                                  "ORDER BY max(at, coalesce(undone_at, 0)) DESC LIMIT 1", (job_id, item)).fetchone()
                raise Stale(last[0] if last else None)  # None: nobody changed it (a page's version made up)
            yield db

    def _get(self, decision_id: int) -> Decision:
        return Decision(**dict(self._db().execute(f"SELECT {_COLUMNS} FROM decisions WHERE id = ?",
                                                  (decision_id,)).fetchone()))

    def history(self, job_id: str, item: int) -> list[Decision]:
        rows = self._db().execute(f"SELECT {_COLUMNS} FROM decisions WHERE job_id = ? AND item = ? ORDER BY id",
                                  (job_id, item))
        return [Decision(**dict(r)) for r in rows]

    def reviewed(self, job_id: str, item: int | None = None, undone_too: bool = False) -> dict[int, Reviewed]:
        """item -> its live review, for every reviewed item of the job or only `item` (one pass,
        newest wins). `undone_too`: an item whose every decision was undone is there too, as an
        empty review (the model's label and box): Apply passed such an item by, and a photo
        relabelled, applied and undone stayed in the folder of the undone label, or in none."""
        out: dict[int, Reviewed] = {}
        one = "" if item is None else " AND item = ?"
        rows = self._db().execute(f"SELECT item, field, new, who, at, undone_at FROM decisions WHERE job_id = ?{one} "
                                  "ORDER BY id", (job_id,) if item is None else (job_id, item))
        for row_item, field, new, who, at, undone_at in rows:
            if undone_at is not None:
                if undone_too:
                    out.setdefault(row_item, Reviewed())
                continue
            cur = out.get(row_item, Reviewed())
            if field == "label":
                out[row_item] = replace(cur, label=new, who=who, at=at)
            else:
                out[row_item] = replace(cur, box=json.loads(new), box_who=who, box_at=at)
        return out


def final_of(record: QCResult, review: Reviewed | None) -> tuple[str, list[float] | None]:
    """The class and box an export uses: the reviewer's where there is one, else the model's.
    A class without a cervix (no_cervix, unreadable) has no box."""
    cls = review.label if review and review.label else class_of(record.label.value, record.kind)
    box = review.box if review and review.box else record.cervix_box
    return cls, (box if cls not in ("no_cervix", "unreadable") else None)
