"""Batch cleaning of a retrospective collection: `cervixqc clean SRC --out RESULTS`.

State lives in RESULTS/state.sqlite, one row per input path (the primary key), written one
batch per transaction: a run killed at any moment (kill -9 included) resumes with no lost
and no duplicate row, and a rerun of a finished job only tries again the files the OS could
not read and the files changed since their rows were written (`StateStore.done`: size and
modification time). results.csv and
results.parquet are exported from that state atomically at the end. Originals are only
ever read; the quarantine holds hard links (copies across file systems) mirroring the
relative paths, under one folder per label, and (when asked) one per quality finding.
Duplicates are a property of the whole collection: they are grouped at export, from the
keys every result carries (sha256, hashes, embedding), and written to every row plus
duplicates.csv.
"""

from __future__ import annotations

import errno
import fcntl
import filecmp
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import pandas as pd

from pipelines.data.schema import has_backslash, on_disk, row_key
from pipelines.engine.qc_result import CSV_TEXT_FIELDS, Label, QCResult, read_again_sql, spreadsheet_safe
from pipelines.outputs import sweep_temporaries, write_atomically, write_together

# Neither loads with this module: the duplicate search (faiss, OpenCV) only when a run exports,
# the engine (torch, 8 s of a 10 s `clean` on an empty folder) only once the command's checks pass
if TYPE_CHECKING:
    from pipelines.data.copy_check import VerdictStore
    from pipelines.engine.qc import QCPipeline

log = logging.getLogger(__name__)
QUARANTINED = (Label.NON_REGULAR, Label.NO_CERVIX, Label.UNREADABLE)


def quarantine_folders(result: QCResult, findings: Collection[str] = ()) -> list[str]:
    """Where a result's file is copied: its label's folder when the label is quarantined, and
    one folder per flagged finding named in `findings` (a blurred regular photo goes to
    blur/ only). Findings folders never change the label."""
    folders = [result.label.value] if result.label in QUARANTINED else []
    return folders + [name for name in result.flags() if name in findings]


@dataclass
class CleanSummary:
    total: int
    processed_now: int
    skipped_done: int
    by_label: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    results_csv: Path | None = None
    results_parquet: Path | None = None
    decision: dict | None = None  # the policy, models' sha256s and thresholds every row was labelled under


# What file servers and operating systems keep beside the photos, never a photo of the
# collection: Synology's thumbnails (`@eaDir/IMG_1.jpg/SYNOPHOTO_THUMB_M.jpg`, which became
# extra rows, near duplicates and quarantine copies), recycle bins and snapshots, Windows'
# thumbnail caches. Hidden names (a leading dot: .DS_Store, ._foo.jpg) are skipped as well.
HOUSEKEEPING_FOLDERS = frozenset({"@eaDir", "#recycle", "#snapshot", "$RECYCLE.BIN", "System Volume Information",
                                  "lost+found"})
HOUSEKEEPING_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"})
# edit sidecars beside photos, never a picture: iPhones' .AAE (every edited photo has one) and
# XMP; each was an `unreadable` row and a quarantine copy among the damaged photos
HOUSEKEEPING_SUFFIXES = (".aae", ".xmp")
# tables and notes kept beside the photos (a dataset's manifest.csv and coco.json, a site's
# labels.xlsx, a README): each was an `unreadable` row and a quarantine copy among the damaged
# photos, so a cleaned collection read "2 damaged" for its own label files. Skipped by name and
# counted in a log line; a photo saved under such a name is not looked for
DOCUMENT_SUFFIXES = (".csv", ".tsv", ".json", ".txt", ".md", ".html", ".log", ".pdf", ".doc", ".docx", ".xls",
                     ".xlsx", ".ods", ".odt")


# A screening collection is cervix photos with a few strays. A far larger no_cervix share says
# more about stage 0 at this site than about the collection: the bundled weights' first trial
# on real photos from other sites called 34% of their cervixes no_cervix (issue 13), and stage 0
# with a cervix source left out of its training found only 0.45-0.91 of that source's photos
# (weights/README.md, "How far stage 0 carries"). A quarter is a choice, not a measurement: no
# real archive's share of strays (the room, a covered lens) is known here; the synthetic
# collections draw 10-15% of scenes without a cervix, and a quarter leaves room above that.
# Below 20 photos one stray moves the share by 5 points. A quarter of the files unreadable is
# a folder of other things (documents, DICOM files, another program's exports) or a share
# failing: a job over 30,000 such files ended `done` without a word (an audit; `clean` exits 1
# only when not one file is readable). The same quarter and 20 hold for both notes.
NOTE_SHARE = 0.25
NOTE_MIN_FILES = 20


