"""Commands for a site's own labelled collection: import-labels, merge-manifests,
propose-boxes, fix-boxes, match-boxes (the steps before training on real photos)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.commands.common import _fail


def import_labels_cmd(
    labels: Annotated[Path, typer.Argument(help="The site's label sheet (CSV or Parquet).")],
    images: Annotated[Path, typer.Option(help="Folder the sheet's paths are relative to.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest to write (CSV or Parquet).")],
    path_col: Annotated[str, typer.Option(help="Column with the image path.")] = "file",
    kind_col: Annotated[Optional[str], typer.Option(help="Column with the label.")] = "kind",
    kind: Annotated[Optional[str], typer.Option(help="One kind for every row (instead of --kind-col).")] = None,
    patient_col: Annotated[str, typer.Option(help="Column with the case / patient id.")] = "case",
    source_col: Annotated[Optional[str], typer.Option(help="Column with the source (site, bank).")] = None,
    source_sep: Annotated[Optional[str], typer.Option(
        help="Take the source column's text before this separator (case ids like atlas:case_AAAN).")] = None,
    source: Annotated[Optional[str], typer.Option(help="One source for every row.")] = None,
    device_col: Annotated[Optional[str], typer.Option(help="Column with the device.")] = None,
    sha256_col: Annotated[Optional[str], typer.Option(help="Column with each file's expected sha256.")] = None,
    kind_map: Annotated[Optional[str], typer.Option(
        help="Translate labels: WORD=KIND,... with KIND regular|green|iodine|no_cervix|skip.")] = None,
) -> None:
    """A folder + a label sheet -> a checked manifest with each image's sha256."""
    from pipelines.data.labelled_import import LabelColumns, import_labelled, parse_kind_map
    from pipelines.commands.common import manifest_output, not_an_input
    from pipelines.data.manifest import ManifestError, write_manifest

    not_an_input("--out", out, labels)
    manifest_output("--out", out)
    try:
        cols = LabelColumns(path=path_col, kind=None if kind else kind_col, kind_value=kind,
                            patient=patient_col, source=source_col, source_sep=source_sep, source_value=source,
                            device=device_col, sha256=sha256_col, kind_map=parse_kind_map(kind_map))
        result = import_labelled(labels, images, out, cols)
    except (ValueError, ManifestError) as e:
        _fail(str(e))
    write_manifest(result.manifest, out)
    if result.unread_kind_column is not None:
        typer.echo(f"note: --kind {kind} labelled every row; the sheet's own {result.unread_kind_column!r} column was "
                   "not read", err=True)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(result.counts.items()))
    typer.echo(f"wrote {out}: {len(result.manifest)} rows ({counts}), "
               f"{result.manifest['patient_id'].nunique()} patients"
               + (f"; {result.skipped} rows skipped by --kind-map" if result.skipped else "")
               + (f"; {result.windows_paths} Windows names (\\) read as the folder's files" if result.windows_paths
                  else ""))
    if result.unlisted:  # a sheet short of rows imported what it had, unsaid (an audit)
        typer.echo(f"note: {len(result.unlisted)} photos under {images} are in no row of the sheet (e.g. "
                   f"{', '.join(result.unlisted[:3])}): not imported", err=True)
    if source_sep and source_col and not result.source_sep_rows:  # every patient its own source, unsaid
        typer.echo(f"warning: --source-sep {source_sep!r} is in no row's {source_col!r}: each whole value is a "
                   f"source ({result.manifest['source'].nunique()} sources)", err=True)


def merge_manifests_cmd(
    manifests: Annotated[list[Path], typer.Argument(help="Manifests to merge.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Merged manifest; paths rebased onto its folder.")],
) -> None:
    """Several checked manifests as one (e.g. real photos + hard negatives)."""
    from pipelines.data.labelled_import import merge_manifests
    from pipelines.commands.common import manifest_output, not_an_input
    from pipelines.data.manifest import ManifestError, write_manifest

    not_an_input("--out", out, *manifests)
    manifest_output("--out", out)
    try:
        df = merge_manifests(manifests, out)
    except ManifestError as e:
        _fail(str(e))
    write_manifest(df, out)
    typer.echo(f"wrote {out}: {len(df)} rows from {len(manifests)} manifests")


