"""`cervixqc clean SRC --out RESULTS`: a local run over a collection, batch by batch, with the
steps a Ray run (`pipelines.clean.ray_run`) shares: the output checks, the run's state opened
and planned, each batch's rows and quarantine copies stored, the exports and summary at the
end. A rerun of a finished job only tries again the files the OS could not read and the
files changed since their rows were written."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.clean.exports import export, export_mark
from pipelines.clean.inputs import list_inputs
from pipelines.clean.notes import NoteWatch
from pipelines.clean.quarantine import (QUARANTINE_SOURCE, check_quarantine_names, drop_judged_copies,
                                        drop_stale_copies, quarantine_results, source_root, to_copy)
from pipelines.clean.state import Stale, StateStore, file_stamp
from pipelines.data.manifest import Spellings, name_spellings
from pipelines.data.schema import on_disk
from pipelines.engine.qc_result import QCResult
from pipelines.outputs import sweep_temporaries, write_atomically

# The engine (torch, 8 s of a 10 s `clean` on an empty folder) loads only once the command's checks pass
if TYPE_CHECKING:
    from pipelines.engine.qc import QCPipeline

log = logging.getLogger(__name__)

# What a run writes into --out (besides its .lock and temporaries)
OUTPUT_FILES = ("results.csv", "results.parquet", "duplicates.csv", "summary.json", "state.sqlite")


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
    quarantine_not_copied: int = 0  # flagged files without their quarantine copy (the next run tries again)


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
    if store.copies_missed:  # said in a log line alone, and never tried again by a rerun (an audit)
        store.mark_quarantined_as(None)  # so the next run copies the stored rows' files again
    summary = CleanSummary(len(inputs), processed_now, skipped_done, dict(labels), time.perf_counter() - t0,
                           csv_path, pq_path, store.decision(), store.copies_missed)
    write_atomically(out_dir / "summary.json", lambda p: p.write_text(json.dumps(
        {k: str(v) if isinstance(v, Path) else v for k, v in summary.__dict__.items()}, indent=2)))
    return summary


class OutputsRefused(ValueError):
    """The results folder or the quarantine cannot take this run (`check_outputs`, and the
    quarantine's claim as the run opens): the command's refusal, exit 2. Raised once the models
    were loaded (a second run claiming the quarantine meanwhile), it was a traceback, exit 1."""


def check_outputs(src: Path, out_dir: Path, quarantine: Path | None) -> None:
    """Results and quarantine outside a folder source: inside it, a run overwrote originals
    named results.csv, and a rerun cleaned its own state, exports and quarantine copies. A
    quarantine another source's runs use is refused (QUARANTINE_SOURCE), and so is a manifest
    source that is one of the files the run writes (`clean x/results.csv -o x` replaced the
    manifest with its results, exit 0: an audit)."""
    if quarantine is not None and (quarantine.resolve() == out_dir.resolve()):  # accepted (an audit)
        raise OutputsRefused(f"--quarantine {quarantine} is the results folder: the copies would mix with "
                             "results.csv and the state; give the quarantine a folder of its own")
    if (out_dir / QUARANTINE_SOURCE).is_file():  # results tables among a later run's photos to clean (an audit)
        raise OutputsRefused(f"--out {out_dir} is a quarantine (it holds {QUARANTINE_SOURCE}): write the results "
                             "elsewhere")
    marker = None if quarantine is None else quarantine / QUARANTINE_SOURCE
    if marker is not None and marker.is_file():
        owner = marker.read_text(encoding="utf-8", errors="surrogateescape").strip()
        if owner != str(source_root(src)):
            raise OutputsRefused(f"--quarantine {quarantine} holds the copies of another source ({owner}): photos of "
                                 "two sources at one relative path would meet there; give each source its own "
                                 "quarantine")
    if src.is_file():
        for name in OUTPUT_FILES:
            if (out_dir / name).is_file() and os.path.samefile(out_dir / name, src):
                raise OutputsRefused(f"--out {out_dir}: the run writes its {name}, which is the source manifest "
                                     f"{src}; write the results elsewhere")
    foreign = [n for n in OUTPUT_FILES if (out_dir / n).exists()] if not (out_dir / "state.sqlite").exists() else []
    if foreign:  # another program's results.csv or summary.json was replaced, exit 0 (an audit)
        raise OutputsRefused(f"--out {out_dir} holds {', '.join(foreign)} but no state.sqlite: not a clean run's "
                             "results folder, and they would be replaced; choose another --out")
    if src.is_file():
        return
    root = src.resolve()
    for name, folder in (("--out", out_dir), ("--quarantine", quarantine)):
        if folder is not None and folder.resolve().is_relative_to(root):
            raise OutputsRefused(f"{name} {folder} is inside the source folder {src}: put it outside")


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
                         done: Collection[str]) -> Path | None:
    """The copies of rows stored before this quarantine, or these findings, were asked for: a
    rerun with a new or added --quarantine (or --quarantine-findings) copied nothing for the
    rows already done, exit 0 (an audit). The setting the rows have their copies under is
    kept in the state, so a rerun under the same one reads no record; copies are hard links,
    and those already there are taken as they are. Returns the quarantine the stored rows had
    their copies in before this run (None: none), where the copies of its changed photos are."""
    setting = None if quarantine is None else json.dumps([str(quarantine.resolve()), sorted(findings)])
    before = store.quarantined_as()
    copies_in = None if before is None else Path(json.loads(before)[0])
    if before == setting:
        return copies_in
    if quarantine is not None and done:
        failed = quarantine_results(src_root, store.records(done), quarantine, findings)
        store.copies_missed += failed
        log.info("quarantine copies made for the rows of earlier runs (a new quarantine or findings)%s",
                 f"; {failed} could not be made" if failed else "")
    store.mark_quarantined_as(setting)
    return copies_in


def store_batch(store: StateStore, src_root: Path, quarantine: Path | None, findings: Collection[str],
                stale: dict[str, Stale], results: list[QCResult], stamps: Mapping[str, str | None],
                copies_in: Path | None = None, spellings: Spellings | None = None) -> None:
    """One labelled batch kept (local and Ray runs): the quarantine copies of the rows it
    replaces dropped, its own copies made, then its rows stored with their files' stamps.
    The old copies are looked for in this run's quarantine and in `copies_in`, the one the
    rows had their copies in (`quarantine_done_rows`): a photo changed while a run had no
    quarantine, or another one, kept the old photo's copy for good (an audit)."""
    results = name_spellings(results, spellings)  # a manifest's rows: a file spelt otherwise is named
    replaced = [stale.pop(r.path) for r in results if r.path in stale]
    for folder in dict.fromkeys(f for f in (quarantine, copies_in) if f is not None):
        drop_stale_copies(src_root, folder, replaced)
    if quarantine is not None:
        store.copies_pending(to_copy(results, findings), quarantine)
        store.copies_missed += quarantine_results(src_root, results, quarantine, findings)
    store.add(results, stamps)


def open_run(src: Path, out_dir: Path, quarantine: Path | None, decision: dict) -> StateStore:
    """The results folder's state, this run's from here on (flock; the same source and
    decision as its rows), with the temporary files an earlier, killed run left in it and in
    the quarantine swept away (local and Ray runs)."""
    store = StateStore(out_dir / "state.sqlite", source=src, decision=decision)
    for folder in (out_dir, quarantine):
        if folder is not None and folder.is_dir():
            sweep_temporaries(folder)
    if quarantine is not None:
        claim_quarantine(quarantine, src)
    drop_orphan_copies(store)
    return store


def drop_orphan_copies(store: StateStore) -> None:
    """The copies of a batch killed after its quarantine copies and before its rows were
    stored (`drop_judged_copies`); its files are labelled again by this run."""
    removed = drop_judged_copies(store.pending_copies())
    if removed:
        log.info("%d quarantine copies of a batch stopped before its rows were stored removed", removed)
    store.forget_pending()


def claim_quarantine(quarantine: Path, src: Path) -> None:
    """The quarantine's QUARANTINE_SOURCE made this source's in one step (created only where
    no file has the name: O_EXCL), else read: two runs of two sources started together both
    passed `check_outputs` before either had written it, and the second's marker replaced the
    first's (an audit). Not a hard link: a quarantine's disk may take none (exFAT, SMB)."""
    quarantine.mkdir(parents=True, exist_ok=True)
    marker, owner = quarantine / QUARANTINE_SOURCE, str(source_root(src))
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(f"{owner}\n")
            f.flush()
            os.fsync(f.fileno())
    held = ""
    for _ in range(40):  # another run's claim, created and not yet written
        held = marker.read_text(encoding="utf-8", errors="surrogateescape").strip()
        if held:
            break
        time.sleep(0.05)
    if held != owner:
        raise OutputsRefused(f"--quarantine {quarantine} holds the copies of another source ({held}): photos of two "
                             "sources at one relative path would meet there; give each source its own quarantine")


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
    spellings = Spellings(src_root) if src.is_file() else None
    inputs = list_inputs(src) if inputs is None else inputs
    if quarantine is not None:
        check_quarantine_names(inputs)
    store = open_run(src, out_dir, quarantine, qc.decision)
    t0 = time.perf_counter()
    try:
        done, todo, stale = plan_run(store, inputs, src_root)
        copies_in = quarantine_done_rows(store, src_root, quarantine, quarantine_findings, done)
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
                        {p: stamps.pop(p, None) for p in chunk}, copies_in, spellings)
            notes.add(r.label.value for r in results)
            finished += len(chunk)
            if progress:
                progress(finished, len(inputs))
        summary = finish_run(store, out_dir, src_root if pixel_check else None, inputs, len(todo), len(done), t0)
    finally:
        store.close()
    return summary
