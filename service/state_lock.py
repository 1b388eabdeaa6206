"""One service per state folder.

Two processes on one STATE_DIR (two replicas on one volume, a restart overlapping the old
process, a second `serve` whose port turned out taken) both took up the same job: every photo
went through the engine twice, each process's priority for uploads governed only its own jobs,
and a second `serve` started jobs before it failed to bind. An exclusive lock on a file in the
folder, held by the process for its life, makes the second refuse to start; the kernel drops it
when the process ends, however it ends, so a killed service leaves nothing to clean up.

The folder itself is locked too: the file alone let a second service start once someone had
deleted `service.lock` as a stale lock file (its lock went with the deleted inode). Where the
folder's file system cannot lock a folder (NFS emulates flock with locks a read-only folder
cannot hold), the file's lock is the one kept.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

LOCK_NAME = "service.lock"


class StateDirInUse(RuntimeError):
    pass


class StateLock:
    """The folder's and its lock file's locks, held until `close` (or the process ends)."""

    def __init__(self, folder_fd: int | None, file: IO[str]) -> None:
        self._folder_fd, self._file = folder_fd, file

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        self._file.close()
        if self._folder_fd is not None:
            os.close(self._folder_fd)
            self._folder_fd = None


# locks `take` holds for this process's service, by folder, until its lifespan's `hold`
_TAKEN: dict[str, StateLock] = {}


def _folder_lock(state_dir: Path) -> int | None:
    """The folder's own lock (its descriptor), None where its file system cannot lock one;
    BlockingIOError where another process holds it."""
    try:  # a folder this user may write and enter but not list (mode 0o730) cannot be opened
        fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:
        os.close(fd)
        return None
    return fd


def hold(state_dir: Path) -> StateLock:
    """The lock, held until it is closed (or the process ends); the one `take` holds for this
    process, handed over."""
    taken = _TAKEN.pop(str(state_dir.resolve()), None)
    if taken is not None and not taken.closed:
        return taken
    state_dir.mkdir(parents=True, exist_ok=True)
    f = open(state_dir / LOCK_NAME, "a+")  # noqa: SIM115 - held open for the process's life
    folder_fd = None
    try:
        folder_fd = _folder_lock(state_dir)
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "? (its service.lock was deleted)"
        f.close()
        if folder_fd is not None:
            os.close(folder_fd)
        raise StateDirInUse(f"CERVIXQC_STATE_DIR {state_dir}: another cervixqc service (pid {pid}) uses this folder; "
                            "two would run the same jobs twice: stop it, or give this one a state folder of its "
                            "own") from None
    except BaseException:
        f.close()
        if folder_fd is not None:
            os.close(folder_fd)
        raise
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return StateLock(folder_fd, f)


def take(state_dir: Path) -> str | None:
    """Why the folder cannot be taken now, or None: the check before the models load, for a
    one-line error instead of a failed startup's traceback. Taken, the lock stays held for the
    service this process starts next (`hold` hands it over; `let_go` if it does not start):
    let go at once, two services started together both passed the check, and the later one
    failed in its startup with uvicorn's traceback (an audit)."""
    try:
        _TAKEN[str(state_dir.resolve())] = hold(state_dir)
    except StateDirInUse as e:
        return str(e)
    except OSError as e:  # a full disk: "error: No space left on device", naming no folder (an audit)
        return f"CERVIXQC_STATE_DIR {state_dir}: cannot write its lock file ({e.strerror or e})"
    return None


def let_go(state_dir: Path) -> None:
    """The lock `take` holds, released: the start it was held for did not happen."""
    taken = _TAKEN.pop(str(state_dir.resolve()), None)
    if taken is not None:
        taken.close()
