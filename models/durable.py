"""Bytes on the disk before a rename makes them the file: the weights' writer (`io`) and the
pipelines' (`pipelines.outputs`) share these, kept free of torch so that writing a CSV does
not import it (2.3 s)."""

from __future__ import annotations

import os
from pathlib import Path


def flush_file(path: Path) -> None:
    """The file's bytes to the disk before its rename: otherwise the rename can reach the disk
    first, and a power cut left exports, quarantine copies, new weights and cards at 0 bytes
    under their final names (audits; the weights' sha256 check refuses theirs, but the training
    run was lost)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush_folder(folder: Path) -> None:
    """The folder's entries to the disk; where the file system cannot (some network shares
    refuse a folder's fsync), the rename stands as it is."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