def _many(n: int, of: int) -> bool:
    return of >= NOTE_MIN_FILES and n >= NOTE_SHARE * of


def run_notes(by_label: Mapping[str, int]) -> list[str]:
    """What a user should look at before trusting a run's labels, from its counts by label
    (`clean` prints them, a job's status carries them). The labels stand either way."""
    return list(_notes(by_label).values())


def _notes(by_label: Mapping[str, int]) -> dict[str, str]:
    """`run_notes` by what they are about, so that `NoteWatch` says each one once."""
    notes = {}
    files = sum(by_label.values())
    bad = by_label.get(Label.UNREADABLE.value, 0)
    if _many(bad, files):
        notes["unreadable"] = (
            f"{bad} of {files} files ({bad / files:.0%}) could not be read as photos: the wrong folder (documents, "
            "DICOM files, another program's exports), damaged copies, or a share that dropped? Each file's reason is "
            "in the results' error column; those the OS could not read are tried again by the next run (a job's: "
            "Retry)")
    judged = files - bad
    n = by_label.get(Label.NO_CERVIX.value, 0)
    if _many(n, judged):
        notes["no_cervix"] = (
            f"{n} of {judged} readable photos ({n / judged:.0%}) were called no_cervix, far more than a screening "
            "collection holds: stage 0 may not know this site's photos (close-ups, another camera or light). Look at "
            "some of them before trusting the label; if they show cervixes, fit a presence head on the site's own "
            "labelled photos (README, \"Site adaptation\")")
    return notes


class NoteWatch:
    """A run's labels counted as its batches are stored, so that a note (`run_notes`) is said
    when it first holds, not at the end: a 10^6-photo `clean` runs for hours, and a site
    whose cervixes stage 0 misses learnt it only then. Each note is said once, with the counts
    so far (the run's end says it again over all rows, or not when the share fell back); a
    resume counts the rows done before it. `say` None counts nothing."""

    def __init__(self, say: Callable[[str], None] | None, labels: Iterable[str] = ()):
        self.say, self.counts, self.said = say, Counter(), set[str]()
        self.add(labels)

    def add(self, labels: Iterable[str]) -> None:
        if self.say is None:
            return
        self.counts.update(labels)
        for about, note in _notes(self.counts).items():
            if about not in self.said:
                self.said.add(about)
                self.say(note)


def _rows(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:10])) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")


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


_PHOTO_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"II*\x00", b"MM\x00*", b"BM", b"GIF8")


def _is_photo(path: Path) -> bool:
    """By the first bytes of the formats the engine reads: a manifest is text and never starts
    so, and twelve bytes tell a photo given as SRC apart without decoding it."""
    try:
        with path.open("rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head.startswith(_PHOTO_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _folder_files(src: Path, skipped: Counter) -> Iterator[str]:
    """The row keys of a folder's files as `list_inputs` takes them, walked lazily; what it
    skips is counted into `skipped`."""
    def cannot_list(_: OSError) -> None:
        skipped["unreadable"] += 1

    for root, dirs, files in os.walk(src, onerror=cannot_list):
        skipped["housekeeping"] += sum(d in HOUSEKEEPING_FOLDERS for d in dirs)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in HOUSEKEEPING_FOLDERS)
        # links to folders are not followed (a loop, or a way out of the source); counted, since
        # their files get no row: link the files, or list them in a manifest
        skipped["folder_links"] += sum(os.path.islink(os.path.join(root, d)) for d in dirs)
        for f in files:
            if f.lower() in HOUSEKEEPING_FILES or f.lower().endswith(HOUSEKEEPING_SUFFIXES):
                skipped["housekeeping"] += 1
            elif f.lower().endswith(DOCUMENT_SUFFIXES) and not f.startswith("."):
                skipped["documents"] += 1
            elif not f.startswith("."):
                yield row_key((Path(root) / f).relative_to(src).as_posix())


def holds_files(src: Path) -> bool:
    """Whether a folder source has one file to clean, found without listing it all (the service
    answers a job request with it: an unmounted share's empty folder ended `done`, 0 files)."""
    return next(_folder_files(src, Counter()), None) is not None


