"""Data commands: synth, validate, split, stats, import-cvat, contact-sheet, demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.commands.common import (_csv, _fail, box_file_output, manifest_output, not_an_input, processes_in,
                                       progress_console, require_writable)


def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (images/, manifest.csv, coco.json).")],
    preset: Annotated[str, typer.Option(help="tiny | small | default | clinic")] = "small",
    n_images: Annotated[Optional[int], typer.Option("--n-images", "-n", help="Override the preset's count.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Same seed, same bytes.")] = 0,
    ratio: Annotated[Optional[float], typer.Option(help="Regular : non-regular (paper: ~27).")] = None,
    no_cervix_fraction: Annotated[Optional[float], typer.Option(help="Share of no-cervix images.")] = None,
    sources: Annotated[Optional[str], typer.Option(help="Comma-separated subset of sources.")] = None,
    max_side: Annotated[Optional[int], typer.Option(min=64, help="Cap the longer side (pixels).")] = None,
    megapixels: Annotated[Optional[float], typer.Option(help="Make every image this many MP.")] = None,
    workers: Annotated[Optional[int], typer.Option(
        min=1, help="Processes (default: all cores; at most 4 per core).")] = None,
) -> None:
    """Generate a synthetic multi-source cervix dataset (deterministic for a seed)."""
    from dataclasses import replace

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from pipelines.data.synth import PRESETS, SizePolicy, generate

    if preset not in PRESETS:
        _fail(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    processes_in("--workers", workers, 1)
    require_writable("OUT", out, keep=False)  # a file of that name was exit 1 (an audit)
    # a folder holding someone's dataset had its manifest.csv, coco.json and same-named images
    # replaced, exit 0 (an audit); synth's own earlier output (synth_config.json, written last)
    # and a run stopped before its manifest are written again
    theirs = [n for n in ("manifest.csv", "coco.json") if (out / n).is_file()]
    if theirs and not (out / "synth_config.json").is_file():
        _fail(f"{out} holds a {' and a '.join(theirs)} that synth did not write: give a new or empty folder")
    cfg = PRESETS[preset]
    changes: dict = {"seed": seed}
    if n_images is not None:
        changes["n_images"] = n_images
    if ratio is not None:
        changes["ratio"] = ratio
    if no_cervix_fraction is not None:
        changes["no_cervix_fraction"] = no_cervix_fraction
    if sources:
        changes["sources"] = tuple(_csv(sources))
        if not changes["sources"]:  # `,,` said "unknown source(s) []" (an audit)
            _fail(f"--sources {sources!r} names no source")
    try:
        if max_side is not None or megapixels is not None:
            # --megapixels alone is the size asked for: under the preset's cap (the tiny preset's
            # 320 px) 50 MP came out 0.1 MP, and synth_config.json said 50 (an audit)
            cap = max_side if max_side is not None else None if megapixels is not None else cfg.size.max_side
            changes["size"] = SizePolicy(cfg.size.scale, cap, megapixels)
        cfg = replace(cfg, **changes)
    except ValueError as e:
        _fail(str(e))
    with Progress(TextColumn("synth"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), transient=True, console=progress_console()) as bar:
        task = bar.add_task("synth", total=cfg.n_images)
        result = generate(cfg, out, workers=workers, progress=lambda i, n: bar.update(task, completed=i))
    typer.echo(f"wrote {result.n_images} images to {result.out_dir} in {result.seconds:.1f} s "
               f"({result.images_per_second:.1f} images/s)")
    typer.echo(f"manifest: {result.manifest}\ncoco:     {result.coco}")
    import pandas as pd

    listed = {(result.manifest.parent / p).resolve() for p in pd.read_csv(result.manifest)["path"]}
    stale = [p for p in (out / "images").rglob("*") if p.is_file() and p.resolve() not in listed]
    if stale:  # a smaller set written over a larger one: `clean OUT/images` would label the old ones too
        typer.echo(f"warning: {len(stale)} images of an earlier set are still under {out / 'images'}, in no row of "
                   "this manifest; delete the folder first for a set of its own", err=True)


def _warn_patient_spellings(df) -> None:
    from pipelines.data.manifest import one_name_ids, one_number_ids

    def shown(twins: list[list[str]]) -> str:
        return "; ".join(" ".join(ids) for ids in twins[:5]) + (f"; {len(twins) - 5} more" if len(twins) > 5 else "")

    if twins := one_number_ids(df):
        typer.echo(f"warning: {len(twins)} number(s) written as several patient ids of one source ({shown(twins)}): "
                   "if each is one patient, write it one way (a spreadsheet drops leading zeros and adds .0), "
                   "or a split by patient may put its photos on two sides", err=True)
    if twins := one_name_ids(df):
        typer.echo(f"warning: {len(twins)} patient id(s) of one source differing only in letter case, spaces, "
                   f"hyphens or Unicode form ({shown(twins)}): if each is one patient, write it one way, or a split "
                   "by patient may put its photos on two sides", err=True)


def validate(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV or Parquet.")],
    root: Annotated[Optional[Path], typer.Option(help="Folder relative paths start from.")] = None,
    coco: Annotated[Optional[Path], typer.Option(help="Also check a COCO box file.")] = None,
) -> None:
    """Check a manifest (and optionally COCO boxes); lists every problem at once."""
    from pipelines.data.coco import CocoError, load_coco
    from pipelines.data.manifest import ManifestError, load_manifest

    if root is not None and not root.is_dir():  # every row's file was "missing" (an audit)
        _fail(f"--root {root}: {'not a folder' if root.exists() else 'no such folder'}")
    try:
        df = load_manifest(manifest, root)
        if df.empty:  # "0 rows: ok", and split and stats then refused it
            raise ManifestError(str(manifest), ["no rows, only a header"])
        _warn_patient_spellings(df)
        typer.echo(f"{manifest}: {len(df)} rows, {df['patient_id'].nunique()} patients: ok")
        if coco is not None:
            ds = load_coco(coco)
            if not ds.images:  # "0 images, 0 boxes: ok" (an audit)
                raise CocoError(str(coco), ["it lists no images"])
            _check_box_photos(ds, coco, df)
            typer.echo(f"{coco}: {len(ds.images)} images, {len(ds.annotations)} boxes: ok")
    except (ManifestError, CocoError) as e:
        _fail(str(e))


def _check_box_photos(ds, coco: Path, df) -> None:
    """What training and eval would refuse in a box file: an image that is no file, or one
    whose recorded size is not the photo's (validate said ok to both, an audit). Images that
    are no row of the manifest are counted: a box file may cover a larger collection."""
    from pipelines.data.coco import CocoError, manifest_rows, photo_problems
    from pipelines.data.crop_set import KIND_INDEX

    problems = photo_problems(ds, coco.parent)
    if problems:
        raise CocoError(str(coco), problems)
    rows = manifest_rows(ds, coco.parent, df["abspath"])
    if not rows:  # "ok" with a note, where split and training refuse the pair (an audit)
        raise CocoError(str(coco), [f"not one of its {len(ds.images)} images is a row of the manifest (another "
                                    "collection's box file, or names written from another folder?)"])
    outside = len(ds.images) - len(rows)
    if outside:
        typer.echo(f"note: {outside} of {coco.name}'s {len(ds.images)} images are no row of the manifest", err=True)
    boxed = {rows[a.image_id] for a in ds.annotations if a.image_id in rows}
    cervix = [i for i, kind in enumerate(df["kind"].astype(str)) if kind in KIND_INDEX]  # those stage 2 crops
    unboxed = [i for i in cervix if i not in boxed]
    if unboxed:  # "ok" to a box file of 0 boxes, which training refuses (an audit)
        shown = ", ".join(str(df["path"].iloc[i]) for i in unboxed[:3])
        typer.echo(f"warning: {len(unboxed)} of the manifest's {len(cervix)} cervix photos have no box in {coco.name} "
                   f"(e.g. {shown}): stage-2 training and eval refuse them unless --allow-unboxed (a detector's "
                   "misses); box them with propose-boxes and fix-boxes", err=True)


def _warn_split_copies(df) -> None:
    """Without --duplicates: byte-identical photos (the manifest's sha256, as import-labels
    records it) filed under several patient ids and put in different splits are said. A site's
    copy under a second patient went to train and test with no word (an audit); the README's
    recipe folds them first (`duplicates`, then `--duplicates --merge-duplicates`)."""
    if "sha256" not in df.columns:
        return
    shas = df["sha256"].fillna("").astype(str).str.strip().str.lower()
    rows = df.assign(_sha=shas)[shas != ""]
    apart = rows.groupby("_sha").filter(lambda g: g["split"].nunique() > 1 and g["patient_id"].nunique() > 1)
    if len(apart):
        shown = ", ".join(sorted(apart["path"].astype(str))[:4])
        typer.echo(f"warning: {apart['_sha'].nunique()} photo(s) stored as byte-identical copies under other patient "
                   f"ids landed in different splits ({shown}): a copy in training and test flatters the figures; "
                   "`cervixqc duplicates` then `split --duplicates TABLE --merge-duplicates` keeps each on one side",
                   err=True)


def split(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV or Parquet.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest to write, with a split column.")],
    seed: Annotated[int, typer.Option(min=0, help="Random seed (same seed, same result).")] = 0,
    fractions: Annotated[Optional[str], typer.Option(help="train,val,test shares [default: 0.7,0.15,0.15].")] = None,
    train_sources: Annotated[Optional[str], typer.Option(help="Cross-source: training sources, A,B.")] = None,
    val_sources: Annotated[Optional[str], typer.Option(help="Cross-source: validation sources.")] = None,
    test_sources: Annotated[Optional[str], typer.Option(help="Cross-source: test sources.")] = None,
    coco: Annotated[Optional[Path], typer.Option(
        help="Also write <out>_<split>.json subsets of these boxes, beside -o.")] = None,
    folds: Annotated[Optional[int], typer.Option(
        help="K-fold by patient: test = --fold, validation = the next fold, training = the rest; "
             "--test-sources then names held-out sources that are test in every rotation.")] = None,
    fold: Annotated[Optional[int], typer.Option(help="Which rotation of --folds (0..K-1) [default: 0].")] = None,
    duplicates: Annotated[Optional[Path], typer.Option(
        help="Duplicate groups: a duplicates.csv (cervixqc duplicates) or a cervixqc clean output folder. "
             "The split is refused (exit 2, groups listed) when copies of one photo land in different splits.")] = None,
    merge_duplicates: Annotated[bool, typer.Option(
        help="With --duplicates: instead of refusing, put every patient holding a copy of one photo under one "
             "patient id (the first photo's, in path order) before splitting; the old id goes to patient_id_original.")] = False,
) -> None:
    """Split by patient (stratified by source and kind), by source (cross-source), or in
    K folds by patient; with --duplicates, copies of one photo never straddle two splits."""
    from pipelines.data.manifest import ManifestError, load_manifest, rebased, write_manifest
    from pipelines.data.splits import (PatientsAcrossSources, SplitFractions, cross_source_split, fold_split,
                                       patient_split)
    from pipelines.data.stats import compute_stats

    if merge_duplicates and duplicates is None:
        _fail("--merge-duplicates needs --duplicates")
    # a folder of that name was exit 1 naming a temporary file, after the split (an audit)
    not_an_input("--out", out, manifest, coco, duplicates)
    if coco is not None:  # the box files written beside -o: one named as the input replaced it (an audit)
        for name in ("train", "val", "test", *(f"fold{k}" for k in range(folds or 0))):
            not_an_input("--coco's box file", out.parent / f"{out.stem}_{name}.json", coco)
    manifest_output("--out", out)
    # each was an ordinary split without a word: a --fold without --folds, shares under folds
    if fold is not None and folds is None:
        _fail("--fold picks a rotation of --folds K; give --folds too")
    if fractions is not None and folds is not None:
        _fail("--fractions does not apply to --folds (each fold is 1/K of the patients)")
    try:
        df = load_manifest(manifest, check_files=False)
        if df.empty:  # a header alone printed pandas' "Empty DataFrame" and wrote an empty split
            raise ValueError(f"{manifest} has no rows")
        _warn_patient_spellings(df)
        groups = _duplicate_groups(df, duplicates, manifest) if duplicates is not None else None
        if groups is not None and merge_duplicates:
            _merge_patients(df, groups)
        try:
            values = [float(v) for v in _csv(fractions or "0.7,0.15,0.15")]
        except ValueError:  # "could not convert string to float: 'abc'" named no option (an audit)
            raise ValueError(f"--fractions needs three numbers, train,val,test; got {fractions!r}") from None
        if len(values) != 3:  # two values used to take the default test share silently
            raise ValueError(f"--fractions needs three shares, train,val,test (0 for none); got {fractions!r}")
        shares = SplitFractions(*values)
        if folds is not None and (train_sources or val_sources):
            raise ValueError("--folds takes --test-sources only (held-out sources)")
        try:
            if folds is not None:
                df["split"] = fold_split(df, folds, fold or 0, seed, _csv(test_sources))
            elif train_sources or val_sources or test_sources:
                df["split"] = cross_source_split(df, _csv(train_sources), _csv(val_sources), _csv(test_sources),
                                                 shares, seed)
            else:
                df["split"] = patient_split(df, shares, seed)
        except PatientsAcrossSources as e:
            spanning = df["patient_id"].isin(e.patients)
            if "patient_id_original" not in df or (df["patient_id"] == df["patient_id_original"])[spanning].all():
                raise
            # else "make the IDs unique per source" blamed ids the merge itself had made
            raise ValueError(f"--merge-duplicates joined copies filed under different sources into one patient "
                             f"({len(e.patients)}, e.g. {e.patients[:5]}): a split by source cannot keep a photo "
                             "and its copy on one side; take the copies out of one source, or split by patient"
                             ) from None
    except (ManifestError, ValueError, TypeError) as e:
        _fail(str(e))
    if groups is not None:
        _refuse_split_duplicates(df, groups)
    else:
        _warn_split_copies(df)
    if coco is not None:  # read before anything is written: a bad boxes file used to leave the manifest behind
        from pipelines.data.coco import CocoError, load_coco, save_coco, split_box_files

        try:
            boxes = load_coco(coco)
        except CocoError as e:
            _fail(str(e))
    written = rebased(df, out)
    if coco is not None:
        try:
            parts = split_box_files(df, list(written["path"]), boxes, coco.parent)
        except ValueError as e:
            _fail(f"--coco {coco}: {e}")
    write_manifest(written, out)
    if coco is not None:
        for name in ("train", "val", "test"):
            part, missing = parts[name]
            target = out.parent / f"{out.stem}_{name}.json"  # beside -o, named as its rows are
            if part.images:
                typer.echo(f"wrote {save_coco(part, target)}")
            elif target.exists():  # an earlier split's: its photos may be in this one's train
                target.unlink()
                typer.echo(f"removed {target}: this split has no {name} photo in {coco.name}")
            if missing:
                typer.echo(f"{len(missing)} {name} rows have no image in {coco.name} (e.g. {missing[:3]}): they are "
                           f"in no {name} box file", err=True)
    stats = compute_stats(df)
    typer.echo(stats.table.to_string())
    left_out = int((df["split"] == "").sum())
    if left_out:
        typer.echo(f"{left_out} rows of sources listed in no split were left out (blank split)")
    if folds is None and not (train_sources or val_sources or test_sources):
        # 4 patients at 0.7/0.15/0.15 all went to train, unsaid, and the next step's val file was missing
        empty = [name for name, share in zip(("train", "val", "test"), values) if share > 0
                 and not (df["split"] == name).any()]
        if empty:
            typer.echo(f"warning: no patient in {' and '.join(empty)} ({df['patient_id'].nunique()} patients in all): "
                       "a collection this small splits no further; add patients, or change --fractions", err=True)
    elif folds is None:  # a source listed for two splits left one of them empty, unsaid (an audit)
        empty = [name for name, listed in (("train", train_sources), ("val", val_sources), ("test", test_sources))
                 if listed and not (df["split"] == name).any()]
        if empty:
            typer.echo(f"warning: no photo in {' and '.join(empty)}, though sources were listed for it: a source "
                       "listed for two splits is divided among them by patient, and too few patients split no "
                       "further; add patients, or list another source there", err=True)
    typer.echo(f"wrote {out}")


def _duplicate_groups(df, source: Path, manifest_path: Path):
    """The duplicate table restricted to the manifest's paths, with a note when they miss."""
    from pipelines.data.duplicates import compared_file, compared_paths, read_duplicates
    from pipelines.data.splits import path_key

    if not source.exists():
        raise ValueError(f"--duplicates {source}: no such file or folder")
    groups = read_duplicates(source)
    known = {path_key(p) for p in df["path"].astype(str)}
    # a boolean Series, not a list: an empty list (a table of no copies) selected no columns
    listed = groups[groups["path"].astype(str).map(lambda p: path_key(p) in known).astype(bool)]
    over_manifest = (f"relative to the same folder: `cervixqc duplicates {manifest_path} -o ...` compares the "
                     "manifest's own photos")
    if len(groups) and listed.empty:  # a table of another collection, or paths relative to another folder
        raise ValueError(f"--duplicates {source}: none of its {len(groups)} paths is in the manifest (they must "
                         f"name the files as the manifest's path column does, {over_manifest})")
    outside = len(groups) - len(listed)
    typer.echo(f"duplicates: {listed['group'].nunique()} groups, {len(listed)} photos of the manifest"
               + (f" ({outside} photos of the table are not in it)" if outside else ""))
    compared = compared_paths(source)
    if compared is None:
        typer.echo(f"note: {source} does not say which photos it compared (no {compared_file(source).name}): "
                   "photos added since it was made are unchecked", err=True)
    else:
        unseen = sorted(k for k in known if k not in compared)
        if compared and len(unseen) == len(known):  # a folder's table (`images/`'s paths): "run it over the whole
            # collection", which it had been (an audit)
            raise ValueError(f"--duplicates {source}: none of the {len(compared)} photos it compared is a path of "
                             f"the manifest (first: {sorted(compared)[0]!r} against {sorted(known)[0]!r}); they must "
                             f"name the files as the manifest's path column does, {over_manifest}")
        if unseen:
            typer.echo(f"warning: {len(unseen)} of the manifest's {len(known)} photos were not compared when "
                       f"{source} was made (first: {', '.join(unseen[:3])}): copies of them go unseen; run "
                       "`cervixqc duplicates` over the whole collection", err=True)
    return listed


