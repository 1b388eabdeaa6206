"""Reviewers' decisions on a job's items, in the job database beside the items.

An append-only log: each decision keeps who (a key id, never the key), when, the field
(`label` or `box`) and old -> new, so an audit can replay any item's history. Undo marks the
item's latest live decision undone rather than deleting it. An item's reviewed value is its
latest live decision for that field; the model's own record in `items` is never rewritten.

Labels are the five a reviewer can choose (keys 1-5 on the image page): `regular`, `green`,
`iodine` (both non_regular, with the kind), `no_cervix`, `unreadable`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.engine.qc_result import Label, QCResult
from service.jobs.store import DELETED, open_db

SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, item INTEGER NOT NULL, path TEXT NOT NULL,
    who TEXT NOT NULL, at REAL NOT NULL, field TEXT NOT NULL, old TEXT, new TEXT NOT NULL, undone_at REAL
);
CREATE INDEX IF NOT EXISTS decisions_by_item ON decisions (job_id, item);
"""
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


@dataclass(frozen=True)
class Reviewed:
    """An item's live review: the chosen class and box (None: the model's stands)."""

    label: str | None = None
    box: list[float] | None = None
    who: str | None = None
    at: float | None = None


class ReviewStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        self._db(create=True).executescript(SCHEMA)

    def _db(self, create: bool = False) -> sqlite3.Connection:
        """This thread's connection; only the store's opening creates the file (`open_db`)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = open_db(self.path, "rwc" if create else "rw", 30, isolation_level=None)
            db.execute("PRAGMA busy_timeout=30000")
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    def decide(self, job_id: str, item: int, path: str, who: str, field: str, old: object, new: object) -> Decision:
        """Raises JobGone when the job is deleted: a decision sent while its job was being
        deleted (the route had found the job) was stored after the purge, a row no job owned."""
        if field == "label" and new not in CLASSES:
            raise ValueError(f"label must be one of {', '.join(CLASSES)}")
        enc = (lambda v: None if v is None else json.dumps(v)) if field == "box" else (lambda v: v)
        cur = self._db().execute("INSERT INTO decisions (job_id, item, path, who, at, field, old, new) "
                                 "SELECT ?, ?, ?, ?, ?, ?, ?, ? WHERE EXISTS "
                                 "(SELECT 1 FROM jobs WHERE id = ? AND status != ?)",
                                 (job_id, item, path, who, time.time(), field, enc(old), enc(new), job_id, DELETED))
        if cur.rowcount != 1:
            raise JobGone(job_id)
        return self._get(cur.lastrowid)  # type: ignore[arg-type]

    def undo(self, job_id: str, item: int) -> Decision | None:
        """Undo the item's latest live decision; None when there is nothing to undo."""
        db = self._db()
        row = db.execute("SELECT id FROM decisions WHERE job_id = ? AND item = ? AND undone_at IS NULL "
                         "ORDER BY id DESC LIMIT 1", (job_id, item)).fetchone()
        if row is None:
            return None
        db.execute("UPDATE decisions SET undone_at = ? WHERE id = ?", (time.time(), row[0]))
        return self._get(row[0])

    def _get(self, decision_id: int) -> Decision:
        return Decision(**dict(self._db().execute("SELECT id, item, path, who, at, field, old, new, undone_at "
                                                  "FROM decisions WHERE id = ?", (decision_id,)).fetchone()))

    def history(self, job_id: str, item: int) -> list[Decision]:
        rows = self._db().execute("SELECT id, item, path, who, at, field, old, new, undone_at FROM decisions "
                                  "WHERE job_id = ? AND item = ? ORDER BY id", (job_id, item))
        return [Decision(**dict(r)) for r in rows]

    def reviewed(self, job_id: str, item: int | None = None) -> dict[int, Reviewed]:
        """item -> its live review, for every reviewed item of the job or only `item` (one pass,
        newest wins)."""
        out: dict[int, Reviewed] = {}
        one = "" if item is None else " AND item = ?"
        rows = self._db().execute(f"SELECT item, field, new, who, at FROM decisions WHERE job_id = ?{one} "
                                  "AND undone_at IS NULL ORDER BY id", (job_id,) if item is None else (job_id, item))
        for row_item, field, new, who, at in rows:
            cur = out.get(row_item, Reviewed())
            if field == "label":
                out[row_item] = Reviewed(new, cur.box, who, at)
            else:
                out[row_item] = Reviewed(cur.label, json.loads(new), who, at)
        return out


def final_of(record: QCResult, review: Reviewed | None) -> tuple[str, list[float] | None]:
    """The class and box an export uses: the reviewer's where there is one, else the model's.
    A class without a cervix (no_cervix, unreadable) has no box."""
    cls = review.label if review and review.label else class_of(record.label.value, record.kind)
    box = review.box if review and review.box else record.cervix_box
    return cls, (box if cls not in ("no_cervix", "unreadable") else None)