def list_inputs(src: Path) -> list[str]:
    """Relative paths (posix) of every non-hidden file under a folder, or a manifest's paths
    relative to the manifest's folder. Sorted, so runs and resumes see the same order.

    A manifest without a `path` column, or with a row whose path is blank, is refused with a
    ValueError that names the rows: a blank row was processed and then fell out of the job's
    results. Paths are normalised (`./a.jpg` is `a.jpg`), so one file is one row. A folder's hidden
    names and `HOUSEKEEPING_FOLDERS`/`HOUSEKEEPING_FILES` are skipped (counted in a log line);
    a manifest's rows are taken as listed."""
    if src.is_file():
        from pipelines.data.manifest import file_key, manifest_header, read_table

        if _is_photo(src):  # read as a table, it was told to save itself as "CSV UTF-8" (an audit)
            raise ValueError(f"{src.name} is a photo, not a folder or manifest: give its folder, or use "
                             "`cervixqc predict` for single photos")

        table = manifest_header(read_table(src), src)
        if "path" not in table.columns:
            raise ValueError(f"{src.name}: no 'path' column (it has: {', '.join(map(str, table.columns)) or 'none'})")
        paths = ["" if pd.isna(p) else str(p).strip() for p in table["path"]]
        blank = [k + 2 for k, p in enumerate(paths) if not p]  # the header is row 1, as a spreadsheet shows it
        if blank:
            raise ValueError(f"{src.name}: empty path on row {_rows(blank)} (the header is row 1)")
        # a sheet written on Windows (`sub\b.jpg`, `C:\data\a.jpg`): each such row was read as a
        # missing file, and the job ended "done" with them unreadable and retryable for good
        windows = [k + 2 for k, p in enumerate(paths)
                   if has_backslash(p) and not os.path.lexists(on_disk(src.parent, p))]
        if windows:
            example = paths[windows[0] - 2]
            raise ValueError(f"{src.name}: a path written with \\ on row {_rows(windows)} (the header is row 1), "
                             f"such as {example!r}: no such file; write paths with / relative to the manifest's folder")
        # one row per file: `sub/../a.jpg` and `/abs/folder/a.jpg` are `a.jpg`, the first
        # spelling kept as its key (the file was read and stored once per spelling)
        first: dict[str, str] = {}
        for p in paths:
            first.setdefault(file_key(src.parent, p), PurePosixPath(p).as_posix())
        return sorted(first.values())
    skipped: Counter = Counter()
    out = list(_folder_files(src, skipped))
    housekeeping, folder_links, unreadable = skipped["housekeeping"], skipped["folder_links"], skipped["unreadable"]
    if housekeeping:
        log.info("%d file-server or system entries skipped (thumbnail caches, recycle bins, edit sidecars: "
                 "HOUSEKEEPING_FOLDERS, HOUSEKEEPING_FILES, HOUSEKEEPING_SUFFIXES in pipelines/clean.py)", housekeeping)
    if skipped["documents"]:
        log.info("%d tables and notes skipped, not photos (.csv, .json, .txt, .xlsx ...: DOCUMENT_SUFFIXES in "
                 "pipelines/clean.py)", skipped["documents"])
    if folder_links:
        log.warning("%d links to folders not followed: their files get no row (list them in a manifest)", folder_links)
    if unreadable:  # a subfolder the service's user may not list: its files were left out unsaid
        log.warning("%d folders could not be listed (permissions?): their files get no row", unreadable)
    unique = sorted(set(out))
    if len(unique) < len(out):  # `Pe\xf1a.jpg` in Latin-1 and a file literally named so: one row
        log.warning("%d files are spelt as another file's row (a name that is not UTF-8, written with \\xNN, "
                    "beside a file literally named so): only one of each gets a row; rename them", len(out) - len(unique))
    return unique