def _merge_patients(df, groups) -> None:
    from pipelines.data.splits import merge_duplicate_patients

    merge = merge_duplicate_patients(df, groups)
    moved = (df.loc[merge.patient_id != df["patient_id"], "patient_id"].to_frame("old")
             .assign(new=merge.patient_id).drop_duplicates().sort_values("old"))
    if merge.patients_merged:
        if "patient_id_original" not in df.columns:  # a second merge keeps the first one's originals
            df["patient_id_original"] = df["patient_id"]
        df["patient_id"] = merge.patient_id
    typer.echo(f"merged duplicates: {merge.groups_merged} groups spanned several patient ids; "
               f"{merge.patients_merged} patient ids folded into another")
    if len(moved):  # which, not only how many (the refusal names every group): an audit
        typer.echo("  " + ", ".join(f"{o} -> {n}" for o, n in moved.head(10).itertuples(index=False))
                   + (f", and {len(moved) - 10} more (patient_id_original keeps every one)" if len(moved) > 10 else ""))


def _refuse_split_duplicates(df, groups) -> None:
    from pipelines.data.splits import duplicates_across_splits

    across = duplicates_across_splits(df, groups)
    if not across:
        return
    lines = [f"{len(across)} duplicate group(s) would land in different splits "
             "(rerun with --merge-duplicates to put each group under one patient id):"]
    for group, by_split in list(across.items())[:50]:
        sides = "; ".join(f"{split}: {', '.join(paths)}" for split, paths in by_split.items())
        lines.append(f"  group {group}: {sides}")
    if len(across) > 50:
        lines.append(f"  ... and {len(across) - 50} more")
    _fail("\n".join(lines))


