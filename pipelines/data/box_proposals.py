"""Cervix box proposals for a site's unboxed photos, for a person to check on contact sheets.

Two proposers. A trained detector (ours, or the site's last one) is the better one wherever
it fires. Without a detector, or where it finds nothing, `tissue_box` proposes the bounding
box of the large, central, lit and coloured region: in a colposcope close-up that is most of
the frame (the box a close-up deserves); in a wider view it is the cervix and the nearby
vaginal wall, which the reviewer tightens. Neither is trusted: every proposal is drawn on a
sheet and looked at, and `apply_fixes` records what the reviewer changed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from pipelines.data.coco import CERVIX, CocoCategory, CocoDataset, CocoImage, make_annotation
from pipelines.data.manifest import table_separator
from pipelines.data.schema import path_key

_WORK_SIDE = 160  # px; the heuristic needs only the layout of the frame
_SNAP = 0.05  # share of the width / height


@dataclass
class Proposal:
    box: list[float] | None  # [x1, y1, x2, y2] in the image's pixels, None: no cervix proposed
    score: float
    origin: str  # "detector" | "tissue" | "fixed" | "none"


def tissue_box(rgb: np.ndarray) -> Proposal:
    """The bounding box of the lit, coloured region nearest the centre (uint8 HxWx3 in)."""
    h, w = rgb.shape[:2]
    f = _WORK_SIDE / max(h, w)
    small = np.asarray(Image.fromarray(rgb).resize((max(8, round(w * f)), max(8, round(h * f))),
                                                   Image.Resampling.BILINEAR), np.float32) / 255
    v = small.max(2)
    s = (v - small.min(2)) / np.maximum(v, 1e-3)
    # lit (not the black aperture) and coloured (not grey metal, not white text or glare)
    tissue = ndimage.uniform_filter(((v > 0.18) & (s > 0.15)).astype(np.float32), 7) > 0.5
    labels, n = ndimage.label(tissue)
    if n == 0:
        return Proposal(None, 0.0, "none")
    ys, xs = np.mgrid[: tissue.shape[0], : tissue.shape[1]]
    cy, cx = (tissue.shape[0] - 1) / 2, (tissue.shape[1] - 1) / 2
    centrality = 1 - np.hypot((ys - cy) / tissue.shape[0], (xs - cx) / tissue.shape[1])
    sizes = ndimage.sum(np.ones_like(v), labels, range(1, n + 1))
    central = ndimage.mean(centrality, labels, range(1, n + 1))
    best = int(np.argmax(sizes * central ** 4)) + 1
    my, mx = np.nonzero(labels == best)
    # percentiles, not min/max: a thin tail of lit wall should not stretch the box
    x1, x2 = np.percentile(mx, [2, 98])
    y1, y2 = np.percentile(my, [2, 98])
    box = [max(0.0, x1 / f), max(0.0, y1 / f), min(float(w), (x2 + 1) / f), min(float(h), (y2 + 1) / f)]
    # a close-up's tissue runs out of the frame: edges this near the border are the border
    box = [0.0 if box[0] < _SNAP * w else box[0], 0.0 if box[1] < _SNAP * h else box[1],
           float(w) if box[2] > (1 - _SNAP) * w else box[2], float(h) if box[3] > (1 - _SNAP) * h else box[3]]
    return Proposal(box, float(sizes[best - 1] / tissue.size), "tissue")


def proposals_to_coco(entries: list[tuple[str, int, int, str, Proposal]], note: str) -> CocoDataset:
    """(file_name, width, height, sha256, proposal) -> COCO keyed by file name and sha256;
    each box carries its origin and score."""
    images, anns = [], []
    for k, (name, w, h, digest, prop) in enumerate(entries, start=1):
        images.append(CocoImage(id=k, file_name=name, width=w, height=h, sha256=digest))
        if prop.box is not None:
            ann = make_annotation(len(anns) + 1, k, 1, prop.box)
            ann.origin, ann.score = prop.origin, round(prop.score, 4)  # type: ignore[attr-defined]
            anns.append(ann)
    return CocoDataset(info={"description": note, "version": "1.0"}, images=images, annotations=anns,
                       categories=[CocoCategory(id=1, name=CERVIX)])


@dataclass
class Fix:
    file: str
    box: list[float] | None  # fractions of width / height, None: the image shows no cervix
    note: str = ""


def read_fixes(path: str | Path, known: set[str] | None = None) -> list[Fix]:
    """A reviewer's corrections: ``file,action,x1,y1,x2,y2,note`` with action ``box`` (the
    four values are fractions of the width and height, read off the sheet's 10% ticks) or
    ``none`` (no cervix in the photo), in any letter case. Names are compared as `path_key`
    spells them (`./a.jpg` is `a.jpg`); with `known` (the proposals' names), a name that is
    not one is a bad line too. Every bad line is reported at once: an unknown name came in a
    second round, `Box` read as bad coordinates and `delete` as missing numbers (an audit)."""
    fixes, problems, first_line = [], [], {}
    known = {path_key(n) for n in known} if known is not None else None
    # a spreadsheet set to a comma-decimal locale saves with `;`: it was refused as one column
    # named 'file;action;...' (an audit); the separator is chosen as every sheet's is
    sep, skip = table_separator(Path(path))
    semicolons = sep == ";"
    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: spreadsheets save a BOM before the header
        for _ in range(skip):  # Excel's `sep=;` line
            fh.readline()
        reader = csv.DictReader(fh, delimiter=sep)
        # the header in any letter case (`File;Action;...`, as a spreadsheet user types it)
        reader.fieldnames = [(f or "").strip().lower() for f in reader.fieldnames or []]
        if "file" not in reader.fieldnames or "action" not in reader.fieldnames:
            raise ValueError(f"{path}: needs the columns file,action,x1,y1,x2,y2(,note); it has {reader.fieldnames}")
        for row in reader:
            i = reader.line_num  # the file's line: DictReader skips blank lines, which a count of rows missed
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # a spreadsheet's empty rows below the table (`;;;;;;`)
            action = (row.get("action") or "").strip().lower()
            name = (row.get("file") or "").strip()
            if not name:
                problems.append(f"line {i}: no file named")
                continue
            name = path_key(name)
            if known is not None and name not in known and name.replace("\\", "/") in known:
                name = name.replace("\\", "/")  # a Windows spelling of a proposal's subfolder
            if name in first_line:  # two decisions for one photo: which one the reviewer meant is not ours to pick
                problems.append(f"line {i}: {name!r} already fixed on line {first_line[name]}")
                continue
            first_line[name] = i
            if known is not None and name not in known:
                # the sheets' tiles show the name alone: a photo in a subfolder was written without it,
                # and refused with no hint (an audit)
                alike = sorted(k for k in known if k.rsplit("/", 1)[-1] == name.rsplit("/", 1)[-1])
                hint = f" (the proposals' {' or '.join(map(repr, alike[:3]))}?)" if alike else ""
                problems.append(f"line {i}: {name!r} is not in the proposals{hint}")
                continue
            if action not in ("box", "none"):
                problems.append(f"line {i}: unknown action {row.get('action')!r}: box or none")
                continue
            if action == "none":
                fixes.append(Fix(name, None, row.get("note") or ""))
                continue
            try:  # a `;` sheet comes from a spreadsheet set to a decimal comma: `0,1` is 0.1
                box = [float(row[k].replace(",", ".") if semicolons else row[k]) for k in ("x1", "y1", "x2", "y2")]
            except (KeyError, TypeError, ValueError):
                problems.append(f"line {i}: action box needs numbers x1,y1,x2,y2")
                continue
            if not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
                problems.append(f"line {i}: expected 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 for action box, "
                                f"got {box}")
                continue
            fixes.append(Fix(name, box, row.get("note") or ""))
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return fixes


def apply_fixes(ds: CocoDataset, fixes: list[Fix], note: str) -> tuple[CocoDataset, dict[str, int]]:
    """The proposals with the reviewer's fixes applied; untouched proposals are marked as
    checked (origin ``<proposer>, checked``), fixed ones ``fixed``. Unknown files are refused."""
    by_name = {path_key(im.file_name): im for im in ds.images}
    name_of = {im.id: path_key(im.file_name) for im in ds.images}
    unknown = sorted({f.file for f in fixes} - set(by_name))
    if unknown:
        raise ValueError(f"{len(unknown)} fixed file(s) are not in the proposals, e.g. {unknown[:3]}")
    fixed = {f.file: f for f in fixes}
    anns, counts = [], {"kept": 0, "fixed": 0, "removed": 0}
    for a in ds.annotations:
        if name_of[a.image_id] in fixed:
            continue
        origin = str(getattr(a, "origin", "proposal"))
        a.origin = origin if origin.endswith("checked") else f"{origin}, checked"  # type: ignore[attr-defined]
        anns.append(a)
        counts["kept"] += 1
    for f in fixes:
        im = by_name[f.file]
        if f.box is None:
            counts["removed"] += 1
            continue
        x1, y1, x2, y2 = f.box
        ann = make_annotation(0, im.id, 1, [x1 * im.width, y1 * im.height, x2 * im.width, y2 * im.height])
        ann.origin = "fixed"  # type: ignore[attr-defined]
        if f.note:
            ann.note = f.note  # type: ignore[attr-defined]
        anns.append(ann)
        counts["fixed"] += 1
    anns.sort(key=lambda a: a.image_id)
    for k, a in enumerate(anns, start=1):
        a.id = k
    return ds.model_copy(update={"annotations": anns, "info": {**ds.info, "description": note}}), counts



def propose_for_manifest(df, detect=None, unreadable: list[str] | None = None) -> list[tuple[str, int, int, str, Proposal]]:
    """A proposal per manifest row not labelled no_cervix (the table from `load_manifest`).
    `detect(path) -> Proposal` (a trained detector) goes first; the heuristic fills in. A
    photo that cannot be read gets no proposal and goes to `unreadable` as "path: reason"
    (one truncated file used to stop the whole command with nothing written)."""
    from models.io import sha256_file
    from pipelines.engine.decode import as_displayed

    out = []
    for path, abspath, kind in zip(df["path"], df["abspath"], df["kind"]):
        if kind == "no_cervix":
            continue
        try:
            with Image.open(abspath) as im:
                rgb = np.asarray(as_displayed(im).convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # truncated, not an image, a bomb
            if unreadable is None:
                raise
            unreadable.append(f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        prop = detect(abspath) if detect is not None else None
        if prop is None or prop.box is None:
            prop = tissue_box(rgb)
        out.append((path, rgb.shape[1], rgb.shape[0], sha256_file(abspath), prop))
    return out
