"""The one result record (DESIGN.md): CLI JSON, results CSV/Parquet, HTTP and Ray all use it."""

from __future__ import annotations

import json
from enum import StrEnum

from pydantic import BaseModel, Field


class Label(StrEnum):
    REGULAR = "regular"
    NON_REGULAR = "non_regular"
    NO_CERVIX = "no_cervix"
    UNREADABLE = "unreadable"


class QCResult(BaseModel):
    path: str  # file path (relative to the cleaned folder) or the uploaded file name
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    label: Label
    kind: str | None = None  # green | iodine for non_regular
    cervix_box: list[float] | None = None  # x1, y1, x2, y2 in original pixels
    cervix_score: float | None = None  # the detector's top box score
    presence_score: float | None = None  # P(cervix in the photo) from the presence model, where there is one
    deep_sad_score: float | None = None
    resnest_prob: float | None = None
    error: str | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)

    def csv_row(self) -> dict:
        """Flat row: the box as a JSON list, timings left out."""
        row = self.model_dump(mode="json", exclude={"timings_ms"})
        row["cervix_box"] = json.dumps(self.cervix_box) if self.cervix_box is not None else ""
        return row
