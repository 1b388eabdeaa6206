"""Reading a file that may only be read where it really lies: the check is made on the file
opened, not on its name before. The service checked a photo's path against its data roots and
then opened the path again, and a link swapped in between put a file from outside the roots
into a quarantine, and its hashes into a job's results (an audit). Standard library only: the
quarantine's checks run before any command imports torch."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

Allowed = Callable[[Path], bool]


class NotAllowed(PermissionError):
    """The file opened is not one the caller may read (the service: outside its data roots)."""


class NotRegular(ValueError):
    """A folder, FIFO, device or socket where a file was expected; the text says which."""


def open_regular(path: str | Path, allowed: Allowed | None = None) -> tuple[BinaryIO, os.stat_result]:
    """A regular file opened for reading, and its stat, both of the file opened; `allowed` is
    asked about the real path of that file. Opened without blocking: a FIFO's open waits for a
    writer, for ever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise NotRegular("a folder, not a file (`cervixqc clean` takes folders)")
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular("not a regular file (a FIFO, device or socket)")
        if allowed is not None and not allowed(_opened_path(fd, path)):
            raise NotAllowed(errno.EACCES, "not allowed here (outside the data roots)", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def _opened_path(fd: int, path: str | Path) -> Path:
    """The real path of an open file (Linux: /proc/self/fd); the name resolved where /proc is
    not mounted, which leaves the race open there."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)"))
    except OSError:
        return Path(os.path.realpath(path))


# What of a photo's mode its copy keeps: read and write. Its whole mode was copied (copy2's
# way), so a setuid program planted under a photo's name in a data root came out of the
# quarantine as a setuid program of the service's user (an audit ran `id` from it as root).
COPIED_MODE_BITS = 0o666


def copy_times_and_mode(st: os.stat_result, target: Path) -> None:
    """A copy's times and the read/write bits of the original's mode (`st`), nothing more."""
    os.chmod(target, stat.S_IMODE(st.st_mode) & COPIED_MODE_BITS)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def copy_opened(source: Path, target: Path, allowed: Allowed) -> None:
    """`shutil.copy2` of the very file `allowed` was asked about: its bytes, times and mode
    (`copy_times_and_mode`). Anything but a regular file is an OSError here, as copying it
    would be."""
    try:
        f, st = open_regular(source, allowed)
    except NotRegular as e:
        raise OSError(errno.EINVAL, str(e), str(source)) from None
    with f, open(target, "wb") as out:
        shutil.copyfileobj(f, out, 1 << 20)
    copy_times_and_mode(st, target)
