"""The quarantine: hard links (copies across file systems) of flagged originals, mirroring
their relative paths under one folder per label and, when asked, one per quality finding.
Originals are only ever read."""

from __future__ import annotations

import errno
import filecmp
import logging
import os
import shutil
import tempfile
from collections.abc import Collection, Iterable
from pathlib import Path

from models.io import sha256_file
from pipelines.clean.state import Stale, file_stamp
from pipelines.data.opened import Allowed, copy_opened, copy_times_and_mode
from pipelines.data.schema import on_disk
from pipelines.engine.qc_result import Label, QCResult
from pipelines.outputs import write_atomically

log = logging.getLogger(__name__)


QUARANTINED = (Label.NON_REGULAR, Label.NO_CERVIX, Label.UNREADABLE)


def quarantine_folders(result: QCResult, findings: Collection[str] = ()) -> list[str]:
    """Where a result's file is copied: its label's folder when the label is quarantined, and
    one folder per flagged finding named in `findings` (a blurred regular photo goes to
    blur/ only). Findings folders never change the label."""
    folders = [result.label.value] if result.label in QUARANTINED else []
    return folders + [name for name in result.flags() if name in findings]


class QuarantineUnwritable(OSError):
    """The quarantine itself takes no copy (full, read-only, no permission). Raised before the
    batch's rows are stored, so that the run (or the job, on retry) does the batch again once
    the folder is fixed: stored rows without their copies were flagged photos left in the
    collection, with the run reported done."""


_FOLDER_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
# the folder's fault when they name a path inside it: no permission, a share dropped (I/O
# error, stale handle, not connected); on the original they are the file's
_INSIDE_ERRORS = {errno.EACCES, errno.EPERM, errno.EIO, errno.ESTALE, errno.ENOTCONN}


def _quarantine_fault(e: OSError, qdir: Path) -> bool:
    """The folder's fault, not the file's: no space or a read-only file system, one of
    `_INSIDE_ERRORS` on a path inside the quarantine, or a quarantine that is no longer a
    folder (replaced by a file: every copy failed, counted as the files' faults, and the job
    ended `done` with its flagged photos left in place)."""
    if e.errno in _FOLDER_ERRORS:
        return True
    named = [Path(f) for f in (e.filename, e.filename2) if isinstance(f, (str, os.PathLike))]
    if e.errno in _INSIDE_ERRORS and any(p.is_relative_to(qdir) for p in named):
        # a copy's error (sendfile) names both files: an original's bad sector read as the
        # quarantine's fault, and its batch failed on every resume (an audit). With the original
        # named too, the folder is asked: does it take a file?
        return all(p.is_relative_to(qdir) for p in named) or not _takes_a_file(qdir)
    # the quarantine, or one of its label or finding folders, replaced by a file
    folders = [qdir, qdir.parent] + [qdir / p.relative_to(qdir).parts[0] for p in named
                                     if p.is_relative_to(qdir) and p != qdir]
    return e.errno in (errno.ENOTDIR, errno.EEXIST) and any(part.exists() and not part.is_dir() for part in folders)


def _takes_a_file(qdir: Path) -> bool:
    try:
        with tempfile.NamedTemporaryFile(dir=qdir, prefix=".cervixqc-probe-") as probe:
            probe.write(b"x")
            probe.flush()
        return True
    except OSError:
        return False


def to_copy(results: Iterable[QCResult], findings: Collection[str] = ()) -> list[QCResult]:
    """The results that get a quarantine copy: the rows a batch lists as pending (its regular,
    unflagged majority has no copy to lose, and was written too)."""
    return [r for r in results if quarantine_folders(r, findings)]


