"""A results folder's state: RESULTS/state.sqlite, one row per input path (the primary key),
written one batch per transaction, so that a run killed at any moment (kill -9 included)
resumes with no lost and no duplicate row; the folder's lock; the files' stamps that tell a
changed photo."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pipelines.engine.qc_result import QCResult, read_again_sql


def _in_use(folder: Path) -> ResultsFolderError:
    return ResultsFolderError(f"another clean is writing to {folder}; wait for it or choose another --out")


def refuse_folder_in_use(out_dir: Path) -> None:
    """ResultsFolderError when another clean holds the results folder, said before the models
    load (18.6 s on a busy 2-core host: an audit); the run's StateStore takes the lock itself."""
    lock = out_dir / ".lock"
    if not lock.is_file():
        return
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(out_dir) from None
        fcntl.flock(f, fcntl.LOCK_UN)


# The state's format, as SQLite's user_version: 1 = results with their files' stamps, the source
# and the decision in meta; 2 = the decision with the models' thresholds, the findings' card and
# the site-calibrated models (a version reading 1 took such a folder for its own and refused it
# as "decided otherwise ()", naming nothing: an audit). 0 is a folder written before the version
# was recorded (readable). An older format is read and recorded as this one; a newer one is
# refused rather than half-read.
STATE_FORMAT = 2


class ResultsFolderError(ValueError):
    """The results folder cannot take this run: another run holds it, or it holds another source's rows."""


def refuse_newer_state(db: sqlite3.Connection, folder: Path) -> None:
    """A state a newer cervixqc wrote is refused, not half-read: its rows may mean what this
    version cannot tell (an older one failed its first insert into a newer table, mid-run)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > STATE_FORMAT:
        raise ResultsFolderError(f"{folder} was written by a newer cervixqc (state format {version}; this version "
                                 f"reads up to {STATE_FORMAT}): run the newer version on it, or choose another "
                                 "folder")


@dataclass(frozen=True)
class Stale:
    """A stored row whose file changed since (`StateStore.changed`), with the stamp it was read under."""

    record: QCResult
    stamp: str


def recorded_before_findings(before: dict, now: dict) -> bool:
    """Whether `before` (a results folder's decision, a job's models record) is `now` as a
    cervixqc recorded it before the findings' card was part of it: taken as made under the card
    there now, as every rerun took it then."""
    return "findings" not in before and before == {k: v for k, v in now.items() if k != "findings"}


def findings_of_rows(db: sqlite3.Connection, table: str, where: str = "1", params: tuple = ()) -> tuple[frozenset, int]:
    """The (finding, threshold) pairs the stored rows of `table` (`results`, the service's
    `items`) were judged under, read from their records, and how many rows have a cervix crop
    (the rows a findings card judges): what `findings_agree` checks a record against."""
    pairs = db.execute(f"SELECT DISTINCT f.key, json_extract(f.value, '$.threshold') FROM {table}, "
                       f"json_each({table}.record, '$.findings') AS f WHERE {where}", params).fetchall()
    cropped = db.execute(f"SELECT COUNT(*) FROM {table} WHERE {where} AND {table}.label IN ('regular', 'non_regular')",
                         params).fetchone()[0]
    return frozenset((k, float(v)) for k, v in pairs), cropped


def findings_agree(rows: tuple[frozenset, int], now: dict) -> bool:
    """Whether stored rows (`findings_of_rows`) were judged under the findings card of `now` (a
    decision): their thresholds are its, or no row has a crop yet. A record made before the card
    was part of it is completed only then: a run an older cervixqc stopped, resumed under weights
    without that card, kept its 48 rows' old flags beside 252 rows without any and recorded no
    card (an audit)."""
    pairs, cropped = rows
    card = now.get("findings") or {}
    return pairs == frozenset((k, float(v)) for k, v in card.get("thresholds", {}).items()) or (not pairs
                                                                                                 and not cropped)


def recorded_before_thresholds(before: dict, decision: dict) -> bool:
    """A decision recorded by a cervixqc that kept the policy and the models' sha256s alone,
    with this one's policy and models."""
    return "thresholds" not in before and before == {k: decision[k] for k in ("policy", "models")}


