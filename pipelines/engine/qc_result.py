"""The one result record (the design brief's): CLI JSON, results CSV/Parquet, HTTP and Ray all use it."""

from __future__ import annotations

import json
import re
from enum import StrEnum
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, Field

FINDINGS = ("blur", "dark", "overexposed", "glare")
# how the stage-2 scores become a label (`QCPipeline.label_for`); here, without torch, so the
# CLI can check a name before it loads anything. "two_of_three": two of Deep SAD, ResNeSt and
# the crop-colour scorer, for weights folders that carry one (colour.json).
Policy = Literal["deep_sad", "resnest", "either", "both", "two_of_three"]
POLICIES: tuple[Policy, ...] = get_args(Policy)
COLOUR_POLICIES: tuple[Policy, ...] = ("two_of_three",)
COLOUR_CARD = "colour.json"  # the crop-colour scorer's card in a weights folder


# Cells a spreadsheet would run as a formula (`=HYPERLINK(...)`, `+1+1`, `@SUM(...)`): a file
# name is data from anywhere, and results.csv is opened in spreadsheets by data teams
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
CSV_TEXT_FIELDS = ("path", "error", "duplicate_of")  # the free-text columns of a result row
# ... and a formula after a `;` or a tab inside one: a spreadsheet set to European regional
# settings splits a comma CSV at each `;`, quotes or not, so `x;=1+1;.jpg` handed it `=1+1` as a
# cell of its own (an audit); it reads `x;'=1+1;.jpg`
_SPLIT_FORMULA = re.compile(r"([;\t])(?=[=+\-@])")


def spreadsheet_safe(text: object) -> object:
    """A text cell for a CSV that people open in spreadsheets: one that would start a formula
    gets a leading `'` (OWASP's advice), shown by the spreadsheet and never run. A carriage
    return inside it is written `\\x0d` (as `row_key` writes a name's bytes that are not
    UTF-8): the CSV writers quote a cell at a line feed but not at a lone carriage return, at
    which spreadsheets and CSV readers split the row, and the piece after it could start a
    formula of its own (`x\\r@SUM(1+1).jpg`: an audit). Parquet and JSON keep the value as it
    is, for programs."""
    if not isinstance(text, str):
        return text
    text = _SPLIT_FORMULA.sub(r"\1'", text.replace("\r", "\\x0d"))
    return "'" + text if text.startswith(_FORMULA_START) else text


# The reasons of a row a later read may not repeat: the OS could not read the file (a share
# briefly away, a manifest's file not there yet, no permission yet). Such rows are read again by
# the next run or retry; a file read whole that is no image stays done. So does a file read
# empty or cut short: it may have been caught mid-copy, but a collection's broken files would
# then be read again at every rerun, and a rerun of a finished collection would no longer
# read 0 files; telling the two apart needs each row's file size and time, not kept yet.
READ_AGAIN = ("cannot read file",)


def read_again_sql(record: str = "record") -> str:
    """SQL, true for a row of `READ_AGAIN` (the tables keep the result's JSON in `record` and
    its label in `label`)."""
    reasons = " OR ".join(f"coalesce(json_extract({record}, '$.error'), '') LIKE '{r}%'" for r in READ_AGAIN)
    return f"(label = 'unreadable' AND ({reasons}))"


_ESCAPED_SPLIT = re.compile(r"([;\t])'(?=[=+\-@])")


def spreadsheet_plain(text: object) -> object:
    """`spreadsheet_safe` undone, for our own readers of the CSVs it wrote (`split --duplicates`
    reads duplicates.csv and a clean folder's results.csv): the escaped `'+1.jpg` matched no
    manifest row. Ambiguous only for a name that itself begins `'=` or holds `;'=` or `\\x0d`,
    which read back one `'` shorter or with a carriage return."""
    if not isinstance(text, str):
        return text
    if text.startswith("'") and text[1:].startswith(_FORMULA_START):
        text = text[1:]
    return _ESCAPED_SPLIT.sub(r"\1", text).replace("\\x0d", "\r")