# The state's format, as SQLite's user_version: 1 = results with their files' stamps, the source
# and the decision in meta. 0 is a folder written before the version was recorded (readable).
# A newer format is refused rather than half-read.
STATE_FORMAT = 1


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
        self.db.execute(f"PRAGMA user_version = {STATE_FORMAT}")
        if source is not None:
            self._claim(str(source.resolve()))
        if decision is not None:
            self._claim_decision(decision)

    def _claim(self, source: str) -> None:
        with self.db:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'source'").fetchone()
            if row is None:  # a new folder, or one filled before the source was recorded: taken as this source's
                self.db.execute("INSERT INTO meta VALUES ('source', ?)", (source,))
                return
        if row[0] != source:
            self.close()
            raise ResultsFolderError(f"{self.folder} holds the results of another source ({row[0]}); choose "
                                     "another --out, or delete it to start over")

    def _claim_decision(self, decision: dict) -> None:
        with self.db:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'decision'").fetchone()
            labelled = row is None and self.db.execute("SELECT 1 FROM results LIMIT 1").fetchone() is not None
            if row is None and not labelled:
                self.db.execute("INSERT INTO meta VALUES ('decision', ?)", (json.dumps(decision, sort_keys=True),))
                return
        if labelled:  # filled by a version that recorded no decision: taken as this one's, its rows
            self.close()  # kept their old labels under this run's policy and models in summary.json
            raise ResultsFolderError(f"{self.folder} holds rows labelled by an older cervixqc that did not record "
                                     "its policy and models: they would count as done under these; choose another "
                                     "--out, or delete it to label everything again")
        before = json.loads(row[0])
        if recorded_before_thresholds(before, decision) and not decision["site_calibrated"]:
            # recorded before thresholds were: they moved only with the models then (a retrain),
            # so these rows were labelled under the cards' trained thresholds; its record is
            # completed. Not under thresholds a site chose since (calibrate-stage2): refused below
            with self.db:
                self.db.execute("UPDATE meta SET value = ? WHERE key = 'decision'",
                                (json.dumps(decision, sort_keys=True),))
            return
        if before == decision:
            return
        self.close()
        changed = ([f"policy {before.get('policy')} -> {decision['policy']}"]
                   if before.get("policy") != decision["policy"] else [])
        models = before.get("models", {})
        changed += [f"{name} model" for name in sorted(set(models) | set(decision["models"]))
                    if models.get(name) != decision["models"].get(name)]
        if recorded_before_thresholds(before, decision):
            changed.append(f"thresholds chosen at the site since ({', '.join(decision['site_calibrated'])}), "
                           "and the folder's rows recorded before thresholds were")
        else:
            thresholds = before.get("thresholds", {})
            changed += [f"{name} threshold" for name in sorted(set(thresholds) | set(decision["thresholds"]))
                        if models.get(name) == decision["models"].get(name)
                        and thresholds.get(name) != decision["thresholds"].get(name)]
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

    def add(self, results: list[QCResult], stamps: Mapping[str, str | None] | None = None) -> None:
        """`stamps`: each file's `file_stamp` as it was before the engine read it (none: not known)."""
        stamps = stamps or {}
        with self.db:
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


class QuarantineUnwritable(OSError):
    """The quarantine itself takes no copy (full, read-only, no permission). Raised before the
    batch's rows are stored, so that the run (or the job, on retry) does the batch again once
    the folder is fixed: stored rows without their copies were flagged photos left in the
    collection, with the run reported done."""


_FOLDER_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
# the folder's fault when they name a path inside it: no permission, a share dropped (I/O
# error, stale handle, not connected); on the original they are the file's
_INSIDE_ERRORS = {errno.EACCES, errno.EPERM, errno.EIO, errno.ESTALE, errno.ENOTCONN}


def _quarantine_fault(e: OSError, qdir: Path) -> bool:
    """The folder's fault, not the file's: no space or a read-only file system, one of
    `_INSIDE_ERRORS` on a path inside the quarantine, or a quarantine that is no longer a
    folder (replaced by a file: every copy failed, counted as the files' faults, and the job
    ended `done` with its flagged photos left in place)."""
    if e.errno in _FOLDER_ERRORS:
        return True
    named = [Path(f) for f in (e.filename, e.filename2) if isinstance(f, (str, os.PathLike))]
    if e.errno in _INSIDE_ERRORS and any(p.is_relative_to(qdir) for p in named):
        return True
    # the quarantine, or one of its label or finding folders, replaced by a file
    folders = [qdir, qdir.parent] + [qdir / p.relative_to(qdir).parts[0] for p in named
                                     if p.is_relative_to(qdir) and p != qdir]
    return e.errno in (errno.ENOTDIR, errno.EEXIST) and any(part.exists() and not part.is_dir() for part in folders)


def quarantine_results(src_root: Path, results: Iterable[QCResult], qdir: Path, findings: Collection[str] = (),
                       link: bool = True) -> int:
    """Each result's file into every folder `quarantine_folders` names (files gone since are
    skipped). A file the OS cannot stat or copy (a name too long for it, a link loop) is
    skipped and counted (returned): it failed its whole batch, on every retry of the job. A
    quarantine that cannot be written raises QuarantineUnwritable."""
    failed = 0
    for r in results:
        folders = quarantine_folders(r, findings)
        try:
            if folders and on_disk(src_root, r.path).is_file():
                for folder in folders:
                    quarantine_copy(src_root, r.path, folder, qdir, link)
        except OSError as e:
            if _quarantine_fault(e, qdir):
                raise QuarantineUnwritable(e.errno, f"the quarantine cannot be written ({e.strerror}); this batch "
                                                    "was not stored: free space or fix the folder's permissions, "
                                                    "then resume (the same command again, or retry the job)") from None
            failed += 1
    if failed:  # counted, not named: logs carry no file names
        log.warning("%d flagged files could not be copied into the quarantine", failed)
    return failed


