"""What a review produces: the cleaned manifest, the corrected boxes as COCO, and the
quarantine brought in line with the final labels.

Every row keeps the model's answer next to the reviewer's and the final one, so a team can
measure how often review changed the model and retrain from the same file.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from models.io import sha256_file
from pipelines.clean.quarantine import QUARANTINED, quarantine_copy, quarantine_path, same_inode
from pipelines.data.coco import CERVIX, CocoCategory, CocoDataset, CocoImage, make_annotation
from pipelines.data.opened import NotAllowed
from pipelines.data.schema import on_disk
from pipelines.engine.qc_result import QCResult, spreadsheet_row
from pipelines.outputs import flush_folder
from service.jobs.reviews import Reviewed, class_of, final_of, label_and_kind
from service.paths import inside, within

log = logging.getLogger(__name__)

MANIFEST_FIELDS = ["item", "path", "sha256", "width", "height", "model_class", "model_label", "model_kind",
                   "model_box", "reviewed_class", "reviewed_box", "reviewed_by", "reviewed_at", "final_label",
                   "final_kind", "final_box", "flags", "duplicate_group", "duplicate_of", "duplicate_kind",
                   "box_reviewed_by", "box_reviewed_at",  # added last: a site's scripts read by position
                   # the final label and kind in one word, as `import-labels --kind-col final_class` reads it:
                   # final_label said non_regular and final_kind green, and no column took the export
                   # back into training (an audit)
                   "final_class"]


def _box(b: list[float] | None) -> str:
    return "" if b is None else "[" + ", ".join(f"{v:.1f}" for v in b) + "]"


def _when(at: float | None) -> str:
    """ISO 8601 in UTC, to the millisecond: Unix seconds (1796228847.886) read as nothing to a
    person in a spreadsheet (an audit)."""
    return "" if at is None else datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="milliseconds")


def manifest_lines(rows: Iterable[tuple[int, QCResult]], reviews: dict[int, Reviewed]) -> Iterator[str]:
    """CSV text in chunks: `rows` are (item id, QCResult) in path order. `final_label` is the
    label a cleaned manifest uses (regular / non_regular / no_cervix / unreadable) and
    `final_kind` the non-regular kind; `model_class` and `reviewed_class` are the model's and the
    reviewer's label and kind in one word, as the pages show them (`reviewed_label` held "iodine"
    beside the labels "non_regular" of the other columns, and a filter on it found nothing)."""
    buf = io.StringIO()
    out = csv.DictWriter(buf, MANIFEST_FIELDS, lineterminator="\n")  # as the CSVs on disk
    out.writeheader()
    for n, (item, r) in enumerate(rows, 1):
        rev = reviews.get(item)
        cls, box = final_of(r, rev)
        label, kind = label_and_kind(cls)
        out.writerow(spreadsheet_row({"item": item, "path": r.path, "sha256": r.sha256, "width": r.width, "height": r.height,
                      "model_class": class_of(r.label.value, r.kind), "model_label": r.label.value,
                      "model_kind": r.kind or "", "model_box": _box(r.cervix_box),
                      "reviewed_class": (rev.label or "") if rev else "", "reviewed_box": _box(rev.box if rev else None),
                      # the label's reviewer, or the box's where only the box was reviewed
                      "reviewed_by": (rev.who or rev.box_who or "") if rev else "",
                      "reviewed_at": _when((rev.at or rev.box_at) if rev else None),
                      "box_reviewed_by": (rev.box_who or "") if rev else "",
                      "box_reviewed_at": _when(rev.box_at if rev else None),
                      "final_label": label, "final_kind": kind or "", "final_box": _box(box),
                      "flags": ";".join(r.flags()), "duplicate_group": r.duplicate_group,
                      "duplicate_of": r.duplicate_of or "", "duplicate_kind": r.duplicate_kind or "",
                      "final_class": cls}))
        if n % 500 == 0:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


def coco_of(rows: Iterable[tuple[int, QCResult]], reviews: dict[int, Reviewed]) -> CocoDataset:
    """Boxes for `cervixqc train-detector`: file names relative to the job's folder, one
    `cervix` box per photo that shows one (the reviewer's where corrected), photos finally
    labelled no_cervix kept without a box (the detector's hard negatives), unreadable ones
    left out, and so are photos finally showing a cervix without a box (the model found none
    and the reviewer relabelled it without drawing one): as box-less images they taught the
    detector that no cervix is there, the very miss review corrected (an audit); counted in
    `info.left_out_cervix_without_box`. Each image carries its sha256, as the project's own
    box files do."""
    ds = CocoDataset(categories=[CocoCategory(id=1, name=CERVIX)],
                     info={"description": "cervixqc review export", "version": "1.0"})
    unboxed = 0
    for image_id, (item, r) in enumerate(rows, 1):
        cls, box = final_of(r, reviews.get(item))
        if cls == "unreadable" or r.width is None or r.height is None:
            continue
        if box is None and cls != "no_cervix":
            unboxed += 1
            continue
        ds.images.append(CocoImage(id=image_id, file_name=r.path, width=r.width, height=r.height,
                                   sha256=r.sha256))
        if box is not None:
            ds.annotations.append(make_annotation(len(ds.annotations) + 1, image_id, 1, box))
    ds.info["left_out_cervix_without_box"] = unboxed
    return ds


@dataclass
class Applied:
    added: int = 0
    removed: int = 0
    folders: dict[str, int] = field(default_factory=dict)
    outside: int = 0  # reviewed into a quarantined label, but the file is outside the data roots: not copied
    missing: int = 0  # reviewed into a quarantined label, no copy to move and no original to copy
    changed: int = 0  # reviewed into a quarantined label, but the file's bytes are not those the job judged
    others: int = 0  # a copy under this row's name holds another photo (two rows, one name): left as it is


def _is_copy_of(copy: Path, r: QCResult, original: Path) -> bool:
    """Whether the file at a row's quarantine name is that row's photo: a hard link to the
    original, or the bytes the job judged. Two rows can share one name (`A.JPG` and `a.jpg`
    on a quarantine that ignores case; `..` mirrored as `__`), and Apply moved or deleted the
    other photo's copy (an audit). A row without a sha256 cannot tell, and is taken as it was."""
    if same_inode(copy, original):
        return True
    try:
        return r.sha256 is None or sha256_file(copy) == r.sha256
    except OSError:
        return False


def apply_to_quarantine(root: Path, qdir: Path, rows: Iterable[tuple[int, QCResult]],
                        reviews: dict[int, Reviewed], roots: list[Path], every_item: bool = False) -> Applied:
    """Make `qdir`'s label folders hold the final labels: a copy is added where review moved a
    photo into a quarantined label, and the copy (never the original) is removed from the
    label folder review moved it out of. Finding folders are left as the job made them.
    A file is copied only from inside `roots`, checked at the copy: a manifest's row may name
    a file outside them (the job did not read it, but a reviewer can still relabel its row),
    or a file may have become a link out since the job ran.

    A copy moving from one label folder to another is moved, not copied again from the
    original: the copy went first and the original was asked for after, so a photo whose
    original had been moved, renamed or restored elsewhere lost its only quarantine copy.
    The caller holds one Apply of a quarantine at a time (two at once removed one copy twice).

    `every_item`: the items no one reviewed too, at the model's label, for a job that made no
    quarantine of its own: Apply built one holding the reviewed photos alone, and a photo the
    model flagged and no one looked at was in none of its folders (an audit)."""
    done = Applied()
    for item, r in rows:
        if item not in reviews and not every_item:
            continue
        final, _ = label_and_kind(final_of(r, reviews.get(item, Reviewed()))[0])
        original = on_disk(root, r.path)
        # every label folder but the final one loses its copy, not only the model's: a second
        # Apply after another change of mind left the first one's copy behind, and a photo
        # changed back to the model's label never got its copy again
        named = [copy for label in QUARANTINED
                 if label != final and (copy := quarantine_path(qdir, label, r.path)).is_file()]
        stale = [copy for copy in named if _is_copy_of(copy, r, original)]
        done.others += len(named) - len(stale)
        target = quarantine_path(qdir, final, r.path) if final in QUARANTINED else None
        if target is not None and target.is_file() and not _is_copy_of(target, r, original):
            done.others += 1  # its place holds another photo: this one keeps the copies it has
            continue
        if target is not None and not target.is_file():
            if stale:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(stale.pop(0), target)
                flush_folder(target.parent)
                done.removed += 1
            else:
                if not original.is_file():
                    done.missing += 1
                    continue
                if not inside(original, roots):
                    done.outside += 1
                    continue
                if r.sha256 and sha256_file(original) != r.sha256:
                    # replaced since the job read it: the reviewer's label is of the judged photo,
                    # and the new bytes went into the quarantine under it (an audit)
                    done.changed += 1
                    continue
                try:  # the roots checked on the file copied too: it may have become a link out just now
                    quarantine_copy(root, r.path, final, qdir, link=False, allowed=within(roots))
                except NotAllowed:
                    done.outside += 1
                    continue
            done.added += 1
            done.folders[final] = done.folders.get(final, 0) + 1
        for copy in stale:
            copy.unlink(missing_ok=True)
            done.removed += 1
    log.info("review applied to %s: %d copies added, %d removed, %d outside the data roots not copied, "
             "%d without an original or a copy, %d changed since the job not copied, %d names holding another "
             "photo left", qdir, done.added, done.removed, done.outside, done.missing, done.changed, done.others)
    return done
