"""Helpers shared by the command modules."""

from __future__ import annotations

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