def spreadsheet_row(row: dict) -> dict:
    """A CSV row with its free-text cells (`CSV_TEXT_FIELDS`) made `spreadsheet_safe`."""
    return {k: spreadsheet_safe(v) if k in CSV_TEXT_FIELDS else v for k, v in row.items()}


def policies_for(weights_dir: str | Path) -> tuple[Policy, ...]:
    """The policies a weights folder can run: the vote of three needs the crop-colour scorer.
    The engine and the CLI's early check (before any Ray actor loads the weights) both ask here."""
    has_colour = (Path(weights_dir) / COLOUR_CARD).is_file()
    return tuple(p for p in POLICIES if has_colour or p not in COLOUR_POLICIES)


def check_findings(names: list[str]) -> list[str]:
    """`names` when every one is a finding, else ValueError naming the unknown ones."""
    unknown = [n for n in names if n not in FINDINGS]
    if unknown:
        raise ValueError(f"unknown finding {', '.join(unknown)} (one of {', '.join(FINDINGS)})")
    return names


class Label(StrEnum):
    REGULAR = "regular"
    NON_REGULAR = "non_regular"
    NO_CERVIX = "no_cervix"
    UNREADABLE = "unreadable"


class Finding(BaseModel):
    """One image-quality finding next to the label (it never changes the label): the score,
    the threshold from the weights folder's findings card, and whether it was crossed."""

    score: float
    threshold: float
    flagged: bool


class QCResult(BaseModel):
    path: str  # file path (relative to the cleaned folder) or the uploaded file name
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    label: Label
    kind: str | None = None  # green | iodine for non_regular
    # x1, y1, x2, y2 in the photo's pixels as displayed (after its EXIF orientation), as width/height
    cervix_box: list[float] | None = None
    cervix_score: float | None = None  # the detector's top box score
    # the presence model's score, where there is one: a sum of standardised logits, not a
    # probability (larger: a cervix; its card's threshold decides, GET /v1/models)
    presence_score: float | None = None
    deep_sad_score: float | None = None
    resnest_prob: float | None = None
    colour_score: float | None = None  # P(non-regular) from the crop's colour, where the weights carry that model
    # blur / dark / overexposed / glare, measured on the cervix crop (the whole photo when
    # there is no cervix); empty when the weights folder has no findings card
    findings: dict[str, Finding] = Field(default_factory=dict)
    phash: str | None = None  # 64-bit perceptual hash of the whole photo, 16 hex digits
    crop_hash: str | None = None  # the same of the cervix crop
    embedding: str | None = None  # the crop's 64-d unit embedding, float16, base64 (pipelines/engine/hashes.py)
    # set over a whole collection (clean, jobs), never per image: every member of a group of
    # copies carries the group's id and its first path in path order
    duplicate_group: int | None = None
    duplicate_of: str | None = None
    duplicate_kind: Literal["exact", "near"] | None = None
    error: str | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)

    def flags(self) -> list[str]:
        return [name for name, f in self.findings.items() if f.flagged]

    @classmethod
    def csv_fields(cls) -> list[str]:
        """Columns of results.csv: the record flattened (findings as `flags` plus one score
        column per finding), without timings and the embedding (the state database and the
        JSONL export keep it)."""
        fields = [f for f in cls.model_fields if f not in ("timings_ms", "embedding", "findings")]
        at = fields.index("phash")
        return fields[:at] + ["flags"] + [f"{name}_score" for name in FINDINGS] + fields[at:]

    def csv_row(self) -> dict:
        """Flat row: the box as a JSON list, flags joined by ';'."""
        row = self.model_dump(mode="json", exclude={"timings_ms", "embedding", "findings"})
        row["cervix_box"] = json.dumps(self.cervix_box) if self.cervix_box is not None else ""
        row["flags"] = ";".join(self.flags())
        for name in FINDINGS:
            row[f"{name}_score"] = self.findings[name].score if name in self.findings else None
        return {k: row[k] for k in self.csv_fields()}
