"""Boxes for a manifest, gathered from box files made elsewhere.

Checked boxes are stored keyed by file name *and* sha256, because the folder a site
extracts its photos into is never the folder the boxes were drawn in. Matching goes by
sha256 where both sides have one (manifests from `import-labels` do), else by the resolved
path; a path whose two sides name different sha256s is another photo (a file replaced since
its boxes were drawn), never a match. Photos labelled no_cervix get an entry with no box:
that is how a detector learns what is not a cervix. A cervix photo with no box anywhere, or
with an entry of none, and a no_cervix photo the box file gives boxes, are errors: the label
and the boxes disagree, and either way the detector would learn the wrong one.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipelines.data.coco import CERVIX, CocoCategory, CocoDataset, CocoError, CocoImage, make_annotation
from pipelines.data.images import displayed_size
from pipelines.data.schema import on_disk

_CERVIX_KINDS = {"regular", "green", "iodine"}


def _index(box_files: list[tuple[CocoDataset, Path]]) -> tuple[dict, dict]:
    by_sha, by_path = {}, {}
    for ds, root in box_files:
        cat = ds.category_id(CERVIX)
        boxes = {im.id: [] for im in ds.images}
        for a in ds.annotations:
            if a.category_id == cat:
                x, y, w, h = a.bbox
                boxes[a.image_id].append([x, y, x + w, y + h])
        for im in ds.images:
            entry = (im.width, im.height, boxes[im.id])
            digest = getattr(im, "sha256", None)
            if digest:
                by_sha[digest] = entry
            by_path[str(on_disk(root, im.file_name).resolve())] = entry, digest
    return by_sha, by_path


def boxes_for_manifest(df: pd.DataFrame, box_files: list[tuple[CocoDataset, Path]]) -> tuple[CocoDataset, int]:
    """A COCO file for the manifest's rows (file names = manifest paths), and how many rows of
    unknown kind had no box and were left out. `df` is a loaded manifest (with `abspath`);
    `box_files` are (dataset, folder its file names are relative to)."""
    by_sha, by_path = _index(box_files)
    shas = df["sha256"] if "sha256" in df.columns else pd.Series([""] * len(df), index=df.index)
    images, anns, problems, left_out = [], [], [], 0
    for row, (path, abspath, kind, digest) in enumerate(zip(df["path"], df["abspath"], df["kind"], shas), start=2):
        entry = by_sha.get(digest) if digest else None
        if entry is None and (at_path := by_path.get(str(Path(abspath).resolve()))) is not None:
            entry, theirs = at_path
            if digest and theirs and theirs != digest:  # another photo at that path: its boxes are not this one's
                entry = None
                if kind in _CERVIX_KINDS:
                    problems.append(f"row {row} ({path}): the box file's photo at this path has another sha256 "
                                    "(the file was replaced since its boxes were drawn): draw its boxes again")
                    continue
        if kind == "no_cervix" and entry is not None and entry[2]:
            problems.append(f"row {row} ({path}): labelled no_cervix, but the box file gives it {len(entry[2])} "
                            "cervix box(es): fix the label or the boxes")
            continue
        if kind in _CERVIX_KINDS and entry is not None and not entry[2]:
            problems.append(f"row {row} ({path}): a {kind} photo whose box-file entry has no box (a reviewer's "
                            "'none', or a proposal never fixed): fix the label or draw its box")
            continue
        if kind == "no_cervix":
            entry = (*displayed_size(abspath), [])  # shown rotated a quarter turn: as displayed
        elif entry is None:
            if kind in _CERVIX_KINDS:
                problems.append(f"row {row} ({path}): a {kind} photo with no box in any box file")
            else:
                left_out += 1
            continue
        w, h, boxes = entry
        image_id = len(images) + 1
        images.append(CocoImage(id=image_id, file_name=path, width=w, height=h, **({"sha256": digest} if digest else {})))
        anns += [make_annotation(len(anns) + 1, image_id, 1, b) for b in boxes]
    if problems:
        raise CocoError("boxes for manifest (the header is row 1)", problems)
    return CocoDataset(info={"description": "cervix boxes matched to a manifest by sha256 or path"},
                       images=images, annotations=anns, categories=[CocoCategory(id=1, name=CERVIX)]), left_out
