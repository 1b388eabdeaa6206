"""Server-side paths a client may name: confined to CERVIXQC_DATA_ROOTS.

A client names a folder or manifest as an absolute path or relative to a data root. `..`
is refused before anything is resolved; then symlinks are resolved and the real path must
lie inside a root, so a link inside a root that points elsewhere is refused as well.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from service.errors import ApiError

CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # as the schema's patterns say (service/schemas.py)
# the longest name of one folder on Linux file systems, in bytes: a quarantine named longer was
# taken (202) and its job failed on the first copy with "File name too long" (an audit)
NAME_MAX = 255


def inside(path: Path, roots: list[Path]) -> bool:
    """Whether the real path lies in a root. One that cannot be resolved (a link loop, a name
    too long for the OS) is not known to be inside, so it is not: it raised, and failed a
    whole job on every retry."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: Python 3.11's symlink loop
        return False
    return any(real == root or real.is_relative_to(root) for root in roots)


def within(roots: list[Path]) -> Callable[[Path], bool]:
    """`inside` these roots, as the check the service's reads and copies make on the file they
    opened (`pipelines.data.opened`)."""
    return lambda real: inside(real, roots)


def _check_text(requested: str, what: str) -> None:
    """A lone surrogate (JSON's "\\udcff") passed the other checks and failed in SQLite's
    encoder: a 500 (an audit). Paths the service takes are UTF-8 text."""
    try:
        requested.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "invalid_path", f"{what}: not valid UTF-8 text (a lone surrogate)") from None


def confine(requested: str, roots: list[Path], what: str = "source") -> Path:
    _check_text(requested, what)
    if not roots:
        raise ApiError(403, "no_data_roots", "this server has no CERVIXQC_DATA_ROOTS: jobs are switched off")
    if not requested:
        raise ApiError(400, "invalid_path", f"{what}: empty path")
    if CONTROL.search(requested):
        raise ApiError(400, "invalid_path", f"{what}: control characters (a line break, a tab) are not allowed "
                                            "in paths")
    if ".." in PurePosixPath(requested).parts or ".." in Path(requested).parts:
        raise ApiError(400, "invalid_path", f"{what}: '..' is not allowed in paths")
    candidates = [Path(requested)] if Path(requested).is_absolute() else [root / requested for root in roots]
    for candidate in candidates:
        try:  # a name too long for the OS or a link loop: a 500 with the path in the log twice
            if not (candidate.exists() or candidate.is_symlink()):
                continue
            real = candidate.resolve()
        except (OSError, RuntimeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else "a link loop"
            raise ApiError(400, "invalid_path", f"{what}: cannot be resolved ({why})") from None
        if not inside(candidate, roots):
            raise ApiError(403, "path_forbidden", f"{what} is outside the allowed data roots")
        return real
    if Path(requested).is_absolute() and not inside(Path(requested), roots):
        raise ApiError(403, "path_forbidden", f"{what} is outside the allowed data roots")
    raise ApiError(404, "path_not_found", f"{what} does not exist under the data roots")


def relative_name(requested: str, what: str = "quarantine") -> PurePosixPath:
    """A name for a folder the service creates under its own root: relative, no '..', no
    control characters, no folder named only with spaces or longer than NAME_MAX bytes."""
    _check_text(requested, what)
    p = PurePosixPath(requested)
    if (not requested or not p.parts or p.is_absolute() or ".." in p.parts
            or "\\" in requested):  # not p.parts: '.' named the root itself
        raise ApiError(400, "invalid_path", f"{what}: a relative folder name without '..' is required")
    if CONTROL.search(requested):  # a line break made a folder "q\nx" (an audit)
        raise ApiError(400, "invalid_path", f"{what}: control characters (a line break, a tab) are not allowed")
    if any(not part.strip() for part in p.parts):
        raise ApiError(400, "invalid_path", f"{what}: a folder name of only spaces is not allowed")
    if any(len(part.encode("utf-8", "surrogateescape")) > NAME_MAX for part in p.parts):
        raise ApiError(400, "invalid_path", f"{what}: a folder name longer than {NAME_MAX} bytes is not allowed")
    return p
