"""Manifests: the table that says which image belongs to which patient, source and kind.

Loading checks every row and reports every problem at once (a data team fixing a 10^5-row
export wants the whole list, not one error per run). Rows are numbered from 1 for the first
data row; for CSV the file line is that number + 1 (the header is line 1).
"""

from __future__ import annotations

import csv
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
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
from pipelines.engine.qc_result import QCResult, check_findings
from pipelines.outputs import write_atomically

_KINDS = {k.value for k in Kind}
_SPLITS = {s.value for s in Split}
# Row names of the reports beside their sources' (`overall`; the detector report's photos with
# a box): a source of that name replaced the report's own row, unsaid (an audit)
REPORT_ROWS = ("overall", "cervix photos")


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
    pandas (missing, a folder, not UTF-8, empty, not Parquet, an Excel workbook), and so is a
    header naming a column twice. As Excel writes CSV (an audit of real sheets): separated by
    ';' (its CSV in many European locales) or tabs where the header has no comma, with empty
    rows and columns after the table (dropped; an empty row inside it is still a problem). A
    blank line is a row, as a spreadsheet shows it: skipped, it made every later row's number
    one too low in the problems named."""
    try:
        if _is_workbook(path):
            raise ManifestError(str(path), [RowProblem(0, "", "an Excel workbook, not a table file: save it as "
                                                              "\"CSV UTF-8\" (Excel: Save As)")])
        if path.suffix.lower() not in (".parquet", ".pq") and _is_json(path):
            # a box file given for the manifest: 23 lines of "the column appears twice" (an audit)
            raise ManifestError(str(path), [RowProblem(0, "", "JSON (a COCO box file?), not a table: give the "
                                                              "manifest CSV or Parquet here")])
        if path.suffix.lower() in (".parquet", ".pq"):
            # nullable dtypes: a numeric id column with one null came back float, and case 7 read
            # "7.0", another patient than the CSV's "7" (and than the same sheet's rows re-exported)
            df = pd.read_parquet(path, dtype_backend="numpy_nullable")
            return df.astype("string")
        # index_col=False: with a trailing comma on every row (spreadsheet exports), pandas took the
        # first column as the index and shifted every other one (paths read as patient ids)
        sep, skip = table_separator(path)
        df = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False, sep=sep, skiprows=skip,
                         encoding="utf-8-sig", skip_blank_lines=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] or type(e).__name__
        if isinstance(e, UnicodeDecodeError):  # Excel's plain "CSV" is the Windows code page
            reason += "; the file is not UTF-8 text: save it as \"CSV UTF-8\" (Excel: Save As)"
        raise ManifestError(str(path), [RowProblem(0, "", f"cannot read it as a table ({reason})")]) from None
    except Exception as e:  # pyarrow's own errors (ArrowInvalid: not a Parquet file), without importing pyarrow
        if type(e).__module__.startswith("pyarrow"):
            raise ManifestError(str(path), [RowProblem(0, "", f"cannot read it as Parquet ({e})")]) from None
        raise
    # what Excel leaves past the table: columns without a name or a value (`Unnamed: 5`), and
    # rows of empty cells (`,,,,`), which made the whole file refused for rows with no path
    # (from the end only: stripping every cell cost 0.025 s per 10^5 rows beside a 0.09 s read)
    df = df[[c for c in df.columns if not (str(c).startswith("Unnamed: ") and not df[c].str.strip().any())]]
    end = len(df)
    while end and not "".join(df.iloc[end - 1]).strip():
        end -= 1
    df = df.iloc[:end]
    # pandas renames a repeated header `kind` to `kind.1` and reads on: which one was meant is unknown
    repeated = sorted({m.group(1) for c in df.columns if (m := re.fullmatch(r"(.+)\.\d+", str(c)))
                       and m.group(1) in df.columns})
    if repeated:
        raise ManifestError(str(path), [RowProblem(0, c, "the column appears twice in the header") for c in repeated])
    return df


def manifest_header(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The manifest's own columns named whatever their letter case and spaces (`Path`,
    ` patient_id `, as a spreadsheet's header is typed): refused as missing before, the spaces
    unseen. Two columns that name one are refused (which one was meant is unknown)."""
    known = {c: n for c in df.columns if (n := str(c).strip().casefold()) in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)}
    twice = sorted(n for n, k in Counter(known.values()).items() if k > 1)
    if twice:
        raise ManifestError(str(path), [RowProblem(0, n, "the column appears twice in the header (letter case or "
                                                         "spaces aside)") for n in twice])
    return df.rename(columns={c: n for c, n in known.items() if c != n})


