"""One service per state folder: the folder's lock and its file's, in one process (flock
locks belong to each open file, so two opens in one process exclude each other as two
processes do; `tests/test_service.py` starts the second service for real)."""

import os

import pytest

from service import state_lock
from service.state_lock import StateDirInUse, hold


def test_a_deleted_lock_file_lets_no_second_holder_in(tmp_path):
    first = hold(tmp_path)
    try:
        (tmp_path / state_lock.LOCK_NAME).unlink()  # "a stale lock file"
        with pytest.raises(StateDirInUse, match="its service.lock was deleted"):
            hold(tmp_path)
    finally:
        first.close()
    hold(tmp_path).close()  # let go: the next one takes it


def test_a_folder_that_cannot_be_locked_keeps_the_files_lock(tmp_path, monkeypatch):
    """A folder this user may write and enter but not list, or an NFS mount, has no folder
    lock: the service starts all the same, and the file's lock still keeps a second one out."""
    real_open = os.open

    def no_folders(path, flags, *args):
        if flags & os.O_DIRECTORY:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(state_lock.os, "open", no_folders)
    first = hold(tmp_path)
    try:
        with pytest.raises(StateDirInUse, match=f"pid {os.getpid()}"):
            hold(tmp_path)
    finally:
        first.close()
    assert first.closed
