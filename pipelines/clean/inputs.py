"""What a clean run takes from its source: every photo of a folder (skipping what file servers,
operating systems and people keep beside photos) or the paths a manifest lists."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pandas as pd

from pipelines.data.schema import PHOTO_SUFFIXES, has_backslash, on_disk, row_key

log = logging.getLogger(__name__)


# What file servers and operating systems keep beside the photos, never a photo of the
# collection: Synology's thumbnails (`@eaDir/IMG_1.jpg/SYNOPHOTO_THUMB_M.jpg`, which became
# extra rows, near duplicates and quarantine copies), recycle bins and snapshots, Windows'
# thumbnail caches. Hidden names (a leading dot: .DS_Store, ._foo.jpg) are skipped as well.
# Folders are compared in lower case: Windows spells its recycle bin `$Recycle.Bin` on C: and
# `$RECYCLE.BIN` on other drives (`RECYCLER` on XP, `Recycled` on FAT), and a deleted photo in
# it was a row, even the `duplicate_of` of the live one (an audit)
HOUSEKEEPING_FOLDERS = frozenset({"@eadir", "#recycle", "#snapshot", "$recycle.bin", "recycler", "recycled",
                                  "system volume information", "lost+found"})
HOUSEKEEPING_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r", "picasa.ini"})


# edit sidecars beside photos, never a picture: iPhones' .AAE (every edited photo has one) and
# XMP; each was an `unreadable` row and a quarantine copy among the damaged photos
HOUSEKEEPING_SUFFIXES = (".aae", ".xmp", ".lnk", ".url")  # and Windows' shortcuts


# tables and notes kept beside the photos (a dataset's manifest.csv and coco.json, a site's
# labels.xlsx, a README): each was an `unreadable` row and a quarantine copy among the damaged
# photos, so a cleaned collection read "2 damaged" for its own label files. Skipped by name and
# counted in a log line; a photo saved under such a name is not looked for
DOCUMENT_SUFFIXES = (".csv", ".tsv", ".json", ".txt", ".md", ".html", ".log", ".pdf", ".doc", ".docx", ".xls",
                     ".xlsx", ".xlsm", ".ods", ".odt", ".ppt", ".pptx", ".odp", ".rtf")


def _rows(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:10])) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")


_PHOTO_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"II*\x00", b"MM\x00*", b"BM", b"GIF8")


def _is_photo(path: Path) -> bool:
    """By the first bytes of the formats the engine reads: a manifest is text and never starts
    so, and twelve bytes tell a photo given as SRC apart without decoding it."""
    try:
        with path.open("rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head.startswith(_PHOTO_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _cell_path(base: Path, cell: str) -> str:
    """A manifest cell's path without the spaces a spreadsheet cell picks up around it, unless
    a file is named with them: `trailing space.jpg ` (a Samba share allows it), fed back from
    results.parquet as the README advises, became a missing file (an audit). Only such cells
    cost a look at the disk."""
    stripped = cell.strip()
    if stripped != cell and stripped and os.path.lexists(on_disk(base, cell)):
        return cell
    return stripped


def _folder_files(src: Path, skipped: Counter) -> Iterator[str]:
    """The row keys of a folder's files as `list_inputs` takes them, walked lazily; what it
    skips is counted into `skipped`."""
    def cannot_list(_: OSError) -> None:
        skipped["unreadable"] += 1

    for root, dirs, files in os.walk(src, onerror=cannot_list):
        skipped["housekeeping"] += sum(d.lower() in HOUSEKEEPING_FOLDERS for d in dirs)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d.lower() not in HOUSEKEEPING_FOLDERS)
        # links to folders are not followed (a loop, or a way out of the source); counted, since
        # their files get no row: link the files, or list them in a manifest
        skipped["folder_links"] += sum(os.path.islink(os.path.join(root, d)) for d in dirs)
        for f in files:
            if f.lower() in HOUSEKEEPING_FILES or f.lower().endswith(HOUSEKEEPING_SUFFIXES):
                skipped["housekeeping"] += 1
            elif f.lower().endswith(DOCUMENT_SUFFIXES) and not f.startswith("."):
                skipped["documents"] += 1
            elif not f.startswith("."):
                yield row_key((Path(root) / f).relative_to(src).as_posix())


def holds_files(src: Path) -> bool:
    """Whether a folder source has one file to clean, found without listing it all (the service
    answers a job request with it: an unmounted share's empty folder ended `done`, 0 files)."""
    return next(_folder_files(src, Counter()), None) is not None


def list_inputs(src: Path) -> list[str]:
    """Relative paths (posix) of every non-hidden file under a folder, or a manifest's paths
    relative to the manifest's folder. Sorted, so runs and resumes see the same order.

    A manifest without a `path` column, or with a row whose path is blank, is refused with a
    ValueError that names the rows: a blank row was processed and then fell out of the job's
    results. Paths are normalised (`./a.jpg` is `a.jpg`), so one file is one row. A folder's hidden
    names and `HOUSEKEEPING_FOLDERS`/`HOUSEKEEPING_FILES` are skipped (counted in a log line);
    a manifest's rows are taken as listed."""
    if src.is_file():
        from pipelines.data.manifest import WINDOWS_PATH, file_key, manifest_header, read_table

        # read as a table, it was told to save itself as "CSV UTF-8"; an empty or cut one, named so
        # but without a photo's first bytes, "cannot read it as a table" (audits)
        if _is_photo(src) or src.suffix.lower() in PHOTO_SUFFIXES:
            raise ValueError(f"{src.name} is a photo, not a folder or manifest: give its folder, or use "
                             "`cervixqc predict` for single photos")

        table = manifest_header(read_table(src), src)
        if "path" not in table.columns:
            raise ValueError(f"{src.name}: no 'path' column (it has: {', '.join(map(str, table.columns)) or 'none'})")
        paths = ["" if pd.isna(p) else _cell_path(src.parent, str(p)) for p in table["path"]]
        blank = [k + 2 for k, p in enumerate(paths) if not p]  # the header is row 1, as a spreadsheet shows it
        if blank:
            raise ValueError(f"{src.name}: empty path on row {_rows(blank)} (the header is row 1)")
        # no file is named with a NUL: such a row failed the whole job at its first batch ("embedded
        # null byte"), on every retry (an audit)
        nul = [k + 2 for k, p in enumerate(paths) if "\x00" in p]
        if nul:
            raise ValueError(f"{src.name}: a path with a NUL character on row {_rows(nul)} (the header is row 1): "
                             "no file is named so; a damaged or binary file saved as CSV?")
        # a sheet written on Windows (`sub\b.jpg`, `C:\data\a.jpg`): each such row was read as a
        # missing file, and the job ended "done" with them unreadable and retryable for good
        # ... and `C:/data/a.jpg`, a drive letter with / (an audit: a job of such rows ended done, all unreadable)
        windows = [k + 2 for k, p in enumerate(paths)
                   if (has_backslash(p) or WINDOWS_PATH.match(p)) and not os.path.lexists(on_disk(src.parent, p))]
        if windows:
            example = paths[windows[0] - 2]
            raise ValueError(f"{src.name}: a Windows path (\\ or a drive letter) on row {_rows(windows)} (the header "
                             f"is row 1), such as {example!r}: no such file; write paths with / relative to the "
                             "manifest's folder")
        # one row per file: `sub/../a.jpg` and `/abs/folder/a.jpg` are `a.jpg`, the first
        # spelling kept as its key (the file was read and stored once per spelling)
        first: dict[str, str] = {}
        for p in paths:
            first.setdefault(file_key(src.parent, p), PurePosixPath(p).as_posix())
        # stops at the first file there: a manifest copied away from its photos (or a clean's
        # results.csv given as one) loaded the models and wrote a "No such file" row for every
        # row, and clean's note blamed documents and DICOM files (an audit)
        if paths and not any(os.path.lexists(on_disk(src.parent, p)) for p in first.values()):
            results = {"label", "cervix_box"} <= set(map(str, table.columns))
            raise ValueError(f"{src.name}: not one of its {len(first)} listed files is there (paths are taken from "
                             f"{src.parent}, the manifest's folder; the first: {sorted(first.values())[0]!r}): "
                             + ("it is a results table of `cervixqc clean`; give the folder or manifest that was "
                                "cleaned" if results else "was the manifest moved away from its photos, or is their "
                                "share not mounted? (`cervixqc validate` names files spelt otherwise)"))
        return sorted(first.values())
    skipped: Counter = Counter()
    out = list(_folder_files(src, skipped))
    housekeeping, folder_links, unreadable = skipped["housekeeping"], skipped["folder_links"], skipped["unreadable"]
    if housekeeping:
        log.info("%d file-server or system entries skipped (thumbnail caches, recycle bins, edit sidecars: "
                 "HOUSEKEEPING_FOLDERS, HOUSEKEEPING_FILES, HOUSEKEEPING_SUFFIXES in pipelines/clean/inputs.py)",
                 housekeeping)
    if skipped["documents"]:
        log.info("%d tables and notes skipped, not photos (.csv, .json, .txt, .xlsx ...: DOCUMENT_SUFFIXES in "
                 "pipelines/clean/inputs.py)", skipped["documents"])
    if folder_links:
        log.warning("%d links to folders not followed: their files get no row (list them in a manifest)", folder_links)
    if unreadable:  # a subfolder the service's user may not list: its files were left out unsaid
        log.warning("%d folders could not be listed (permissions?): their files get no row", unreadable)
    unique = sorted(set(out))
    if len(unique) < len(out):  # `Pe\xf1a.jpg` in Latin-1 and a file literally named so: one row
        log.warning("%d files are spelt as another file's row (a name that is not UTF-8, written with \\xNN, "
                    "beside a file literally named so): only one of each gets a row; rename them",
                    len(out) - len(unique))
    return unique