def quarantine_path(qdir: Path, folder: str, rel: str) -> Path:
    """Where the copy of `rel` lives in `folder` (a label or a finding) of the quarantine. A
    manifest may name absolute paths or climb with '..': mirrored inside qdir, never outside it
    (qdir / "/abs" would be "/abs", the original itself)."""
    parts = [("__" if part == ".." else part) for part in Path(rel).parts if part not in ("/", "")]
    return qdir / str(folder) / Path(*parts)


def _same_file(a: Path, b: Path) -> bool:
    """One file, or two with the same bytes."""
    try:
        return _same_inode(a, b) or (a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False))
    except OSError:
        return False


def quarantine_copy(src_root: Path, rel: str, folder: str, qdir: Path, link: bool = True) -> None:
    """Put one flagged original at qdir/folder/rel (folder: a label or a finding); the original is only read. `link` uses a
    hard link where the file system allows (no extra space); the service passes False, since
    a quarantine others open and edit must not share an inode with the original."""
    target = quarantine_path(qdir, folder, rel)
    source = on_disk(src_root, rel)
    if target.exists():
        # taken as this file's copy (a resumed batch) only when it is: on a quarantine that
        # ignores letter case or Unicode form (exFAT, SMB, macOS), `A.JPG`'s copy stood for
        # `a.jpg`, and the second flagged photo was never copied, unsaid; now it is counted
        if not _same_file(source, target):
            raise FileExistsError(errno.EEXIST, "the quarantine holds another file under this name", str(target))
        return
    target.parent.mkdir(parents=True, exist_ok=True)

    def link_or_copy(tmp: Path) -> None:
        if link:
            try:
                # link(2) does not follow a symlink (nor does os.link on Linux, follow_symlinks or
                # not): a linked photo's quarantine entry was a copy of the link, dangling
                # where the link was relative, and the original itself where it was absolute
                os.link(os.path.realpath(source), tmp)
                return
            except OSError:  # another file system, or links not allowed: copy instead
                pass
        shutil.copy2(source, tmp)

    write_atomically(target, link_or_copy)


def export(store: StateStore, out_dir: Path, src_root: Path | None = None,
           inputs: Collection[str] | None = None) -> tuple[Path, Path]:
    """The state's records written out; `src_root` (the photos' folder) lets the duplicate
    search check cropped and turned copies with the pixels. Given the run's `inputs`, only
    their rows: a file deleted from the source (or a row taken out of its manifest) since an
    earlier run no longer appears in the results."""
    records = store.records if inputs is None else (lambda: store.records(inputs))
    return export_records(records, out_dir, read=None if src_root is None else reader(src_root), verdicts=store)


def finish_run(store: StateStore, out_dir: Path, src_root: Path | None, inputs: list[str], processed_now: int,
               skipped_done: int, t0: float) -> CleanSummary:
    """Exports and summary.json of a run (local or Ray), over the rows of the current inputs;
    `src_root` None leaves out the duplicate search's pixel check. A rerun that changed
    nothing (no row written, the same inputs, the same kind of export, the files still there)
    keeps the exports it finds: reading and writing them again was minutes at 10^6 photos."""
    current = set(inputs)
    mark = export_mark(inputs, src_root is not None)
    csv_path, pq_path = out_dir / "results.csv", out_dir / "results.parquet"
    files = [csv_path, pq_path, out_dir / "duplicates.csv"]
    if not (processed_now == 0 and store.exports_current(mark, files)):
        store.forget_export()
        csv_path, pq_path = export(store, out_dir, src_root, current)
        store.mark_exported(mark, files)
    labels = Counter(label for path, label in store.labels() if path in current)
    summary = CleanSummary(len(inputs), processed_now, skipped_done, dict(labels), time.perf_counter() - t0,
                           csv_path, pq_path, store.decision())
    write_atomically(out_dir / "summary.json", lambda p: p.write_text(json.dumps(
        {k: str(v) if isinstance(v, Path) else v for k, v in summary.__dict__.items()}, indent=2)))
    return summary


