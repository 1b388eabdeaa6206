"""Helpers shared by the command modules."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def training_output(out: Path, card: str, resume: bool = False) -> None:
    """`-o` of a training command, checked before any data loads: training into a weights
    folder replaced its model there unsaid (the shipped detector, under a presence head of the
    old one's features; the colour scorer, and with it the folder's default policy). A run
    folder of the same model is resumed with --resume or refused by the loop."""
    if not (out / card).exists():
        return
    if any(out.rglob("checkpoint.pt")):
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


def _csv(value: Optional[str]) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _manifest(path):
    """A checked manifest, or a clean exit naming its problems."""
    from pipelines.data.manifest import ManifestError, load_manifest

    try:
        return load_manifest(path)
    except ManifestError as e:
        _fail(str(e))


def _split_manifest(path):
    """A manifest that must carry a split column (`cervixqc split` wrote it), or a clean exit."""
    df = _manifest(path)
    if "split" not in df.columns:
        _fail(f"{path} has no split column: run `cervixqc split` first")
    return df


def require_writable(option: str, path: Path, file: bool = False) -> None:
    """An output (`file`: a file to write, else a folder) checked before the work it ends, or a
    clean exit naming `option`: a path that was a folder, or under one that could not be made,
    was a traceback after the whole run (`eval-pipeline`, `bench`, `export`'s calibration)."""
    if file and path.is_dir():
        _fail(f"{option} {path}: a folder; name a file")
    try:
        writable_folder(option, path.parent if file else path)
    except ValueError as e:
        _fail(str(e))


def device_or_fail(device: str) -> str:
    """`auto`, `cpu`, `cuda` or `cuda:N` as every engine command takes it ("auto" was a torch
    traceback in some), or a clean exit."""
    from pipelines.engine.qc import resolve_device

    try:
        return resolve_device(device)
    except ValueError as e:
        _fail(f"--device: {e}")


def writable_folder(option: str, folder: Path) -> None:
    """The folder, made if needed, takes a file: checked before any model loads (an unwritable
    quarantine failed `clean` after its first batch, with a traceback naming a photo; a state
    folder that was a file failed the service's start). ValueError naming `option` otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"{option} {folder}: cannot write there ({e.strerror or type(e).__name__})") from None