def quarantine_results(src_root: Path, results: Iterable[QCResult], qdir: Path, findings: Collection[str] = (),
                       link: bool = True, allowed: Allowed | None = None) -> int:
    """Each result's file into every folder `quarantine_folders` names (files gone since are
    skipped). A file the OS cannot stat or copy (a name too long for it, a link loop), or one
    `allowed` refuses (`quarantine_copy`), is skipped and counted (returned): it failed its
    whole batch, on every retry of the job. A quarantine that cannot be written raises
    QuarantineUnwritable."""
    failed = 0
    for r in results:
        folders = quarantine_folders(r, findings)
        try:
            if folders and on_disk(src_root, r.path).is_file():
                for folder in folders:
                    quarantine_copy(src_root, r.path, folder, qdir, link, allowed, r.sha256)
        except OSError as e:
            if _quarantine_fault(e, qdir):
                raise QuarantineUnwritable(e.errno, f"the quarantine cannot be written ({e.strerror}); this batch "
                                                    "was not stored: free space or fix the folder's permissions, "
                                                    "then resume (the same command again, or retry the job)") from None
            failed += 1
    if failed:  # counted, not named: logs carry no file names
        log.warning("%d flagged files could not be copied into the quarantine", failed)
    return failed


def quarantine_path(qdir: Path, folder: str, rel: str) -> Path:
    """Where the copy of `rel` lives in `folder` (a label or a finding) of the quarantine. A
    manifest may name absolute paths or climb with '..': mirrored inside qdir, never outside it
    (qdir / "/abs" would be "/abs", the original itself)."""
    parts = [("__" if part == ".." else part) for part in Path(rel).parts if part not in ("/", "")]
    return qdir / str(folder) / Path(*parts)


def check_quarantine_names(inputs: Iterable[str]) -> None:
    """ValueError naming two inputs whose copies `quarantine_path` would put at one name: a
    manifest's `/abs/p.jpg` and `abs/p.jpg`, or `../x/a.jpg` and `__/x/a.jpg`. The second
    flagged photo was never copied, counted in a warning only, exit 0 (an audit). Only paths
    that are absolute or name `..` are mapped to another name, so only they are compared (a
    listing of 10^6 plain paths costs one pass of string tests); the mapping itself is kept,
    since existing quarantines hold their copies under it."""
    inputs = list(inputs)
    mapped = [p for p in inputs if p.startswith("/") or ".." in p]
    if not mapped:
        return
    kept = set(inputs) - set(mapped)
    seen = {p: p for p in kept}
    for p in mapped:
        name = quarantine_path(Path(), "", p).as_posix()
        if name in seen and seen[name] != p:
            raise ValueError(f"{seen[name]!r} and {p!r} would have one name in the quarantine ({name}); rename one, "
                             "or clean without --quarantine")
        seen[name] = p


def _same_file(a: Path, b: Path) -> bool:
    """One file, or two with the same bytes."""
    try:
        return same_inode(a, b) or (a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False))
    except OSError:
        return False


class ChangedSinceRead(OSError):
    """The file's bytes are no longer those the engine judged: its copy is not made."""


def quarantine_copy(src_root: Path, rel: str, folder: str, qdir: Path, link: bool = True,
                    allowed: Allowed | None = None, sha256: str | None = None) -> None:
    """Put one flagged original at qdir/folder/rel (folder: a label or a finding); the original
    is only read. `link` uses a hard link where the file system allows (no extra space); the
    service passes False, since a quarantine others open and edit must not share an inode with
    the original. `allowed` (the service's data roots) is asked about the file opened for the
    copy, which is then copied from that open file (NotAllowed otherwise): the path checked
    before and copied by name again let a link swapped in between put a file from outside the
    roots into the quarantine (an audit). It copies, never links.

    `sha256`: the bytes the engine judged. The copy is made after its batch, from the file as
    it is then: a photo cut short, or replaced, once it had been read went into the quarantine
    as the photo labelled (a half JPEG under unreadable, a regular photo under no_cervix), and
    no later run took it out (an audit). A copy of other bytes is ChangedSinceRead (counted
    as not copied; the next run labels the changed file again, as its stamp differs)."""
    target = quarantine_path(qdir, folder, rel)
    source = on_disk(src_root, rel)
    if target.exists():
        # taken as this file's copy (a resumed batch) only when it is: on a quarantine that
        # ignores letter case or Unicode form (exFAT, SMB, macOS), `A.JPG`'s copy stood for
        # `a.jpg`, and the second flagged photo was never copied, unsaid; now it is counted
        if not _same_file(source, target):
            raise FileExistsError(errno.EEXIST, "the quarantine holds another file under this name", str(target))
        return
    target.parent.mkdir(parents=True, exist_ok=True)

    def link_or_copy(tmp: Path) -> None:
        if allowed is not None:
            copy_opened(source, tmp, allowed)
            return
        if link:
            try:
                # link(2) does not follow a symlink (nor does os.link on Linux, follow_symlinks or
                # not): a linked photo's quarantine entry was a copy of the link, dangling
                # where the link was relative, and the original itself where it was absolute
                os.link(os.path.realpath(source), tmp)
                return
            except OSError:  # another file system, or links not allowed: copy instead
                pass
        st = os.stat(source)  # copy2, but for the mode it keeps
        shutil.copyfile(source, tmp)
        copy_times_and_mode(st, tmp)

    def checked(tmp: Path) -> None:
        link_or_copy(tmp)
        if sha256 is not None and sha256_file(tmp) != sha256:
            raise ChangedSinceRead("the file changed after the engine read it")  # no errno: the file's, not a fault

    write_atomically(target, checked)


