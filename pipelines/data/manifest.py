"""Manifests: the table that says which image belongs to which patient, source and kind.

Loading checks every row and reports every problem at once (a data team fixing a 10^5-row
export wants the whole list, not one error per run). Rows are numbered from 1 for the first
data row; for CSV the file line is that number + 1 (the header is line 1).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipelines.data.schema import (
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    DataProblems,
    Kind,
    Split,
    on_disk,
)
from pipelines.outputs import write_atomically

_KINDS = {k.value for k in Kind}
_SPLITS = {s.value for s in Split}


@dataclass(frozen=True)
class RowProblem:
    """Rows are counted from 1 at the first data row and shown as a spreadsheet numbers them
    (the header is row 1): `clean` named a blank path by its spreadsheet row and `validate` the
    same row one lower."""

    row: int  # 1-based data row; 0 for a problem with the file as a whole
    column: str
    reason: str
    first_row: int = 0  # a duplicate's first data row

    def __str__(self) -> str:
        where = "file" if self.row == 0 else f"row {self.row + 1}"
        reason = f"{self.reason} (first at row {self.first_row + 1})" if self.first_row else self.reason
        return f"{where}, {self.column}: {reason}" if self.column else f"{where}: {reason}"


class ManifestError(DataProblems):
    """A manifest with bad rows; `problems` holds a RowProblem per bad cell."""

    def __init__(self, source: str, problems: list, shown: int = 50) -> None:
        rows = any(getattr(p, "row", 0) for p in problems)
        super().__init__(f"{source} (the header is row 1)" if rows else source, problems, shown)


def read_table(path: Path) -> pd.DataFrame:
    """CSV or Parquet by suffix, every column as text (IDs like 007 must stay 007). A file that
    cannot be read as a table is a ManifestError naming the file and why, not a traceback from
    pandas (missing, a folder, not UTF-8, empty, not Parquet), and so is a header naming a column
    twice."""
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            # nullable dtypes: a numeric id column with one null came back float, and case 7 read
            # "7.0", another patient than the CSV's "7" (and than the same sheet's rows re-exported)
            df = pd.read_parquet(path, dtype_backend="numpy_nullable")
            return df.astype("string")
        # index_col=False: with a trailing comma on every row (spreadsheet exports), pandas took the
        # first column as the index and shifted every other one (paths read as patient ids)
        df = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] or type(e).__name__
        if isinstance(e, UnicodeDecodeError):  # Excel's plain "CSV" is the Windows code page
            reason += "; the file is not UTF-8 text: save it as \"CSV UTF-8\" (Excel: Save As)"
        raise ManifestError(str(path), [RowProblem(0, "", f"cannot read it as a table ({reason})")]) from None
    except Exception as e:  # pyarrow's own errors (ArrowInvalid: not a Parquet file), without importing pyarrow
        if type(e).__module__.startswith("pyarrow"):
            raise ManifestError(str(path), [RowProblem(0, "", f"cannot read it as Parquet ({e})")]) from None
        raise
    if len(df.columns) == 1 and ";" in str(df.columns[0]):  # Excel's CSV in many European locales
        raise ManifestError(str(path), [RowProblem(0, str(df.columns[0])[:80], "one column: the sheet is separated "
                                                   "by ';', not ','; save it as \"CSV UTF-8\" with commas")])
    # pandas renames a repeated header `kind` to `kind.1` and reads on: which one was meant is unknown
    repeated = sorted({m.group(1) for c in df.columns if (m := re.fullmatch(r"(.+)\.\d+", str(c)))
                       and m.group(1) in df.columns})
    if repeated:
        raise ManifestError(str(path), [RowProblem(0, c, "the column appears twice in the header") for c in repeated])
    return df


def load_manifest(path: str | Path, root: str | Path | None = None, check_files: bool = True) -> pd.DataFrame:
    """Read and validate a manifest; relative paths are relative to `root` (default: its folder).

    Returns the table with text columns, blanks as "", and an added `abspath` column.
    Raises ManifestError listing every bad row.
    """
    path = Path(path)
    df = read_table(path)
    base = Path(root) if root is not None else path.parent
    problems = validate_manifest(df, base, check_files)
    if problems:
        raise ManifestError(str(path), problems)
    known = [c for c in df.columns if c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    # as validated: stripped ("P1 " and "P1" are one patient, " train" is train; unstripped,
    # the patient landed in two splits and the padded rows fell out of every split's filter)
    df = df.fillna("").astype({c: str for c in known})
    df[known] = df[known].apply(lambda col: col.str.strip())
    # a name that is not UTF-8, as clean and the jobs spell it (`\xNN`: `row_key`), names its file
    # (object dtype: such a path holds surrogate escapes, which Arrow strings cannot)
    df["abspath"] = pd.Series([str(p if os.path.isabs(p) else on_disk(base, p)) for p in df["path"]],
                              index=df.index, dtype=object)
    return df


def file_key(base: Path, path: str) -> str:
    """What one file is called however a manifest spells it (`a.jpg`, `./a.jpg`, `sub/../a.jpg`,
    `/data/a.jpg`): lexically normalised and absolute, relative paths taken from `base`."""
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


def validate_manifest(df: pd.DataFrame, base: Path, check_files: bool = True) -> list[RowProblem]:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        return [RowProblem(0, ",".join(missing), f"missing column(s); required: {', '.join(REQUIRED_COLUMNS)}")]
    problems: list[RowProblem] = []
    first_seen: dict[str, int] = {}
    has_split = "split" in df.columns
    cols = [df[c].fillna("").astype(str).str.strip() for c in ("path", "patient_id", "source", "kind")]
    splits = df["split"].fillna("").astype(str).str.strip() if has_split else None
    for i, (p, patient, source, kind) in enumerate(zip(*cols), start=1):
        if not p:
            problems.append(RowProblem(i, "path", "empty path"))
        else:
            key = file_key(base, p)
            if key in first_seen:
                problems.append(RowProblem(i, "path", f"duplicate path {p!r}", first_seen[key]))
            else:
                first_seen[key] = i
            if check_files and not (Path(p) if os.path.isabs(p) else on_disk(base, p)).is_file():
                problems.append(RowProblem(i, "path", f"missing file {p!r}"))
        if not patient:
            problems.append(RowProblem(i, "patient_id", "empty patient_id"))
        if not source:
            problems.append(RowProblem(i, "source", "empty source"))
        if kind and kind not in _KINDS:
            problems.append(RowProblem(i, "kind", f"unknown kind {kind!r}; expected one of {sorted(_KINDS)} or blank"))
        if splits is not None and splits.iat[i - 1] and splits.iat[i - 1] not in _SPLITS:
            problems.append(RowProblem(i, "split", f"unknown split {splits.iat[i - 1]!r}; expected train, val, test or blank"))
    return problems


def rebased(df: pd.DataFrame, out_manifest: str | Path) -> pd.DataFrame:
    """`df` (from `load_manifest`) with its relative paths taken from the folder `out_manifest`
    goes in, so that a manifest written elsewhere still names the same files (`split -o
    elsewhere/split.csv` named none of them). Absolute paths stay as they are."""
    out_dir = Path(out_manifest).resolve().parent
    df = df.copy()
    df["path"] = [p if os.path.isabs(p) else os.path.relpath(Path(a).resolve(), out_dir)
                  for p, a in zip(df["path"], df["abspath"])]
    return df


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write CSV or Parquet (by suffix) atomically: a crash never leaves half a manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = df.drop(columns=[c for c in ("abspath",) if c in df.columns])
    parquet = path.suffix.lower() in (".parquet", ".pq")
    # onto a folder of that name: IsADirectoryError, and no stray temporary file
    return write_atomically(path, lambda tmp: out.to_parquet(tmp, index=False) if parquet else out.to_csv(tmp, index=False))