def export_mark(inputs: list[str], pixel_check: bool) -> str:
    """What a run's exports are made of: the code that writes them (this module, the result
    schema, the duplicate search with its keys and pixel check, the file writers: by their
    source, since an upgrade within one version number changes the files too), the pixel
    check on or off, and the inputs (a file deleted since drops out of them)."""
    from pipelines import outputs
    from pipelines.data import copy_check, duplicates, schema
    from pipelines.engine import hashes, qc_result

    digest = hashlib.sha256(json.dumps(pixel_check).encode())
    for module in (__file__, qc_result, duplicates, copy_check, hashes, outputs, schema):
        digest.update(Path(module if isinstance(module, str) else module.__file__).read_bytes())
    for path in sorted(inputs):
        digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


# In a quarantine: the source folder whose copies it holds. Two sources' photos at one relative
# path (two clinics' field/IMG_0001.jpg) met in a shared quarantine: the second's copy was
# skipped with a count in a warning, its row stored, the run reported done, and the photo stayed
# among those a site keeps (an audit). The service refuses such a job (409 quarantine_in_use).
# A hidden name: listing the quarantine as a source skips it. A quarantine filled before the
# marker existed is claimed by the next run that uses it.
QUARANTINE_SOURCE = ".cervixqc-source"


def source_root(src: Path) -> Path:
    """The folder a source's relative paths start from (a manifest's own folder)."""
    return (src.parent if src.is_file() else src).resolve()


def check_outputs(src: Path, out_dir: Path, quarantine: Path | None) -> None:
    """Results and quarantine outside a folder source: inside it, a run overwrote originals
    named results.csv, and a rerun cleaned its own state, exports and quarantine copies. A
    quarantine another source's runs use is refused (QUARANTINE_SOURCE)."""
    marker = None if quarantine is None else quarantine / QUARANTINE_SOURCE
    if marker is not None and marker.is_file():
        owner = marker.read_text(encoding="utf-8", errors="surrogateescape").strip()
        if owner != str(source_root(src)):
            raise ValueError(f"--quarantine {quarantine} holds the copies of another source ({owner}): photos of two "
                             "sources at one relative path would meet there; give each source its own quarantine")
    if src.is_file():
        return
    root = src.resolve()
    for name, folder in (("--out", out_dir), ("--quarantine", quarantine)):
        if folder is not None and folder.resolve().is_relative_to(root):
            raise ValueError(f"{name} {folder} is inside the source folder {src}: put it outside")


def reader(root: Path) -> Callable[[str], bytes]:
    """A collection's photos by the paths its records carry (relative to `root`)."""
    return lambda rel: on_disk(root, rel).read_bytes()


EXPORT_CHUNK = 20_000  # rows a chunk of the exports holds in memory


def export_records(records: Callable[[], Iterable[QCResult]], out_dir: Path,
                   duplicates: pd.DataFrame | None = None,
                   read: Callable[[str], bytes] | None = None,
                   verdicts: VerdictStore | None = None) -> tuple[Path, Path]:
    """results.csv, results.parquet and duplicates.csv, each written to a temporary name and
    renamed. Without `duplicates` they are grouped here over the whole collection first; then
    every row carries its group. The rows are streamed in chunks of EXPORT_CHUNK, each chunk
    written to both files: built as one table (and two copies of it) the exports held 3-3.7 KB
    a row at once, about 3.5 GB at 10^6, at the end of a run (or inside the service, for a
    job); a pass per file read, parsed and grouped every row twice: 100,200 rows took 6.26,
    5.68, 5.70 and 4.93 s so, and 3.39, 2.95, 3.84 and 4.11 s in one pass, the same bytes
    (`python -m tests.benchmarks.exports`, two sessions of two runs)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dups = collection_duplicates(records(), read, verdicts) if duplicates is None else duplicates
    group = {row.path: row for row in dups.itertuples(index=False)}
    csv_path, pq_path = out_dir / "results.csv", out_dir / "results.parquet"

    def write_both(csv_tmp: Path, pq_tmp: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer, schema = None, None
        try:
            with open(csv_tmp, "w", encoding="utf-8", newline="") as f:
                for i, df in enumerate(_result_frames(records(), group)):
                    df.assign(**{c: df[c].map(spreadsheet_safe) for c in CSV_TEXT_FIELDS}).to_csv(f, index=False,
                                                                                                 header=i == 0)
                    # Parquet keeps types: the box a list of floats and no box null (it was the
                    # CSV's text, "" beside the nulls of every other missing value)
                    typed = df.assign(cervix_box=df["cervix_box"].map(lambda b: json.loads(b) if b else None))
                    if writer is None:
                        schema = _parquet_schema(typed)
                        writer = pq.ParquetWriter(pq_tmp, schema)
                    writer.write_table(pa.Table.from_pandas(typed, schema=schema, preserve_index=False))
        finally:
            if writer is not None:
                writer.close()

    write_together({(csv_path, pq_path): write_both,
                    out_dir / "duplicates.csv": lambda p: dups.to_csv(p, index=False)})
    return csv_path, pq_path


def _result_frames(records: Iterable[QCResult], group: Mapping) -> Iterator[pd.DataFrame]:
    """The rows as results.csv's columns, EXPORT_CHUNK at a time (one empty frame for none)."""
    from pipelines.data.duplicates import with_group

    rows: list[dict] = []
    sent = False
    for r in records:
        rows.append(with_group(r, group.get(r.path)).csv_row())
        if len(rows) == EXPORT_CHUNK:
            yield _frame(rows)
            rows, sent = [], True
    if rows or not sent:
        yield _frame(rows)


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=QCResult.csv_fields())
    for column in ("width", "height", "duplicate_group"):  # 400, not 400.0, beside the blanks
        df[column] = df[column].astype("Int64")
    return df