def _is_workbook(path: Path) -> bool:
    """An .xlsx (a zip) or an .xls (OLE2) under any name: read as text it was "not UTF-8"."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False  # the read below says why
    return head.startswith(b"PK\x03\x04") or head == b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"


def _is_json(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError:
        return False  # the read below says why
    return head.startswith((b"{", b"[{", b"[\n", b"[ "))


_SEP_LINE = re.compile(r"sep=(.)\s*$")  # Excel's first-line hint of a CSV's separator


def table_separator(path: Path) -> tuple[str, int]:
    """The separator and the lines before the header. ',' unless the header has none and has
    ';' or tabs (Excel's CSV where the decimal mark is a comma; its "Text" export: a cell with
    a comma made such a file unreadable), or ';' or a tab splits the first lines into one same
    number of cells where ',' does not: a header cell with a comma (`Label (normal, green)`)
    made a ';' sheet one of two columns (an audit). A first line `sep=;` (Excel's hint, hidden
    by Excel itself) names it and is skipped, so rows keep the numbers Excel shows."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
            lines = [line for _, line in zip(range(20), f)]
    except OSError:
        return ",", 0
    if lines and (hint := _SEP_LINE.match(lines[0])) is not None:
        return hint.group(1), 1
    header = lines[0] if lines else ""
    if "," not in header:
        return (";" if ";" in header else "\t" if "\t" in header else ","), 0
    rows = [line for line in lines if line.strip(" \r\n,;\t")]

    def widths(sep: str) -> set[int]:
        return {len(cells) for cells in csv.reader(rows, delimiter=sep)}

    comma = widths(",")
    for sep in (";", "\t"):
        if sep in header and len(comma) > 1 and len(w := widths(sep)) == 1 and w.pop() > 1:
            return sep, 0
    return ",", 0