# In a quarantine: the source folder whose copies it holds. Two sources' photos at one relative
# path (two clinics' field/IMG_0001.jpg) met in a shared quarantine: the second's copy was
# skipped with a count in a warning, its row stored, the run reported done, and the photo stayed
# among those a site keeps (an audit). The service refuses such a job (409 quarantine_in_use).
# A hidden name: listing the quarantine as a source skips it. A quarantine filled before the
# marker existed is claimed by the next run that uses it.
QUARANTINE_SOURCE = ".cervixqc-source"


def source_root(src: Path) -> Path:
    """The folder a source's relative paths start from (a manifest's own folder)."""
    return (src.parent if src.is_file() else src).resolve()


def drop_stale_copies(src_root: Path, quarantine: Path, stale: Iterable[Stale]) -> None:
    """The quarantine copies (under the old label and flags) of photos that changed since their
    rows, so that a copy of the old photo never stands for the new one. Only a copy that is
    that row's: the same file as the photo now (a hard link edited in place), one with the
    size and time it was read under (a link or `copy2` of the old photo), or one holding the
    bytes the row judged (a photo cut short while it was read: its stamp is of the whole
    file, its copy of the cut one, which stayed when the file came back whole: an audit). A
    name another row's copy holds (two sources sharing a quarantine, `A.JPG` and `a.jpg` on
    exFAT) is left. Called as the new rows are stored: a run that fails before keeps the old copies."""
    failed = 0
    for s in stale:
        original = on_disk(src_root, s.record.path)
        for folder in dict.fromkeys([s.record.label.value, *s.record.flags()]):
            target = quarantine_path(quarantine, folder, s.record.path)
            try:
                if target.is_file() and (same_inode(target, original) or file_stamp(target) == s.stamp
                                         or s.record.sha256 is not None and sha256_file(target) == s.record.sha256):
                    target.unlink()
            except OSError:
                failed += 1
    if failed:
        log.warning("%d quarantine copies of changed photos could not be removed", failed)


def drop_judged_copies(pending: Iterable[tuple[QCResult, Path]]) -> int:
    """The copies (at each record's label and flags, in its quarantine) that hold the bytes the
    record judged, removed; how many. For a batch stopped after its copies and before its rows
    were stored (`clean`'s state and the service's job store list such rows until they are):
    its files are labelled again, and a file changed meanwhile left the old copy under the old
    label, no row owning it (a regular photo in no_cervix/), or, flagged again, was never copied
    (its name held by the old bytes: a warning at every run; an audit). A copy of other bytes
    (another row's, under a name a case-blind disk shares) is left."""
    removed = 0
    for record, qdir in pending:
        if record.sha256 is None:
            continue
        for folder in dict.fromkeys([record.label.value, *record.flags()]):
            target = quarantine_path(qdir, folder, record.path)
            try:
                if target.is_file() and sha256_file(target) == record.sha256:
                    target.unlink()
                    removed += 1
            except OSError:
                pass  # left: this run's copy of the same photo takes it as its own
    return removed


def same_inode(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