def stats(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV or Parquet.")],
    chart: Annotated[Optional[Path], typer.Option(help="PNG bar chart to write (log scale).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Counts per source x kind x split, the imbalance ratio, and a log-scale chart."""
    from pipelines.data.manifest import ManifestError, load_manifest
    from pipelines.data.stats import compute_stats, plot_counts

    if chart is not None and chart.suffix.lower() != ".png":
        _fail(f"--chart {chart}: the chart is a PNG file, name it *.png")
    if chart is not None:  # a folder of that name was exit 1 after the counts (an audit)
        require_writable("--chart", chart, file=True, keep=False)
    try:
        df = load_manifest(manifest, check_files=False)
    except ManifestError as e:
        _fail(str(e))
    if df.empty:
        _fail(f"{manifest} has no rows")
    result = compute_stats(df)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
    else:
        typer.echo(result.table.to_string())
        typer.echo(f"\n{result.n_images} images, {result.n_patients} patients")
        typer.echo(f"regular : non-regular = {result.imbalance_ratio:.2f} : 1")
        for s, r in result.split_imbalance.items():
            typer.echo(f"  {s}: {r:.2f} : 1")
    if chart is not None:
        typer.echo(f"chart: {plot_counts(result, chart)}", err=as_json)


def import_cvat_cmd(
    export: Annotated[Path, typer.Argument(help="CVAT 'COCO 1.0' annotations JSON.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Normalised COCO JSON to write.")],
    clip_tolerance: Annotated[float, typer.Option(min=0.0, help="Clip boxes this many px past the border.")] = 2.0,
) -> None:
    """Import a CVAT COCO export: normalise names, boxes and metadata; refuse bad boxes."""
    from pipelines.data.coco import CocoError, import_cvat, save_coco

    not_an_input("--out", out, export)
    require_writable("--out", out, file=True, keep=False)  # a folder was exit 1 naming a temporary file (an audit)
    stamp = box_file_output("--out", out, "import-cvat", legacy_prefix="imported from CVAT export ")
    try:
        ds, notes = import_cvat(export, clip_tolerance)
    except CocoError as e:
        _fail(str(e))
    for n in notes:
        typer.echo(f"note: {n}", err=True)
    ds.info["written_by"] = stamp
    save_coco(ds, out)
    typer.echo(f"wrote {out}: {len(ds.images)} images, {len(ds.annotations)} boxes")


def contact_sheet_cmd(
    out: Annotated[Path, typer.Argument(help="Image to write (.jpg or .png).")],
    seed: Annotated[int, typer.Option(min=0, help="Random seed (same seed, same result).")] = 0,
) -> None:
    """One generated image per source (rows) and kind (columns), cervix boxes drawn."""
    from pipelines.data.synth.contact_sheet import contact_sheet

    if out.suffix.lower() not in (".jpg", ".jpeg", ".png"):  # PIL's "unknown file extension" traceback
        _fail(f"{out}: write a .jpg or .png")
    require_writable("OUT", out, file=True, keep=False)  # under a file, or a folder: exit 1, "File exists" (an audit)
    typer.echo(f"wrote {contact_sheet(out, seed)}")


def demo(
    out: Annotated[Path, typer.Option(help="Where to write the demo dataset.")] = Path(".cache/demo"),
) -> None:
    """A small synthetic set and its statistics: the data side in a minute (the README's
    walkthrough goes on to training, cleaning and the service)."""
    require_writable("--out", out, keep=False)  # else synth's own check named its argument, OUT (an audit)
    typer.echo("cervixqc demo: a tiny synthetic set and its statistics (the README's walkthrough goes further)")
    synth(out, preset="tiny", n_images=None, seed=0, ratio=None, no_cervix_fraction=None, sources=None,
          max_side=None, megapixels=None, workers=None)
    stats(out / "manifest.csv", chart=out / "stats.png", as_json=False)

