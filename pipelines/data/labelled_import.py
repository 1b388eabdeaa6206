"""A site's labelled collection -> the project's manifest.

Every site that retrains has the same thing: a folder of photos and a spreadsheet of labels
and case (patient) ids, named its own way. This maps those columns onto the manifest
(`path, patient_id, source, device, kind`), translates the site's label words, keeps the
other columns, records each image's sha256 (boxes are keyed by it, so they survive a moved
folder), and refuses with every problem at once: missing files, unknown labels, duplicate
paths, empty case ids, files whose bytes are not the ones the sheet lists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from models.io import sha256_file
from pipelines.data.manifest import (WINDOWS_PATH, ManifestError, RowProblem, Spellings, no_file, read_table,
                                     real_folder, validate_manifest)
from pipelines.data.schema import PHOTO_SUFFIXES, Kind
from pipelines.engine.qc_result import spreadsheet_plain

SKIP = "skip"  # a label mapped to this drops the row (e.g. the sheet's "unknown")
_KINDS = {k.value for k in Kind}


@dataclass(frozen=True)
class LabelColumns:
    """Which column of the site's sheet holds what. `source_sep` takes the text before it
    (case ids like ``atlas:case_AAAN`` carry their source); a constant source or kind fills
    sheets that have no such column."""

    path: str = "file"
    kind: str | None = "kind"
    patient: str = "case"
    source: str | None = None
    source_sep: str | None = None
    source_value: str | None = None
    kind_value: str | None = None
    device: str | None = None
    sha256: str | None = None
    kind_map: dict[str, str] = field(default_factory=dict)  # site word -> kind or "skip"

    def __post_init__(self) -> None:
        if (self.source is None) == (self.source_value is None):
            raise ValueError("give exactly one of a source column or a constant source")
        if (self.kind is None) == (self.kind_value is None):
            raise ValueError("give exactly one of a kind column or a constant kind")
        for word, kind in self.kind_map.items():
            if kind not in _KINDS | {SKIP, ""}:
                raise ValueError(f"label map {word!r} -> {kind!r}: expected one of {sorted(_KINDS)}, "
                                 f"'{SKIP}' or blank")


@dataclass
class ImportResult:
    manifest: pd.DataFrame
    skipped: int  # rows whose label maps to "skip"
    counts: dict[str, int]  # kind -> rows
    windows_paths: int = 0  # names written with \ (a Windows sheet) read as the folder's files
    unread_kind_column: str | None = None  # the sheet's own kind column, which --kind overrode
    # photos under --images that no row names (a sheet short of rows imported what it had, unsaid)
    unlisted: list[str] = field(default_factory=list)
    source_sep_rows: int = 0  # rows whose source --source-sep cut (0 with the option: it matched none)


def _sheet_column(sheet: pd.DataFrame, name: str) -> str:
    """The sheet's column for `name`: as given, else the one that reads the same in any letter
    case, spaces around it ignored (`--path-col "image file"` for `Image File`), as manifests'
    headers are read; `name` itself when none is (named as missing)."""
    if name in sheet.columns:
        return name
    matches = [str(c) for c in sheet.columns if str(c).strip().casefold() == name.strip().casefold()]
    return matches[0] if len(matches) == 1 else name


def _windows_name(rel: str, images: Path) -> str | None:
    """A Windows sheet's name as the folder holds it, or None: `sub\\a.jpg` as `sub/a.jpg`, and
    `C:\\...\\sub\\a.jpg` or `\\\\server\\...` by the longest tail of it under `images` (a sheet
    exported on the clinic's PC names its files where they were there). Every row of such a
    sheet was a missing file (400 of 400 in an audit); a wrong tail is caught by the sheet's
    sha256, where it lists one, and two rows on one file by the duplicate check."""
    parts = [p for p in rel.replace("\\", "/").split("/") if p]
    for k in range(len(parts)):
        if (images / "/".join(parts[k:])).is_file():
            return "/".join(parts[k:])
        if not WINDOWS_PATH.match(rel):
            return None  # a relative name is taken whole or not at all
    return None


def parse_kind_map(text: str | None) -> dict[str, str]:
    """``"unknown=skip,normal=regular"`` -> {"unknown": "skip", "normal": "regular"}."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        word, sep, kind = item.partition("=")
        if not sep:
            raise ValueError(f"label map item {item!r}: expected WORD=KIND")
        out[word.strip().lower()] = kind.strip().lower()
    return out


def _kind(label: str, cols: LabelColumns) -> str | None:
    """The manifest kind for a site label, SKIP, or None when the word is unknown."""
    word = label.strip().lower()
    if word in cols.kind_map:
        return cols.kind_map[word]
    return word if word in _KINDS or word == "" else None


MANIFEST_FILLED = ("path", "patient_id", "source", "device", "kind", "sha256", "label_row")


def import_labelled(labels: str | Path, images: str | Path, out_manifest: str | Path,
                    cols: LabelColumns) -> ImportResult:
    """Read the sheet, check every row, and return the manifest with paths relative to the
    folder `out_manifest` will be written in (absolute where that is impossible)."""
    labels, images, out_dir = Path(labels), Path(images), Path(out_manifest).resolve().parent
    if not images.is_dir():  # each row read "missing file" instead (an audit)
        raise ValueError(f"--images {images}: " + ("a file, not a folder" if images.exists() else "no such folder"))
    # a Parquet sheet's nulls as blanks (as a CSV's): as text they read "nan" or "None", and
    # every photo without a case id became one patient named "nan"
    sheet = read_table(labels).astype(object).fillna("")
    named = {f: getattr(cols, f) for f in ("path", "kind", "patient", "source", "device", "sha256")}
    cols = replace(cols, **{f: _sheet_column(sheet, c) for f, c in named.items() if c})
    wanted = [c for c in (cols.path, cols.kind, cols.patient, cols.source, cols.device, cols.sha256) if c]
    missing = [c for c in wanted if c not in sheet.columns]
    if missing:  # one problem for the sheet: its columns joined read as one garbled name (an audit)
        raise ManifestError(str(labels), [RowProblem(0, "", f"no column {', '.join(map(repr, missing))}; the "
                                                            f"sheet has {[str(c) for c in sheet.columns]}")])
    problems: list[RowProblem] = []
    unknown: dict[str, list[int]] = {}  # label word -> its rows
    rows, skipped, windows, sep_rows, named, absent = [], 0, 0, 0, set(), 0
    spellings = Spellings(images, "the --images folder")
    for i, rec in enumerate(sheet.to_dict("records"), start=1):
        label = cols.kind_value if cols.kind_value is not None else str(rec[cols.kind])
        kind = _kind(label, cols)
        if kind is None:  # named once per word below; the row's other problems are checked too (a
            # site fixed the word, then met a second refusal for the same row's missing file; an audit)
            unknown.setdefault(label.strip(), []).append(i)
            kind = ""
        if kind == SKIP:  # named by the sheet all the same: not one of the photos it lacks
            skipped += 1
            named.add(os.path.realpath(images / str(rec[cols.path]).strip()))
            continue
        rel = str(rec[cols.path]).strip()
        plain = str(spreadsheet_plain(rel))  # a name our CSVs wrote spreadsheet-safe ('+02.jpg: an audit)
        if plain != rel and not (images / rel).is_file() and (images / plain).is_file():
            rel = plain
        if "\\" in rel and not (images / rel).is_file() and (found := _windows_name(rel, images)):
            rel, windows = found, windows + 1
        file = images / rel
        source = cols.source_value or str(rec[cols.source]).strip()
        if cols.source_sep and cols.source_sep in source:
            source, sep_rows = source.split(cols.source_sep, 1)[0], sep_rows + 1
        digest = ""
        if rel and not file.is_file():
            absent += 1
            problems.append(RowProblem(i, cols.path, f"{no_file(file)} {rel!r} under {str(images)!r}"
                                       + spellings.hint(rel)))
        elif rel:
            named.add(os.path.realpath(file))
            digest = sha256_file(file)
            listed = str(rec[cols.sha256]).strip().lower() if cols.sha256 else ""
            if listed and listed != digest:
                problems.append(RowProblem(i, cols.sha256 or "sha256",
                                           f"{rel!r} has sha256 {digest[:12]}..., the sheet lists {listed[:12]}..."))
        path = os.path.relpath(real_folder(file), out_dir) if rel else ""
        # the sheet's other columns ride along; one named like a manifest column this import
        # fills (a `source` beside --source-col case) is kept as sheet_<name>, not overwritten
        extra = {(f"sheet_{k}" if k in MANIFEST_FILLED else k): v for k, v in rec.items() if k not in wanted}
        rows.append({**extra, "path": path, "patient_id": str(rec[cols.patient]).strip(), "source": source,
                     "device": str(rec[cols.device]).strip() if cols.device else "", "kind": kind,
                     "sha256": digest, "label_row": i})
    if absent > 1 and absent == sum(1 for r in rows if r["path"]):
        # said first: 50 lines of "missing file" for a sheet pointed at the wrong folder, and
        # nothing said that not one row's file was there (an audit)
        held = sum(1 for p in images.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
        problems.append(RowProblem(0, "", f"not one of the {absent} listed files is under {str(images)!r} "
                                          f"(it holds {held} photos): is --images the folder the sheet's paths "
                                          "are relative to?"))
    for word, at in unknown.items():  # a word per problem: one listed per row hid the rare words past the 50th
        rows_at = ", ".join(str(r + 1) for r in at[:5]) + (f" and {len(at) - 5} more" if len(at) > 5 else "")
        problems.append(RowProblem(at[0], cols.kind or "kind", f"unknown label {word!r} ({len(at)} "
                                   f"row{'s' * (len(at) > 1)}: {rows_at}); known: {sorted(_KINDS)}; map "
                                   "others with --kind-map WORD=KIND or WORD=skip"))
    df = pd.DataFrame(rows, columns=None if rows else ["path", "patient_id", "source", "device", "kind"])
    # the manifest's own checks (missing file, duplicate path, empty ids), numbered by sheet row
    # (the manifest's rows skip some)
    sheet_rows = [0, *(int(r) for r in df["label_row"])] if len(df) else [0]
    for p in validate_manifest(df, out_dir, check_files=False) if len(df) else []:
        problems.append(RowProblem(sheet_rows[p.row], p.column, p.reason, sheet_rows[p.first_row]))
    if problems:
        raise ManifestError(str(labels), sorted(problems, key=lambda p: (p.row, p.column)))
    if df.empty:
        raise ManifestError(str(labels), [RowProblem(0, "", f"no row to import ({len(sheet)} rows, {skipped} "
                                                            "skipped by the label map)")])
    df = df.drop(columns="label_row")
    front = ["path", "patient_id", "source", "device", "kind", "sha256"]
    df = df[front + [c for c in df.columns if c not in front]]
    # one kind for every row beside a sheet that has its own: the sheet's labels were replaced
    # unsaid (an audit); said, since a folder of one kind with a stale column is common too
    unread = next((str(c) for c in sheet.columns if str(c).strip().lower() == "kind"), None) \
        if cols.kind_value is not None else None
    unlisted = sorted(str(p.relative_to(images)) for p in images.rglob("*")
                      if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file() and os.path.realpath(p) not in named)
    return ImportResult(df, skipped, df["kind"].replace("", "unknown").value_counts().to_dict(), windows, unread,
                        unlisted, sep_rows)


def _in_its_file(problem: RowProblem, paths: list[str | Path], lengths: list[int]) -> RowProblem | str:
    """A problem of the merged table named by its input's file and spreadsheet row: "row 74"
    was a row of no file anyone can open (an audit)."""
    def where(row: int) -> str:
        for path, n in zip(paths, lengths):
            if row <= n:
                return f"{Path(path).name} row {row + 1}"
            row -= n
        return f"row {row + 1}"

    if not problem.row:
        return problem
    first = f" (first at {where(problem.first_row)})" if problem.first_row else ""
    return f"{where(problem.row)}, {problem.column}: {problem.reason}{first}"


def merge_manifests(paths: list[str | Path], out_manifest: str | Path) -> pd.DataFrame:
    """Several manifests as one, paths rebased onto the folder `out_manifest` goes in.

    A patient id found under two sources is refused: collections from two sites that both
    number patients from 1 would otherwise fuse unrelated people into one patient (and one
    split side)."""
    from pipelines.data.manifest import load_manifest, rebased

    out_dir = Path(out_manifest).resolve().parent
    parts = [rebased(load_manifest(p), out_manifest).drop(columns="abspath") for p in paths]
    for p, part in zip(paths, parts):  # a header alone merged without a word, where stats and split refuse it
        if part.empty:
            raise ManifestError(str(p), [RowProblem(0, "path", "no rows")])
    merged = pd.concat(parts, ignore_index=True).fillna("")
    spanning = merged.groupby("patient_id")["source"].nunique()
    spanning = sorted(spanning[spanning > 1].index)
    # each input's files were checked from its own folder; checked again from a folder -o has
    # yet to make, every row read as a missing file (an audit)
    problems: list = [_in_its_file(p, paths, [len(part) for part in parts])
                      for p in validate_manifest(merged, out_dir, check_files=False)]
    if spanning:
        problems.append(RowProblem(0, "patient_id", f"{len(spanning)} patient id(s) under several sources "
                                                    f"(e.g. {spanning[:5]}): prefix them with the source"))
    if problems:
        raise ManifestError(str(out_manifest), problems)
    return merged