def propose_boxes_cmd(
    manifest: Annotated[Path, typer.Argument(help="Manifest of the photos to box.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="COCO JSON of the proposals (file name + sha256).")],
    sheets: Annotated[Optional[Path], typer.Option(help="Folder for contact sheets (PNG) to check by eye.")] = None,
    detector: Annotated[Optional[Path], typer.Option(
        help="A detector card to propose with; the tissue heuristic where it finds nothing.")] = None,
    min_score: Annotated[Optional[float], typer.Option(min=0.0, max=1.0,
                                                       help="Detector score to accept (default: its card's).")] = None,
) -> None:
    """Propose a cervix box for every photo not labelled no_cervix, and draw contact sheets.

    Check every sheet; write the wrong ones to a fixes CSV and run `cervixqc fix-boxes`."""
    from pipelines.data.box_proposals import propose_for_manifest, proposals_to_coco
    from pipelines.data.box_sheets import draw_sheets, sheets_folder_problem
    from pipelines.data.coco import save_coco
    from pipelines.data.manifest import ManifestError, load_manifest

    from models.io import WeightsIntegrityError
    from pipelines.commands.common import box_file_output, not_an_input, require_writable

    # outputs checked before the photos are read: a --sheets that was a file failed after the
    # proposals were written (an audit); -o naming the manifest or the detector's card replaced it
    not_an_input("--out", out, manifest, detector)
    require_writable("--out", out, file=True, keep=False)
    stamp = box_file_output("--out", out, "propose-boxes", legacy_prefix="cervix box proposals (")
    if sheets is not None:
        require_writable("--sheets", sheets, keep=False)
        if (problem := sheets_folder_problem(sheets)) is not None:
            _fail(f"--sheets: {problem}")
    try:
        df = load_manifest(manifest)
    except ManifestError as e:
        _fail(str(e))
    detect = None
    if detector is None:  # the README's site recipe names the detector; a bare run said nothing of it
        typer.echo("note: proposing with the tissue heuristic alone; `--detector weights/detector.json` proposes "
                   "with the bundled detector (median IoU 0.90 against checked boxes on real photos, the heuristic "
                   "0.21: an audit)", err=True)
    if detector is not None:
        from pipelines.engine.detector import top_box_fn

        try:
            detect = top_box_fn(detector, min_score)
        except WeightsIntegrityError as e:
            _fail(str(e))
    unreadable: list[str] = []
    entries = propose_for_manifest(df, detect, unreadable)
    for line in unreadable:
        typer.echo(f"no proposal, unreadable: {line}", err=True)
    how = f"detector {detector.name}, tissue heuristic where it found nothing" if detector else "tissue heuristic"
    ds = proposals_to_coco(entries, f"cervix box proposals ({how}); not checked")
    ds.info["images"] = str(manifest.parent.resolve())  # the folder its names are relative to, for fix-boxes' sheets
    ds.info["written_by"] = stamp
    save_coco(ds, out)
    origins = {}
    for a in ds.annotations:
        origins[a.origin] = origins.get(a.origin, 0) + 1  # type: ignore[attr-defined]
    typer.echo(f"wrote {out}: {len(ds.images)} images, boxes by origin {origins}"
               + (f"; {len(unreadable)} unreadable photos left out (listed above)" if unreadable else ""))
    if sheets is not None:
        captions = {p: f"{k or '?'} {Path(p).stem}" for p, k in zip(df["path"], df["kind"])}
        typer.echo(f"wrote {len(draw_sheets(ds, manifest.parent, sheets, captions=captions))} sheets to {sheets}")


def fix_boxes_cmd(
    proposals: Annotated[Path, typer.Argument(help="COCO JSON from propose-boxes.")],
    fixes: Annotated[Path, typer.Argument(help="CSV file,action,x1,y1,x2,y2,note (fractions; action box|none).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checked boxes (COCO JSON).")],
    note: Annotated[str, typer.Option(help="How the boxes were made and checked (stored in the file).")] = "",
    sheets: Annotated[Optional[Path], typer.Option(help="Redraw the sheets here for a last look.")] = None,
    images: Annotated[Optional[Path], typer.Option(
        help="Folder the file names are relative to (default: the manifest's, recorded by propose-boxes).")] = None,
) -> None:
    """Apply a reviewer's fixes to the proposals; the rest are recorded as checked."""
    from pipelines.data.box_proposals import apply_fixes, read_fixes
    from pipelines.data.box_sheets import draw_sheets, sheets_folder_problem
    from pipelines.data.coco import CocoError, load_coco, save_coco

    from pipelines.commands.common import box_file_output, not_an_input, require_writable

    if not fixes.is_file():  # exit 1 with the OS's words (an audit)
        _fail(f"{fixes}: no such file")
    not_an_input("--out", out, proposals, fixes)  # a reviewer's fixes were replaced by the boxes (an audit)
    require_writable("--out", out, file=True, keep=False)  # before the output: a bad --sheets left it written
    stamp = box_file_output("--out", out, "fix-boxes")
    if sheets is not None:
        require_writable("--sheets", sheets, keep=False)
        if (problem := sheets_folder_problem(sheets)) is not None:
            _fail(f"--sheets: {problem}")
    try:
        ds = load_coco(proposals)
        ds, counts = apply_fixes(ds, read_fixes(fixes, {im.file_name for im in ds.images}),
                                 note or f"proposals from {proposals.name}, checked by eye, fixes from {fixes.name}")
    except UnicodeDecodeError as e:  # "'utf-8' codec can't decode ..." named no file (an audit)
        _fail(f"{fixes}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 CSV")
    except (ValueError, CocoError) as e:
        _fail(str(e))
    # the sheets' photos: by the proposals' folder alone, the README's own steps (proposals.json
    # beside photos/) failed with a bare "No such file" after boxes.json was written (an audit)
    root = images or Path(ds.info.get("images") or proposals.parent)
    if sheets is not None and ds.images and not (root / ds.images[0].file_name).is_file():
        _fail(f"--sheets: {ds.images[0].file_name} is not in {root}: pass --images, the folder the manifest's "
              "paths are relative to")
    ds.info["written_by"] = stamp
    save_coco(ds, out)
    typer.echo(f"wrote {out}: {counts}")
    if sheets is not None:
        typer.echo(f"wrote {len(draw_sheets(ds, root, sheets))} sheets to {sheets}")


def match_boxes_cmd(
    manifest: Annotated[Path, typer.Argument(help="Manifest (real photos, negatives, ...).")],
    boxes: Annotated[list[Path], typer.Option("--boxes", help="A box file (COCO); repeat for several.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="COCO JSON for the manifest, beside it.")],
    images: Annotated[Optional[list[Path]], typer.Option(
        help="Folder each --boxes file's names are relative to (default: its own folder), in order.")] = None,
) -> None:
    """Boxes for every manifest row, matched by sha256 (else path); no_cervix rows get none."""
    from pipelines.data.box_match import boxes_for_manifest
    from pipelines.data.coco import CocoError, load_coco, save_coco
    from pipelines.data.manifest import ManifestError, load_manifest

    from pipelines.commands.common import box_file_output, not_an_input, require_writable

    roots = list(images or [])
    if roots and len(roots) != len(boxes):
        _fail("give --images once per --boxes, or not at all")
    not_an_input("--out", out, manifest, *boxes)
    require_writable("--out", out, file=True, keep=False)  # a folder was exit 1 naming a temporary file (an audit)
    stamp = box_file_output("--out", out, "match-boxes", legacy_prefix="cervix boxes matched to a manifest")
    try:
        files = [(load_coco(b), roots[i] if roots else b.parent) for i, b in enumerate(boxes)]
        ds, left_out = boxes_for_manifest(load_manifest(manifest), files)
    except (CocoError, ManifestError) as e:
        _fail(str(e))
    except KeyError as e:  # a box file without a 'cervix' category was a traceback (an audit)
        _fail(f"--boxes: {e.args[0] if e.args else e}")
    if out.resolve().parent != manifest.resolve().parent:
        _fail("write the COCO file beside the manifest (its file names are the manifest's paths)")
    ds.info["written_by"] = stamp
    save_coco(ds, out)
    typer.echo(f"wrote {out}: {len(ds.images)} images, {len(ds.annotations)} boxes"
               + (f"; {left_out} rows of unknown kind had no box and were left out" if left_out else ""))


def extract_listed_cmd(
    listing: Annotated[Path, typer.Argument(help="CSV with file, repo, commit, path_in_repo, sha256 columns.")],
    mirrors: Annotated[Path, typer.Option(help="Folder of repository snapshots, one per repo as owner+name/repo.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder the listed files are written into.")],
) -> None:
    """Copy listed images out of git snapshots of public repositories, byte for byte, each
    checked against its sha256 (how the real training photos and hard negatives arrive)."""
    from pipelines.commands.common import writable_folder
    from pipelines.data.listed_files import extract_listed

    try:
        writable_folder("--out", out, keep=False)  # "listing.csv/x: Not a directory", exit 1, mid-way (an audit)
        report = extract_listed(listing, mirrors, out)
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"{report.written} written, {report.present} already there, of {report.listed} listed, into {out}")
    for problem in report.problems:
        typer.echo(f"  {problem}", err=True)
    if report.problems:
        raise typer.Exit(1)
