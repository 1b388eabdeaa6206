"""Helpers shared by the command modules."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer


def rate_text(x: float | None) -> str:
    """`-` for a rate with nothing to count (no positive, no image), never `nan`."""
    return "-" if x is None or x != x else f"{x:.3f}"


def command_line() -> str:
    """This command as typed, for the records its outputs keep (cards, calibrations, exports,
    evaluations): one spelling, rather than each command joining sys.argv its own way."""
    import shlex

    return shlex.join(["cervixqc", *sys.argv[1:]])


def run_record() -> dict[str, str]:
    """`command` and `created` (UTC, to the second) for an output's record."""
    import datetime

    return {"command": command_line(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def weights_missing(folder: Path) -> str | None:
    """Why `folder` holds no weights, or None: `cervixqc serve` and the engine commands say it
    alike, by its full path (the default is relative, and "no weights in weights" did not say
    where that was)."""
    if (folder / "detector.json").is_file():
        return None
    missing = "the folder does not exist" if not folder.exists() else \
        "expected detector.json, deep_sad.json and classifier.json"
    return f"no weights in {folder.resolve()}: {missing}"


def _fail(message: str, code: int = 2) -> NoReturn:
    """One `error:` line; exit 2 for a refusal before any work, 1 for work that failed."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def training_output(out: Path, card: str, resume: bool = False, one_shot: bool = False) -> None:
    """`-o` of a training command, checked before any data loads: training into a weights
    folder replaced its model there unsaid (the shipped detector, under a presence head of the
    old one's features; the colour scorer, and with it the folder's default policy). A run
    folder of the same model is resumed with --resume or refused by the loop. A `one_shot` fit
    (presence, colour: seconds, no checkpoint) is fitted again into its own run folder, told
    apart from a weights folder by the detector card every weights folder holds: its second
    run was refused as "a weights folder?" (an audit). An -o that cannot be written (a file,
    a read-only place) is refused first, exit 2, and nothing is left made: it was exit 1 from
    the catch-all after the data had loaded, or after presence's whole fit."""
    require_writable("-o", out, keep=False)
    if not (out / card).exists():
        return
    run_folder = any(out.rglob("checkpoint.pt"))
    # a detector's run folder too: its second fit there was told to pass --resume, which a
    # one-shot fit does not have (an audit)
    if one_shot and (run_folder or not (out / "detector.json").exists()):
        typer.echo(f"{out} holds an earlier {card}: fitting again replaces it", err=True)
        return
    if run_folder:
        if not resume:
            _fail(f"{out} already holds a training run: pass --resume to continue it, or choose another folder")
        return
    _fail(f"{out} holds {card} and no training run (a weights folder?): training would replace it; train into "
          "another folder and copy the files in")


# `-o` of the training commands whose loop checkpoints (pipelines/training/loop.py)
RunFolder = Annotated[Path, typer.Option("--out", "-o", help="Run folder: checkpoint, metrics.jsonl and the best "
                                                             "model with its card.")]


def progress_console():
    """Progress bars on stderr: rich's default, stdout, put the bar's last frame into a
    redirected output (`cervixqc clean ... > log`) and showed nothing live."""
    from rich.console import Console

    return Console(stderr=True)


@contextmanager
def file_progress(label: str, every_s: float = 60.0, then: str | None = None) -> Iterator[Callable[[int, int], None]]:
    """`report(done, total)` for a long run over files: a live bar on a terminal; elsewhere
    (cron, `> log`, `docker logs`, systemd) a plain line at the first report, then at most
    every `every_s` and at the end. rich draws nothing live off a terminal, so a 10^5-file
    `clean` said nothing for hours and then printed one 100% line. The first report is where
    the run starts (a resume: the files done before), the rate counts from there. `then` is
    said once every file is done, for work that follows them: `clean`'s duplicate search and
    exports ran 11 s after 805 photos (minutes at scale) with the bar at 100% and no word."""
    console = progress_console()
    told: list[bool] = []

    def tell(done: int, total: int, say: Callable[[str], None]) -> None:
        if then and done >= total and not told:
            told.append(True)
            say(f"{label}: {then}")

    if console.is_terminal:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

        with Progress(TextColumn(label), BarColumn(), TaskProgressColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeRemainingColumn(), console=console) as bar:
            task = bar.add_task(label, total=None)

            def update(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)
                tell(done, total, console.print)
            yield update
        return
    start: dict[str, float] = {}

    def report(done: int, total: int) -> None:
        report_line(done, total)
        tell(done, total, lambda line: print(line, file=sys.stderr, flush=True))

    def report_line(done: int, total: int) -> None:
        now = time.monotonic()
        if start and now - start["said"] < every_s and done < total:
            return
        if not start:  # the files done before this run (a resume) count in neither rate nor time
            start.update(t=now, done=done)
        start["said"] = now
        rate = (done - start["done"]) / (now - start["t"]) if done > start["done"] else None
        share = f" ({100 * done / total:.1f}%)" if total else ""
        speed = "" if rate is None else f", {rate:.1f} files/s"
        left = f", about {_duration((total - done) / rate)} left" if rate and done < total else ""
        print(f"{label}: {done:,}/{total:,} files{share}{speed}{left}", file=sys.stderr, flush=True)

    yield report


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{seconds:.0f} s" if seconds < 90 else f"{minutes} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def _csv(value: Optional[str]) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _manifest(path):
    """A checked manifest, or a clean exit naming its problems."""
    from pipelines.data.manifest import ManifestError, load_manifest

    try:
        return load_manifest(path)
    except ManifestError as e:
        _fail(str(e))


def trained_on(manifest: Path, **more: object) -> dict:
    """A card's `data`: the manifest and which photo was in which split (`split_fingerprint`):
    eval-pipeline tells a split the models were trained under from another, whose val and test
    rows may hold their training photos. Written by finalize.py alone before, so a site's own
    presence head was judged with the warning every other split gets (an audit). The
    manifest by its full path and sha256 too: the path as typed (`synth/split.csv`) and a
    fingerprint of None (no sha256 column: generated data, a hand-made manifest) named no
    file a reader could find or check again (an audit)."""
    from models.io import sha256_file
    from pipelines.data.manifest import ManifestError, load_manifest
    from pipelines.data.splits import split_fingerprint

    try:
        fingerprint = split_fingerprint(load_manifest(manifest, check_files=False))
    except ManifestError:  # named by the training's own read
        fingerprint = None
    return {"manifest": str(manifest.resolve()), "manifest_sha256": sha256_file(manifest), **more,
            "split_fingerprint": fingerprint}


def _split_manifest(path):
    """A manifest that must carry a split column (`cervixqc split` wrote it), or a clean exit."""
    df = _manifest(path)
    if "split" not in df.columns:
        _fail(f"{path} has no split column: run `cervixqc split` first")
    return df


def require_writable(option: str, path: Path, file: bool = False, keep: bool = True) -> None:
    """An output (`file`: a file to write, else a folder) checked before the work it ends, or a
    clean exit naming `option`: a path that was a folder, or under one that could not be made,
    was a traceback after the whole run (`eval-pipeline`, `bench`, `export`'s calibration).
    `keep=False`: folders made for the check are removed again, for commands that make their
    own when they write and may yet refuse (an empty -o was left behind)."""
    if file and path.is_dir():
        _fail(f"{option} {path} is a folder: name a file to write")
    try:
        writable_folder(option, path.parent if file else path, keep)
    except ValueError as e:
        _fail(str(e))


def number_in(option: str, value: float | None, low: float, high: float = float("inf"), above: bool = False) -> None:
    """A number option checked where Click's ranges let nan and inf through: `--lr inf`
    trained a detector of NaN weights, exit 0, and `--marks 2` failed in NumPy after the
    autoencoder's pretraining, naming no option (an audit). None: not given."""
    if value is None:
        return
    if value != value or value in (float("inf"), float("-inf")) or not (
            (value > low if above else value >= low) and value <= high):
        upper = "" if high == float("inf") else f" and <= {high:g}"
        _fail(f"{option} must be a number {'>' if above else '>='} {low:g}{upper}, not {value}")


def per_core_limit() -> int:
    """The most threads or processes an option may ask for: 4 per core. `--threads 99999` ran
    the process out of memory maps, exit 139, and `--workers 100000` started 1,156 loader
    processes holding 13 GB in 40 s, which outlived a SIGTERM (audits)."""
    return 4 * (os.cpu_count() or 1)


def processes_in(option: str, value: int | None, low: int) -> None:
    """A process-count option between `low` and `per_core_limit`; None: not given."""
    if value is not None and not low <= value <= per_core_limit():
        _fail(f"{option} must be >= {low} and <= {per_core_limit()} (4 per core here), not {value}")


def not_an_input(option: str, out: Path, *inputs: Path | None) -> None:
    """An output that is one of the command's own inputs, refused before any work: `-o`
    naming the manifest, label sheet, box file or duplicates table being read replaced it
    with the result, exit 0, and the input was lost (an audit)."""
    for given in inputs:  # samefile: the same file under another spelling, or a hard link to it
        if given is not None and given.exists() and out.exists() and os.path.samefile(out, given):
            _fail(f"{option} {out} is the input {given}: it would be replaced; write the result elsewhere")


def replaces_only_its_own(option: str, out: Path, starts: tuple[bytes, ...], what: str) -> None:
    """An existing file at `out` replaced only where it begins as this command's output does
    (`starts`, any case; an empty file too). `duplicates -o` and `report -o` naming one of the
    photos they read replaced it with a table or a page, exit 0 (an audit); a manifest or any
    other file of the site's would have gone the same way."""
    if not out.is_file():
        return
    try:
        with open(out, "rb") as f:
            head = f.read(64).lower()
    except OSError:
        return  # require_writable names what is wrong with it
    if head and not head.startswith(tuple(s.lower() for s in starts)):
        _fail(f"{option} {out} holds a file that is not {what} (one of the photos read? a manifest?): it would be "
              "replaced; name another file, or move that one away first")


def first_file(folder: Path, *patterns: str) -> str | None:
    """The name of the first file in `folder` matching one of `patterns` (in their order), None
    where none does or `folder` is no folder: an output folder holding a weights folder's or
    another command's files is refused with it."""
    if not folder.is_dir():
        return None
    return next((p.name for pattern in patterns for p in sorted(folder.glob(pattern))), None)


def box_file_output(option: str, out: Path, command: str, legacy_prefix: str | None = None) -> str:
    """A box file to be written by `cervixqc command`, checked before the work: an existing
    file is replaced only where the same command wrote it (its `info.written_by`; or, for files
    from before that record, a description beginning `legacy_prefix`). `-o` onto a set's checked
    boxes replaced them with a detector's, a CVAT import's or new proposals, exit 0 (an audit).
    Returns the `written_by` value the writer stamps into its file's info."""
    import json

    stamp = f"cervixqc {command}"
    if not out.exists():
        return stamp
    try:
        info = json.loads(out.read_text()).get("info") or {}
        by, description = info.get("written_by"), str(info.get("description", ""))
    except (OSError, ValueError, AttributeError):
        by, description = None, ""
    if by == stamp or (legacy_prefix is not None and by is None and description.startswith(legacy_prefix)):
        return stamp
    what = f"written by {by}" if by else (f"described as {description[:60]!r}" if description else "not a box file "
                                          "of this command")
    _fail(f"{option} {out} holds a file that `{stamp}` did not write ({what}; checked or ground-truth boxes?): "
          "name another file, or move that one away first")


def manifest_output(option: str, out: Path) -> None:
    """A manifest to be written, checked before the work as every writer of one checks it: a
    file it can write (`require_writable`) with a name a manifest has (`check_manifest_name`)."""
    from pipelines.data.manifest import check_manifest_name

    require_writable(option, out, file=True, keep=False)
    try:
        check_manifest_name(out)
    except ValueError as e:
        _fail(str(e))


def device_or_fail(device: str) -> str:
    """`auto`, `cpu`, `cuda` or `cuda:N` as every engine command takes it ("auto" was a torch
    traceback in some), or a clean exit."""
    from pipelines.engine.config import resolve_device

    try:
        return resolve_device(device)
    except ValueError as e:
        _fail(f"--device: {e}")


def writable_folder(option: str, folder: Path, keep: bool = True) -> None:
    """The folder, made if needed, takes a file: checked before any model loads (an unwritable
    quarantine failed `clean` after its first batch, with a traceback naming a photo; a state
    folder that was a file failed the service's start). ValueError naming `option` otherwise.
    `keep=False` removes the folders the check made."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        if folder.is_file():  # "cannot write there (File exists)" (an audit)
            raise ValueError(f"{option} {folder} is a file: name a folder") from None
        above = next((p for p in folder.parents if p.is_file()), None)
        if above is not None:
            raise ValueError(f"{option} {folder}: {above} is a file, so no folder can be made under it") from None
        raise ValueError(f"{option} {folder}: cannot write there ({e.strerror or type(e).__name__})") from None
    finally:
        for p in made if not keep else ():
            try:
                p.rmdir()
            except OSError:  # not made after all (the mkdir failed above it), or filled meanwhile
                pass