def _parquet_schema(typed: pd.DataFrame):
    """results.parquet's columns, fixed: every chunk must match the first, and a column with
    no value in it (no duplicates, no error) was typed null, so its type changed from run to
    run. With pandas' metadata of the first chunk (read back as Int64, not float)."""
    import pyarrow as pa

    def arrow_type(name: str) -> pa.DataType:
        if name == "cervix_box":
            return pa.list_(pa.float64())
        if name in ("width", "height", "duplicate_group"):
            return pa.int64()
        if name.endswith("_score") or name == "resnest_prob":
            return pa.float64()
        return pa.string()

    return pa.schema([(name, arrow_type(name)) for name in QCResult.csv_fields()],
                     metadata=pa.Schema.from_pandas(typed, preserve_index=False).metadata)


def collection_duplicates(records: Iterable[QCResult], read: Callable[[str], bytes] | None = None,
                          verdicts: VerdictStore | None = None) -> pd.DataFrame:
    """Exact and near duplicates over a whole collection (pipelines/data/duplicates.py);
    `read(path)` gives the photos for the pixel check of cropped and turned copies, whose
    verdicts `verdicts` keeps between runs."""
    from pipelines.data.duplicates import DuplicateConfig, duplicates_of_records

    return duplicates_of_records(records, DuplicateConfig(), read, verdicts)