class StateStore:
    """SQLite journal: path -> result JSON. One transaction per batch.

    Given the run's `source`, the store also holds the results folder for that run alone: a
    lock (`.lock`, flock, released by the kernel when the process dies, kill -9 included)
    refuses a second run into it (two runs did every file twice and raced on the exports'
    temporary files), and the source it was first filled from is recorded and must match
    (another source's rows with the same relative paths were taken as already done). So is
    the `decision` (policy, models' sha256s and thresholds, `QCPipeline.decision`): a rerun with
    another policy or other weights counted every row as done and kept the old labels, unsaid.

    Each row keeps its file's `file_stamp` (size and modification time, taken before the file
    was read), so a rerun labels again a photo replaced under its name since: its old label
    was kept for good (an archive re-exported over itself)."""

    def __init__(self, path: Path, source: Path | None = None, decision: dict | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.folder = path.parent
        self.copies_missed = 0  # this run's flagged files whose quarantine copy could not be made
        self._lock = None
        if source is not None:
            self._lock = open(path.parent / ".lock", "a")  # noqa: SIM115 - held for the store's life
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.close()
                raise _in_use(path.parent) from None
        self.db = sqlite3.connect(path)
        try:
            refuse_newer_state(self.db, self.folder)
        except ResultsFolderError:
            self.close()
            raise
        except sqlite3.DatabaseError as e:  # "stopped by a file error (DatabaseError ...)" named no file (an audit)
            self.close()
            raise ResultsFolderError(f"{path}: not a readable results state ({e}); choose another --out, or restore "
                                     "the folder from a backup") from None
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS results (path TEXT PRIMARY KEY, label TEXT, record TEXT, "
                        "stamp TEXT)")
        if "stamp" not in {row[1] for row in self.db.execute("PRAGMA table_info(results)")}:
            # an older folder's rows have none: kept as done (nothing says they changed)
            self.db.execute("ALTER TABLE results ADD COLUMN stamp TEXT")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        # the duplicate search's pixel-check verdicts, by the photos' sha256 (a table older
        # versions leave alone: no change of format)
        self.db.execute("CREATE TABLE IF NOT EXISTS verdicts (a TEXT, b TEXT, setting TEXT, copy INTEGER, "
                        "PRIMARY KEY (a, b, setting))")
        # a batch's rows while their quarantine copies are made, until the rows are stored (`add`):
        # a run killed between the two left copies no row owned (another table older versions
        # leave alone)
        self.db.execute("CREATE TABLE IF NOT EXISTS pending_copies (path TEXT PRIMARY KEY, record TEXT, "
                        "quarantine TEXT)")
        self.db.execute(f"PRAGMA user_version = {STATE_FORMAT}")
        if source is not None:
            self._claim(str(source.resolve()))
        if decision is not None:
            self._claim_decision(decision)

    def _holds_rows(self) -> bool:
        return self.db.execute("SELECT 1 FROM results LIMIT 1").fetchone() is not None

    def _claim(self, source: str) -> None:
        """A folder without a result row is anyone's: a run that stored none (Ray could not
        start, a kill before the first batch) tied it to its source and decision, and the next
        run's refusal spoke of results it did not hold (an audit)."""
        with self.db:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'source'").fetchone()
            if row is None:  # a new folder, or one filled before the source was recorded: taken as this source's
                self.db.execute("INSERT INTO meta VALUES ('source', ?)", (source,))
                return
            if row[0] != source and not self._holds_rows():
                self.db.execute("UPDATE meta SET value = ? WHERE key = 'source'", (source,))
                return
        if row[0] != source:
            self.close()
            raise ResultsFolderError(f"{self.folder} holds the results of another source ({row[0]}); choose "
                                     "another --out, or delete it to start over")

    def _claim_decision(self, decision: dict) -> None:
        with self.db:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'decision'").fetchone()
            holds_rows = self._holds_rows()
            labelled = row is None and holds_rows
            if not holds_rows:  # nothing labelled under the recorded one (`_claim`)
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('decision', ?)",
                                (json.dumps(decision, sort_keys=True),))
                return
        if labelled:  # filled by a version that recorded no decision: taken as this one's, its rows
            self.close()  # kept their old labels under this run's policy and models in summary.json
            raise ResultsFolderError(f"{self.folder} holds rows labelled by an older cervixqc that did not record "
                                     "its policy and models: they would count as done under these; choose another "
                                     "--out, or delete it to label everything again")
        before = json.loads(row[0])
        # a record made before the findings' card was part of it, completed only where the rows'
        # own flags were judged under this one
        judged_here = "findings" in before or findings_agree(findings_of_rows(self.db, "results"), decision)
        if recorded_before_thresholds(before, decision) and not decision["site_calibrated"] and judged_here:
            # recorded before thresholds were: they moved only with the models then (a retrain),
            # so these rows were labelled under the cards' trained thresholds; its record is
            # completed. Not under thresholds a site chose since (calibrate-stage2): refused below
            with self.db:
                self.db.execute("UPDATE meta SET value = ? WHERE key = 'decision'",
                                (json.dumps(decision, sort_keys=True),))
            return
        if before == decision:
            return
        if recorded_before_findings(before, decision) and judged_here:  # the record completed
            with self.db:
                self.db.execute("UPDATE meta SET value = ? WHERE key = 'decision'",
                                (json.dumps(decision, sort_keys=True),))
            return
        self.close()
        changed = ([f"policy {before.get('policy')} -> {decision['policy']}"]
                   if before.get("policy") != decision["policy"] else [])
        models = before.get("models", {})
        changed += [f"{name} model" for name in sorted(set(models) | set(decision["models"]))
                    if models.get(name) != decision["models"].get(name)]
        if recorded_before_thresholds(before, decision):
            if decision["site_calibrated"]:
                changed.append(f"thresholds chosen at the site since ({', '.join(decision['site_calibrated'])}), "
                               "and the folder's rows recorded before thresholds were")
        else:
            thresholds = before.get("thresholds", {})
            changed += [f"{name} threshold" for name in sorted(set(thresholds) | set(decision["thresholds"]))
                        if models.get(name) == decision["models"].get(name)
                        and thresholds.get(name) != decision["thresholds"].get(name)]
        if before.get("findings", decision["findings"]) != decision["findings"] or not judged_here:
            changed.append("quality findings' card (findings.json)")
        same_models = len(changed) == 1 and before.get("policy") != decision["policy"]
        resume = f"pass --policy {before.get('policy')} to continue it, " if same_models else ""
        raise ResultsFolderError(f"{self.folder} holds labels decided otherwise ({', '.join(changed)}): its rows count "
                                 f"as done and would keep their old labels; {resume}choose another --out, or delete "
                                 "it to label everything again")

    def decision(self) -> dict | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'decision'").fetchone()
        return json.loads(row[0]) if row else None

    def quarantined_as(self) -> str | None:
        """The quarantine (folder and findings) the stored rows have their copies in."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'quarantined_as'").fetchone()
        return row[0] if row else None

    def mark_quarantined_as(self, setting: str | None) -> None:
        with self.db:
            self.db.execute("DELETE FROM meta WHERE key = 'quarantined_as'")
            if setting is not None:
                self.db.execute("INSERT INTO meta VALUES ('quarantined_as', ?)", (setting,))

    def done(self) -> set[str]:
        """Paths with a final row. A file the OS could not read (missing, no permission, an I/O
        error: `READ_AGAIN`) is tried again by the next run: a manifest row whose file arrives
        later, or a share that was briefly away, would otherwise stay `unreadable` for good. A
        file that was read but is not an image stays done."""
        return {row[0] for row in self.db.execute(f"SELECT path FROM results WHERE NOT {read_again_sql()}")}

    def changed(self, paths: Collection[str], stamp: Callable[[str], str | None]) -> dict[str, Stale]:
        """The stored rows of `paths` whose file's stamp is no longer the one stored. A file the
        OS cannot stat now (a share briefly away) is not taken as changed: its good row stays."""
        stale = {path: stored for path, stored in self.db.execute("SELECT path, stamp FROM results WHERE stamp IS NOT "
                                                                   "NULL")  # not the records: 1 kB each, 10^6 of them
                 if path in paths and (now := stamp(path)) is not None and now != stored}
        return {path: Stale(QCResult.model_validate_json(self.db.execute(
                    "SELECT record FROM results WHERE path = ?", (path,)).fetchone()[0]), stored)
                for path, stored in stale.items()}

    def copies_pending(self, results: list[QCResult], quarantine: Path) -> None:
        """Before a batch's copies are made: its rows, which `add` clears as it stores them."""
        if not results:
            return
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO pending_copies VALUES (?, ?, ?)",
                                [(r.path, r.model_dump_json(exclude={"timings_ms"}), str(quarantine))
                                 for r in results])

    def pending_copies(self) -> list[tuple[QCResult, Path]]:
        """The rows of a batch killed between its copies and its rows' storing, with their quarantine."""
        return [(QCResult.model_validate_json(rec), Path(q))
                for rec, q in self.db.execute("SELECT record, quarantine FROM pending_copies")]

    def forget_pending(self) -> None:
        with self.db:
            self.db.execute("DELETE FROM pending_copies")

    def add(self, results: list[QCResult], stamps: Mapping[str, str | None] | None = None) -> None:
        """`stamps`: each file's `file_stamp` as it was before the engine read it (none: not known)."""
        stamps = stamps or {}
        with self.db:
            self.db.executemany("DELETE FROM pending_copies WHERE path = ?", [(r.path,) for r in results])
            self.db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?)",
                                [(r.path, r.label.value, r.model_dump_json(exclude={"timings_ms"}), stamps.get(r.path))
                                 for r in results])
            self.db.execute("INSERT INTO meta VALUES ('writes', 1) "
                            "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1")

    def mark_exported(self, exported: str | None = None, files: Collection[Path] = ()) -> None:
        """The exports now hold every row written so far (read by `read_duplicates`, which
        regroups from the state when they lag it), made as `exported` says (`export_mark`),
        into `files` as they are now."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta SELECT 'exported_writes', "
                            "coalesce((SELECT value FROM meta WHERE key = 'writes'), 0)")
            if exported is not None:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('exported_as', ?)",
                                (json.dumps([exported, [file_stamp(f) for f in files]]),))

    def forget_export(self) -> None:
        """Before an export: a run killed between its renames leaves no mark that passes."""
        with self.db:
            self.db.execute("DELETE FROM meta WHERE key IN ('exported_as', 'pixel_unread')")

    def exports_current(self, exported: str, files: Collection[Path]) -> bool:
        """Whether the last exports hold every row written since, were made as `exported`,
        read every photo their pixel check asked for, and are still the files they wrote (not
        re-saved from a spreadsheet, not rewritten by another version: their `file_stamp`s)."""
        marks = dict(self.db.execute("SELECT key, value FROM meta WHERE key IN ('writes', 'exported_writes', "
                                     "'exported_as', 'pixel_unread')"))
        return (str(marks.get("writes", 0)) == str(marks.get("exported_writes"))
                and marks.get("exported_as") == json.dumps([exported, [file_stamp(f) for f in files]])
                and str(marks.get("pixel_unread", 0)) == "0")

    def verdicts(self, pairs: list[tuple[str, str]], setting: str) -> dict[tuple[str, str], bool]:
        """The pixel check's stored verdicts of these photo pairs (`VerdictStore`)."""
        with self.db:
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS asked (a TEXT, b TEXT)")
            self.db.execute("DELETE FROM asked")
            self.db.executemany("INSERT INTO asked VALUES (?, ?)", pairs)
        rows = self.db.execute("SELECT v.a, v.b, v.copy FROM asked JOIN verdicts v USING (a, b) WHERE v.setting = ?",
                               (setting,))
        return {(a, b): bool(copy) for a, b, copy in rows}

    def add_verdicts(self, verdicts: Mapping[tuple[str, str], bool], setting: str, unread: int = 0) -> None:
        """The new verdicts, and how many pairs went without one (an export after photos that
        could not be read is not kept by a rerun: they are asked again)."""
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?)",
                                [(a, b, setting, int(copy)) for (a, b), copy in verdicts.items()])
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('pixel_unread', ?)", (unread,))

    def labels(self) -> Iterator[tuple[str, str]]:
        """(path, label) of every row, without parsing the records (2.4 s of 10^5 rows' export)."""
        yield from self.db.execute("SELECT path, label FROM results")

    def records(self, only: Collection[str] | None = None) -> Iterator[QCResult]:
        """Every row, or those whose path is in `only` (told apart before the JSON is parsed:
        rows of files gone from the source were parsed and dropped, on each of three reads)."""
        for path, rec in self.db.execute("SELECT path, record FROM results ORDER BY path"):
            if only is None or path in only:
                yield QCResult.model_validate_json(rec)

    def close(self) -> None:
        self.db.close()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None


def file_stamp(path: Path) -> str | None:
    """What says a file was replaced or edited since it was read: its size and modification
    time (of the photo a link names), None where the OS cannot stat it. Not its sha256: a
    rerun over 10^6 photos would read them all again to learn that none changed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"
