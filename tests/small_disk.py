"""Disks that fill or fail for real, for the tests of what the project does then: a small tmpfs
(`small_tmpfs`) and an ext4 that drops to read-only on an error (`_loop_ext4`, in
tests/test_outputs.py). Both need root to mount; a host that cannot skips those tests."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """`folder` as a tmpfs of `size` (`64k`, `20m`) for the block; skips the test where it
    cannot be mounted. Unmounted lazily after: a file the code under test still holds open
    must not fail the test's own clean-up."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                           capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path, leave: int = 0) -> Path:
    """`folder`'s disk filled but for `leave` bytes, by a file `filler` (unlink it to free them)."""
    disk = os.statvfs(folder)
    with open(folder / "filler", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, disk.f_bavail * disk.f_frsize - leave)
    return folder / "filler"
