"""The service's data roots are checked on the file opened, not on its name before: a link
swapped between the check and the read put a file from outside the roots into a job's results
and quarantine (an audit). Here the reads and copies the service makes, on links that point
out of a root, flipped while they run."""

from __future__ import annotations

import os
import threading

import pytest

from pipelines.clean.quarantine import quarantine_copy, quarantine_results
from pipelines.data.opened import NotAllowed, open_regular
from pipelines.engine.decode import DecodeError, read_file
from pipelines.engine.qc_result import Label, QCResult

INSIDE, OUTSIDE = b"a photo inside the root", b"TOP SECRET outside the root"


@pytest.fixture()
def layout(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "ok.jpg").write_bytes(INSIDE)
    (outside / "secret.jpg").write_bytes(OUTSIDE)
    real_root = root.resolve()
    return root, outside, lambda p: p == real_root or p.is_relative_to(real_root)


def test_a_link_out_of_the_root_is_refused_on_the_file_opened(layout, tmp_path):
    root, outside, allowed = layout
    (root / "out.jpg").symlink_to(outside / "secret.jpg")
    (root / "in.jpg").symlink_to(root / "ok.jpg")
    assert read_file(root / "in.jpg", allowed=allowed) == INSIDE  # a link that stays inside is read
    with pytest.raises(NotAllowed):
        read_file(root / "out.jpg", allowed=allowed)
    assert read_file(root / "out.jpg") == OUTSIDE  # no roots (the command line): read as before
    q = tmp_path / "q"
    flagged = [QCResult(path=p, label=Label.NON_REGULAR) for p in ("out.jpg", "in.jpg")]
    assert quarantine_results(root, flagged, q, link=False, allowed=allowed) == 1  # counted, not copied
    assert (q / "non_regular" / "in.jpg").read_bytes() == INSIDE
    assert not (q / "non_regular" / "out.jpg").exists()
    os.mkfifo(root / "pipe.jpg")  # opened without blocking, refused by what it is
    with pytest.raises(DecodeError, match="not a regular file"):
        read_file(root / "pipe.jpg", allowed=allowed)


def test_a_copy_keeps_the_originals_mode_and_times(layout, tmp_path):
    root, _, allowed = layout
    os.chmod(root / "ok.jpg", 0o640)
    os.utime(root / "ok.jpg", ns=(1_000_000_000, 2_000_000_000))
    quarantine_copy(root, "ok.jpg", "non_regular", tmp_path / "q", link=False, allowed=allowed)
    st = (tmp_path / "q" / "non_regular" / "ok.jpg").stat()
    assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o640, 2_000_000_000)


@pytest.mark.parametrize("service", [True, False], ids=["service", "command line copy"])
def test_a_copy_of_a_setuid_file_is_no_program(layout, tmp_path, service):
    """A setuid program planted under a photo's name came out of the quarantine as a setuid
    program of the service's user (an audit ran `id` from it as root): copies keep only the
    read and write bits, on the service's copy and on the command line's where it cannot link."""
    root, _, allowed = layout
    os.chmod(root / "ok.jpg", 0o6755)
    os.utime(root / "ok.jpg", ns=(1_000_000_000, 2_000_000_000))
    quarantine_copy(root, "ok.jpg", "non_regular", tmp_path / "q", link=False, allowed=allowed if service else None)
    st = (tmp_path / "q" / "non_regular" / "ok.jpg").stat()
    assert (oct(st.st_mode & 0o7777), st.st_mtime_ns) == (oct(0o644), 2_000_000_000)


def test_links_flipped_in_and_out_while_they_are_read_and_copied_never_bring_an_outside_file_in(layout, tmp_path):
    """A writer to the share flips each link between a photo inside and a file outside; the
    reads and copies run meanwhile. Checked on the name and read by it again, such a run copied
    the outside file several times in 40 (the audit's script against a live service)."""
    root, outside, allowed = layout
    names = [f"f{i}.jpg" for i in range(8)]
    for n in names:
        (root / n).symlink_to(root / "ok.jpg")
    stop = threading.Event()

    def flip() -> None:
        k = 0
        while not stop.is_set():
            for n in names:
                tmp = root / f".{n}.tmp"
                tmp.symlink_to(outside / "secret.jpg" if k % 2 else root / "ok.jpg")
                os.replace(tmp, root / n)
            k += 1

    flipper = threading.Thread(target=flip)
    flipper.start()
    read, copied = [], []
    try:
        for round_ in range(60):
            for n in names:
                try:
                    read.append(read_file(root / n, allowed=allowed))
                except (NotAllowed, FileNotFoundError):
                    pass
                q = tmp_path / f"q{round_}"
                try:
                    quarantine_copy(root, n, "non_regular", q, link=False, allowed=allowed)
                    copied.append((q / "non_regular" / n).read_bytes())
                except (NotAllowed, FileNotFoundError):
                    pass
    finally:
        stop.set()
        flipper.join()
    assert read and copied  # the inside photo got through, often
    assert OUTSIDE not in read and OUTSIDE not in copied


def test_the_file_opened_is_the_one_checked_even_where_its_name_changes_after(layout):
    root, outside, allowed = layout
    (root / "x.jpg").symlink_to(root / "ok.jpg")
    f, st = open_regular(root / "x.jpg", allowed)
    (root / "x.jpg").unlink()
    (root / "x.jpg").symlink_to(outside / "secret.jpg")  # swapped after the open: the open file stays
    with f:
        assert f.read() == INSIDE and st.st_size == len(INSIDE)
