"""Helpers shared by the command modules."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import typer


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


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