def file_stamp(path: Path) -> str | None:
    """What says a file was replaced or edited since it was read: its size and modification
    time (of the photo a link names), None where the OS cannot stat it. Not its sha256: a
    rerun over 10^6 photos would read them all again to learn that none changed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def plan_run(store: StateStore, inputs: list[str], src_root: Path) -> tuple[set[str], list[str], dict[str, Stale]]:
    """(done, todo, stale) of a run: todo are the inputs without a final row and those whose
    file changed since its row was written (`stale`, whose quarantine copies
    `drop_stale_copies` removes as each new row is stored)."""
    done = store.done() & set(inputs)
    stale = store.changed(done, lambda p: file_stamp(on_disk(src_root, p)))
    if stale:
        log.info("%d files changed since their rows were written: labelled again", len(stale))
        done -= set(stale)
    return done, [p for p in inputs if p not in done], stale


def done_labels(store: StateStore, done: Collection[str]) -> Iterator[str]:
    """The labels of the rows a run starts with (a resume's), for its `NoteWatch`."""
    return (label for path, label in store.labels() if path in done)


def quarantine_done_rows(store: StateStore, src_root: Path, quarantine: Path | None, findings: Collection[str],
                         done: Collection[str]) -> None:
    """The copies of rows stored before this quarantine, or these findings, were asked for: a
    rerun with a new or added --quarantine (or --quarantine-findings) copied nothing for the
    rows already done, exit 0 (an audit). The setting the rows have their copies under is
    kept in the state, so a rerun under the same one reads no record; copies are hard links,
    and those already there are taken as they are."""
    setting = None if quarantine is None else json.dumps([str(quarantine.resolve()), sorted(findings)])
    if store.quarantined_as() == setting:
        return
    if quarantine is not None and done:
        failed = quarantine_results(src_root, store.records(done), quarantine, findings)
        log.info("quarantine copies made for the rows of earlier runs (a new quarantine or findings)%s",
                 f"; {failed} could not be made" if failed else "")
    store.mark_quarantined_as(setting)


def drop_stale_copies(src_root: Path, quarantine: Path, stale: Iterable[Stale]) -> None:
    """The quarantine copies (under the old label and flags) of photos that changed since their
    rows, so that a copy of the old photo never stands for the new one. Only a copy that is
    that row's: the same file as the photo now (a hard link edited in place), or one with the
    size and time it was read under (a link or `copy2` of the old photo). A name another
    row's copy holds (two sources sharing a quarantine, `A.JPG` and `a.jpg` on exFAT) is
    left. Called as the new rows are stored: a run that fails before keeps the old copies."""
    failed = 0
    for s in stale:
        original = on_disk(src_root, s.record.path)
        for folder in dict.fromkeys([s.record.label.value, *s.record.flags()]):
            target = quarantine_path(quarantine, folder, s.record.path)
            try:
                if target.is_file() and (_same_inode(target, original) or file_stamp(target) == s.stamp):
                    target.unlink()
            except OSError:
                failed += 1
    if failed:
        log.warning("%d quarantine copies of changed photos could not be removed", failed)


def _same_inode(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def store_batch(store: StateStore, src_root: Path, quarantine: Path | None, findings: Collection[str],
                stale: dict[str, Stale], results: list[QCResult], stamps: Mapping[str, str | None]) -> None:
    """One labelled batch kept (local and Ray runs): the quarantine copies of the rows it
    replaces dropped, its own copies made, then its rows stored with their files' stamps."""
    if quarantine is not None:
        drop_stale_copies(src_root, quarantine, [stale.pop(r.path) for r in results if r.path in stale])
        quarantine_results(src_root, results, quarantine, findings)
    store.add(results, stamps)


def open_run(src: Path, out_dir: Path, quarantine: Path | None, decision: dict) -> StateStore:
    """The results folder's state, this run's from here on (flock; the same source and
    decision as its rows), with the temporary files an earlier, killed run left in it and in
    the quarantine swept away (local and Ray runs)."""
    store = StateStore(out_dir / "state.sqlite", source=src, decision=decision)
    for folder in (out_dir, quarantine):
        if folder is not None and folder.is_dir():
            sweep_temporaries(folder)
    if quarantine is not None and not (quarantine / QUARANTINE_SOURCE).is_file():  # checked by check_outputs
        quarantine.mkdir(parents=True, exist_ok=True)
        write_atomically(quarantine / QUARANTINE_SOURCE,
                         lambda p: p.write_text(f"{source_root(src)}\n", encoding="utf-8", errors="surrogateescape"))
    return store


def clean(qc: QCPipeline, src: Path, out_dir: Path, quarantine: Path | None = None, batch_size: int = 16,
          progress: Callable[[int, int], None] | None = None, quarantine_findings: Collection[str] = (),
          pixel_check: bool = True, inputs: list[str] | None = None,
          on_note: Callable[[str], None] | None = None) -> CleanSummary:
    """`inputs`: `list_inputs(src)` where the caller has it already (a 10^6-file share is listed once);
    `on_note` hears a note as soon as it holds for the rows so far (`NoteWatch`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    check_outputs(src, out_dir, quarantine)
    src_root = src.parent if src.is_file() else src
    inputs = list_inputs(src) if inputs is None else inputs
    store = open_run(src, out_dir, quarantine, qc.decision)
    t0 = time.perf_counter()
    try:
        done, todo, stale = plan_run(store, inputs, src_root)
        quarantine_done_rows(store, src_root, quarantine, quarantine_findings, done)
        chunks = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
        if progress:  # where the run starts (a resume: the rows already done)
            progress(len(done), len(inputs))
        notes = NoteWatch(on_note, done_labels(store, done))  # read only when heard
        stamps: dict[str, str | None] = {}  # stat before the engine reads (run_stream reads ahead)

        def batches() -> Iterator[tuple[list[Path], list[str]]]:
            for chunk in chunks:
                files = [on_disk(src_root, p) for p in chunk]
                stamps.update((p, file_stamp(f)) for p, f in zip(chunk, files))
                yield files, chunk

        finished = len(done)
        for chunk, results in zip(chunks, qc.run_stream(batches())):
            store_batch(store, src_root, quarantine, quarantine_findings, stale, results,
                        {p: stamps.pop(p, None) for p in chunk})
            notes.add(r.label.value for r in results)
            finished += len(chunk)
            if progress:
                progress(finished, len(inputs))
        summary = finish_run(store, out_dir, src_root if pixel_check else None, inputs, len(todo), len(done), t0)
    finally:
        store.close()
    return summary
