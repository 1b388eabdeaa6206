"""Names shared by every part of the data layer: image kinds, splits and manifest columns.

Kept in one place so that the manifest validator, the splitter, the generator and the
stats all agree on spelling; a typo in a kind would otherwise silently become a new class.
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from pathlib import Path, PurePosixPath


class Kind(StrEnum):
    """What an image shows. `green` and `iodine` are the paper's "non-regular" images."""

    REGULAR = "regular"
    GREEN = "green"
    IODINE = "iodine"
    NO_CERVIX = "no_cervix"


NON_REGULAR_KINDS = frozenset({Kind.GREEN, Kind.IODINE})
# the names of photos the engine reads, by their ending (a file given as a source, the photos
# under a label sheet's folder)
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp")


class Split(StrEnum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"


REQUIRED_COLUMNS = ("path", "patient_id", "source", "device", "kind")
# known_findings: quality findings the photo is known to have ("blur", "blur;dark"), the
# ground truth of a set whose makers know it (the generator's own camera blur): a calibration
# must not count such a photo as one that a finding must leave alone
OPTIONAL_COLUMNS = ("split", "known_findings")


def is_non_regular(kind: str) -> bool:
    return kind in NON_REGULAR_KINDS


class DataProblems(ValueError):
    """Every problem found in one file, raised together so they can be fixed in one pass."""

    def __init__(self, source: str, problems: list, shown: int = 50) -> None:
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s)"] + [f"  {p}" for p in problems[:shown]]
        if len(problems) > shown:
            lines.append(f"  ... and {len(problems) - shown} more")
        super().__init__("\n".join(lines))


def validation_reasons(e, whole: str = "card", shown: int = 0) -> str:
    """Each field at fault in pydantic's ValidationError `e` as `where: what` (`whole` where
    pydantic names no field); the first `shown` of them when given. Its own text begins "1
    validation error for ...", ends with a link to its docs, and quotes the input's first bytes."""
    found = e.errors()
    parts = [f"{'.'.join(map(str, err['loc'])) or whole}: {err['msg']}" for err in found[:shown or None]]
    more = f" and {len(found) - shown} more" if shown and len(found) > shown else ""
    return "; ".join(parts) + more


def path_key(path: str) -> str:
    """A photo's path as every table names it: `./a/b.jpg` and `a//b.jpg` are `a/b.jpg`.
    Manifests keep what they were given; the duplicates table, the box files and their
    subsets were compared with it as written, and copies on two sides of a split went unseen,
    photos spelt `./` dropped out of every split's box file and crop set, unsaid."""
    return PurePosixPath(path).as_posix()


_ESCAPED_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")


def row_key(rel: str) -> str:
    """The row's `path` for a file name as the OS gave it. A name that is not UTF-8 (an archive
    copied from an old Windows PC: `Peña.jpg` in Latin-1) arrives with surrogate escapes,
    which no JSON, CSV or SQLite text can hold: it crashed the run at that file, and every
    resume again. Its bytes that are not UTF-8 are written as `\\xNN`; `on_disk` reverses it."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return os.fsencode(rel).decode("utf-8", "backslashreplace")


def has_backslash(key: str) -> bool:
    """A `\\` in a row's path other than `row_key`'s `\\xNN` escapes: a path written on Windows."""
    return "\\" in _ESCAPED_BYTE.sub("", key)


def on_disk(root: Path, key: str) -> Path:
    """The file a row's `path` names under `root`: where the key holds `\\xNN` escapes of
    `row_key` and the name with those bytes exists, that file (the README's promise: the
    file literally so spelt beside it gets no row; it took the row, and a literal file
    added later relabelled the photo's row and released its quarantine copy: an audit);
    else the name itself."""
    path = root / key
    if "\\x" not in key:
        return path
    raw = root / _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), key)
    return raw if raw != path and os.path.lexists(raw) else path
