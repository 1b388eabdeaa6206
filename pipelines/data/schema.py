"""Names shared by every part of the data layer: image kinds, splits and manifest columns.

Kept in one place so that the manifest validator, the splitter, the generator and the
stats all agree on spelling; a typo in a kind would otherwise silently become a new class.
"""

from __future__ import annotations

from enum import StrEnum


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