def load_manifest(path: str | Path, root: str | Path | None = None, check_files: bool = True) -> pd.DataFrame:
    """Read and validate a manifest; relative paths are relative to `root` (default: its folder).

    Returns the table with text columns, blanks as "", and an added `abspath` column.
    Raises ManifestError listing every bad row.
    """
    path = Path(path)
    df = manifest_header(read_table(path), path)
    base = Path(root) if root is not None else path.parent
    problems = validate_manifest(df, base, check_files)
    if problems:
        raise ManifestError(str(path), problems)
    known = [c for c in df.columns if c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    # as validated: stripped ("P1 " and "P1" are one patient, " train" is train; unstripped,
    # the patient landed in two splits and the padded rows fell out of every split's filter)
    df = df.fillna("").astype({c: str for c in known})
    df[known] = df[known].apply(lambda col: col.str.strip())
    if "sha256" in df.columns:  # hex as sha256_file writes it: an upper-case or padded one in a site's sheet
        # matched no box file's, and `match-boxes` refused its photo as replaced (a reread)
        df["sha256"] = df["sha256"].fillna("").astype(str).str.strip().str.lower()
    # a name that is not UTF-8, as clean and the jobs spell it (`\xNN`: `row_key`), names its file
    # (object dtype: such a path holds surrogate escapes, which Arrow strings cannot)
    df["abspath"] = pd.Series([str(p if os.path.isabs(p) else on_disk(base, p)) for p in df["path"]],
                              index=df.index, dtype=object)
    return df


def one_number_ids(df: pd.DataFrame) -> list[list[str]]:
    """Patient ids of one source that spell one number otherwise (`007`, `7`, `7.0`): a
    spreadsheet drops leading zeros and a numeric column turns `7` into `7.0`, so one patient's
    photos merged from two sheets came under two ids, and a split by patient could put them on
    both sides (an audit of real sheets). Only named: `PT-7` and `PT-07` may be two patients."""
    def number(patient: str) -> float | None:
        try:
            return float(patient) if "_" not in patient else None  # float() reads 7_0 as 70
        except ValueError:
            return None

    return _spelt_apart(df, number)


def one_name_ids(df: pd.DataFrame) -> list[list[str]]:
    """Patient ids of one source that differ only in letter case, spaces, hyphens or Unicode
    form (`AB12` and `ab12`, `PT 003`, `PT003` and `PT-003`, `José` typed and pasted): two
    sheets of one site spelling one patient two ways put that patient on both sides of a split,
    unsaid (audits; spaces and hyphens inside an id were not compared, and `PT 003` went to
    train and test). Only named, as `one_number_ids`."""
    return _spelt_apart(df, lambda patient: _NOT_COMPARED.sub("", unicodedata.normalize("NFKC", patient).casefold()))


_NOT_COMPARED = re.compile(r"[\s\-]+")  # in patient ids, by `one_name_ids`


def _spelt_apart(df: pd.DataFrame, key: Callable[[str], object]) -> list[list[str]]:
    """The groups of a source's patient ids that share a `key` (None: the id has none)."""
    spellings: dict[tuple[str, object], set[str]] = {}
    for source, patient in zip(df["source"], df["patient_id"]):
        if (k := key(patient)) is not None:
            spellings.setdefault((source, k), set()).add(patient)
    return [sorted(ids) for ids in spellings.values() if len(ids) > 1]


def no_file(path: Path) -> str:
    """What stands under a row's name that is no regular file: a pipe or a folder there read
    "missing file" (an audit)."""
    if not path.exists():
        return "missing file"
    return "a folder, not a file," if path.is_dir() else "not a regular file (a pipe, socket or device)"


def file_key(base: Path, path: str) -> str:
    """What one file is called however a manifest spells it (`a.jpg`, `./a.jpg`, `sub/../a.jpg`,
    `/data/a.jpg`): lexically normalised and absolute, relative paths taken from `base`."""
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


WINDOWS_PATH = re.compile(r"[A-Za-z]:[\\/]|\\\\")  # C:\... or \\server\share


def spelling_key(rel: str) -> str:
    """A name as a person would read it: Unicode NFC (a Mac writes é as e + U+0301, a Windows
    sheet as one letter), letter case folded, Windows' \\ as /."""
    return unicodedata.normalize("NFC", rel.replace("\\", "/")).casefold()


class Spellings:
    """The folder's files by `spelling_key`, listed at the first missing file only: a sheet
    naming `José café.jpg` against an NFD file, or `img_001.jpg` against `IMG_001.JPG`, read
    "missing file" for a name that looks the same in `ls`."""

    def __init__(self, root: Path, relative_to: str = "the manifest's folder") -> None:
        self.root, self.relative_to, self._index = root, relative_to, None

    def get(self, key: str) -> str | None:
        if self._index is None:
            self._index = {spelling_key(p.relative_to(self.root).as_posix()): p.relative_to(self.root).as_posix()
                           for p in self.root.rglob("*") if p.is_file()}
        return self._index.get(key)

    def near(self, rel: str) -> str | None:
        """The folder's file a missing name may have meant: the same spelling key, or for a
        Windows path the longest tail the folder holds."""
        if WINDOWS_PATH.match(rel):
            parts = [p for p in rel.replace("\\", "/").split("/") if p]
            return next((t for k in range(1, len(parts)) if (t := self.get(spelling_key("/".join(parts[k:]))))), None)
        return self.get(spelling_key(rel))

    def hint(self, rel: str) -> str:
        """What a missing file's name may have meant, or "". A Windows path's tail that the
        folder holds spelt otherwise is named: `C:\\fotos\\HOSPITAL-3.JPG` for `hospital-3.jpg`
        was told only to be made relative, which it was not short of (an audit)."""
        near = self.near(rel)
        if WINDOWS_PATH.match(rel):
            if near is not None:
                return f"; a Windows path, and the folder has {near!r}: name it so, relative to {self.relative_to}"
            return f"; a Windows path: name the file relative to {self.relative_to}, with /"
        return (f"; the folder has {near!r} (spelt otherwise: letter case, accents stored as other Unicode, "
                "or \\ for /)") if near else ""


def name_spellings(results: list[QCResult], spellings: Spellings | None,
                   told: Callable[[str], bool] = lambda near: True) -> list[QCResult]:
    """Each row of a listed file missing under its name, with what the folder holds it under in
    its error (`Spellings.hint`), where `told(near)` allows naming that file (the service: inside
    its data roots). `clean` and a service job name it so alike, row by row; a job said "No such
    file" alone where `clean` named the spelling in a note (an audit). A hint that cannot be
    looked up (a folder the walk cannot enter, a share's I/O error) is left out, not the run."""
    if spellings is None:
        return results
    named = []
    for r in results:
        if r.error and "No such file" in r.error:
            try:
                near = spellings.near(r.path)
                hint = spellings.hint(r.path) if near is None or told(near) else ""
            except OSError:
                hint = ""
            r = r.model_copy(update={"error": r.error + hint}) if hint else r
        named.append(r)
    return named


def validate_manifest(df: pd.DataFrame, base: Path, check_files: bool = True) -> list[RowProblem]:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        return [RowProblem(0, "", f"missing column(s) {', '.join(missing)}; required: {', '.join(REQUIRED_COLUMNS)}; "
                                  f"the header has {[str(c) for c in df.columns]}")]
    problems: list[RowProblem] = []
    first_seen: dict[str, int] = {}
    spellings = Spellings(base)
    has_split = "split" in df.columns
    cols = [df[c].fillna("").astype(str).str.strip() for c in ("path", "patient_id", "source", "kind")]
    splits = df["split"].fillna("").astype(str).str.strip() if has_split else None
    known = df["known_findings"].fillna("").astype(str) if "known_findings" in df.columns else None
    for i, (p, patient, source, kind) in enumerate(zip(*cols), start=1):
        if not p:
            problems.append(RowProblem(i, "path", "empty path"))
        else:
            key = file_key(base, p)
            if key in first_seen:
                problems.append(RowProblem(i, "path", f"duplicate path {p!r}", first_seen[key]))
            else:
                first_seen[key] = i
            if check_files and not (file := Path(p) if os.path.isabs(p) else on_disk(base, p)).is_file():
                problems.append(RowProblem(i, "path", f"{no_file(file)} {p!r}" + spellings.hint(p)))
        if not patient:
            problems.append(RowProblem(i, "patient_id", "empty patient_id"))
        if not source:
            problems.append(RowProblem(i, "source", "empty source"))
        elif source in REPORT_ROWS:
            problems.append(RowProblem(i, "source", f"source {source!r} is a row of every report "
                                                    f"({', '.join(REPORT_ROWS)}): name the source otherwise"))
        if kind and kind not in _KINDS:
            problems.append(RowProblem(i, "kind", f"unknown kind {kind!r}; expected one of {sorted(_KINDS)} or blank"))
        if splits is not None and splits.iat[i - 1] and splits.iat[i - 1] not in _SPLITS:
            problems.append(RowProblem(i, "split", f"unknown split {splits.iat[i - 1]!r}; expected train, val, test or blank"))
        if known is not None:
            try:
                check_findings(known_findings(known.iat[i - 1]))
            except ValueError as e:
                problems.append(RowProblem(i, "known_findings", f"{e}, separated by ';', or blank"))
    return problems


def known_findings(cell: object) -> list[str]:
    """The findings a manifest's `known_findings` cell names: `blur;dark` -> [blur, dark]; blank -> []."""
    text = "" if cell is None or (isinstance(cell, float) and cell != cell) else str(cell)
    return [f for f in (part.strip().casefold() for part in text.split(";")) if f]


def rebased(df: pd.DataFrame, out_manifest: str | Path) -> pd.DataFrame:
    """`df` (from `load_manifest`) with its relative paths taken from the folder `out_manifest`
    goes in, so that a manifest written elsewhere still names the same files (`split -o
    elsewhere/split.csv` named none of them). Absolute paths stay as they are."""
    out_dir = Path(out_manifest).resolve().parent
    df = df.copy()
    df["path"] = [p if os.path.isabs(p) else os.path.relpath(real_folder(a), out_dir)
                  for p, a in zip(df["path"], df["abspath"])]
    return df


def real_folder(path: str | Path) -> Path:
    """`path` with its folders resolved and its own name kept. Resolved whole, a file that is a
    link (git-annex, DVC's link cache) was renamed after its target, two links to one object
    came out as one duplicate path, and box files keyed by name no longer matched (an audit);
    the folders are resolved so that a relative path from a resolved folder stays right."""
    path = Path(os.path.abspath(path))
    return path.parent.resolve() / path.name


def check_manifest_name(path: str | Path) -> Path:
    """A manifest to be written is .csv or .parquet: `x.xlsx` was written as CSV text under that
    name, which no spreadsheet opens and `split` then refused (an audit). A ValueError naming it;
    writers call it before their work."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".parquet", ".pq"):
        raise ValueError(f"-o {path}: a manifest is .csv or .parquet")
    return path


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write CSV or Parquet (by suffix) atomically: a crash never leaves half a manifest."""
    path = check_manifest_name(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = df.drop(columns=[c for c in ("abspath",) if c in df.columns])
    parquet = path.suffix.lower() in (".parquet", ".pq")
    # onto a folder of that name: IsADirectoryError, and no stray temporary file
    return write_atomically(path, lambda tmp: out.to_parquet(tmp, index=False) if parquet else out.to_csv(tmp, index=False))
