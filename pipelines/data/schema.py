"""Names shared by every part of the data layer: image kinds, splits and manifest columns.

Kept in one place so that the manifest validator, the splitter, the generator and the
stats all agree on spelling; a typo in a kind would otherwise silently become a new class.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import PurePosixPath


class Kind(StrEnum):
    """What an image shows. `green` and `iodine` are the paper's "non-regular" images."""

    REGULAR = "regular"
    GREEN = "green"
    IODINE = "iodine"
    NO_CERVIX = "no_cervix"


NON_REGULAR_KINDS = frozenset({Kind.GREEN, Kind.IODINE})


class Split(StrEnum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"


REQUIRED_COLUMNS = ("path", "patient_id", "source", "device", "kind")
OPTIONAL_COLUMNS = ("split",)


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


def path_key(path: str) -> str:
    """A photo's path as every table names it: `./a/b.jpg` and `a//b.jpg` are `a/b.jpg`.
    Manifests keep what they were given; the duplicates table, the box files and their
    subsets were compared with it as written, and copies on two sides of a split went unseen,
    photos spelt `./` dropped out of every split's box file and crop set, unsaid."""
    return PurePosixPath(path).as_posix()
