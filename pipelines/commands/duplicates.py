"""Duplicate commands: duplicates, eval-duplicates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.commands.common import (_fail, _split_manifest, file_progress, not_an_input, replaces_only_its_own,
                                       require_writable)
from pipelines.commands.engine import DeviceOption, _engine
from pipelines.outputs import write_json, write_together

PhashOption = Annotated[Optional[int], typer.Option(help="Most bits between whole-photo hashes of a near copy "
                                                          "(-1: off; default: DuplicateConfig's).")]
CropOption = Annotated[Optional[int], typer.Option(help="Most bits between cervix-crop hashes (-1: off).")]
CosineOption = Annotated[Optional[float], typer.Option(help="Least cosine between crop embeddings (> 1: off).")]
VerifyOption = Annotated[Optional[int], typer.Option(help="Closest photos per key (whole-photo hash, embedding) "
                                                          "checked with the pixels for cropped and turned copies "
                                                          "(0: off; default: DuplicateConfig's).")]


def _config(max_phash_distance, max_crop_distance, min_cosine, verify_k=None):
    from dataclasses import replace

    from pipelines.data.duplicates import DuplicateConfig

    changes = {k: v for k, v in (("max_phash_distance", max_phash_distance), ("max_crop_distance", max_crop_distance),
                                 ("min_cosine", min_cosine), ("verify_k", verify_k)) if v is not None}
    try:
        return replace(DuplicateConfig(), **changes)
    except ValueError as e:
        _fail(str(e))


def duplicates_cmd(
    src: Annotated[Path, typer.Argument(help="Folder of photos (recursive), manifest CSV/Parquet, or a "
                                             "`cervixqc clean` output folder (its state.sqlite is read, no engine run).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="duplicates.csv to write.")] = Path("duplicates.csv"),
    weights: Annotated[Path, typer.Option(help="Weights folder (for folders and manifests).")] = Path("weights"),
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    device: DeviceOption = "auto",
    max_phash_distance: PhashOption = None,
    max_crop_distance: CropOption = None,
    min_cosine: CosineOption = None,
    verify_k: VerifyOption = None,
    images: Annotated[Optional[Path], typer.Option(help="For a `clean` output folder: the folder its photos were "
                                                        "cleaned from, for the pixel check (without it: keys only).")] = None,
) -> None:
    """Find copies of one photo in a collection: byte-identical files (sha256) and near copies
    (re-encoded, resized: the perceptual hashes the engine computes; cropped, turned: the
    closest photos checked with the pixels). Writes duplicates.csv, one row per member of each
    group: path, group, duplicate_of (the group's first path), kind (exact | near), evidence
    (sha256 | phash | aligned | crop_hash | embedding). `cervixqc split --duplicates` reads it."""
    import pandas as pd

    from pipelines.clean.exports import reader
    from pipelines.data.duplicates import compared_file, duplicates_of_records, read_clean_state, write_table
    from pipelines.data.schema import on_disk
    from pipelines.outputs import write_atomically

    cfg = _config(max_phash_distance, max_crop_distance, min_cosine, verify_k)
    if not src.exists():
        _fail(f"{src} does not exist")
    # checked before the engine runs: a folder as -o failed after every photo was read
    not_an_input("-o", out, src)
    not_an_input("-o's list of photos compared", compared_file(out), src)  # written beside -o (an audit)
    require_writable("-o", out.resolve(), file=True)
    replaces_only_its_own("-o", out, (b"path,group,",), "a duplicates table")
    replaces_only_its_own("-o's list of photos compared", compared_file(out), (b"path\n", b"path\r\n"),
                          "a list of photos compared")
    clean_folder = src.is_dir() and (src / "state.sqlite").is_file()
    if clean_folder and out.resolve() == (src / "duplicates.csv").resolve():
        _fail(f"-o {out} is the run's own table (grouped with the photos at hand): write another file")
    from pipelines.clean.run import OUTPUT_FILES

    if clean_folder and out.resolve() in {(src / name).resolve() for name in OUTPUT_FILES}:
        # its state.sqlite or results.csv was replaced by the table, exit 0 (an audit)
        _fail(f"-o {out} is one of the clean run's own files: write the table elsewhere")
    if images is not None and not images.is_dir():  # a wrong one read nothing and fell back to keys, unsaid
        _fail(f"--images {images} is not a folder: give the folder the run cleaned")
    if clean_folder:
        try:
            records = read_clean_state(src)
        except ValueError as e:
            _fail(str(e))
        root = images
        if images is not None:
            _require_photos_in(images, src)
        if root is None and cfg.verify_k > 0:
            typer.echo("no --images: cropped and turned copies are not looked for (keys only)", err=True)
    else:
        from pipelines.clean.inputs import list_inputs

        root = src.parent if src.is_file() else src
        try:
            paths = list_inputs(src)
        except ValueError as e:
            _fail(str(e))
        if not paths:
            _fail(f"{src}: no photos to compare")
        qc = _engine(weights, device=device)

        def engine_records():  # streamed: `duplicates_of_records` keeps each photo's keys, not its record
            # file_progress: off a terminal (cron, docker logs) a long run reports too
            with file_progress("engine") as report:
                report(0, len(paths))
                for start in range(0, len(paths), batch_size):
                    chunk = paths[start:start + batch_size]
                    # on_disk: a name that is not UTF-8 is its escaped key in the rows, its bytes on disk
                    yield from qc.run([on_disk(root, p) for p in chunk], names=chunk)
                    report(start + len(chunk), len(paths))

        records = engine_records()
    seen = {"photos": 0, "unreadable": 0}
    compared: list[str] = []

    def counted(rs):  # counted on the way through
        for r in rs:
            seen["photos"] += 1
            seen["unreadable"] += r.label.value == "unreadable"
            compared.append(r.path)
            yield r

    df = duplicates_of_records(counted(records), cfg, read=None if root is None else reader(root))
    if not clean_folder and seen["unreadable"]:  # they have no keys: copies of them cannot be found
        typer.echo(f"warning: {seen['unreadable']} of {seen['photos']} files could not be read as photos and are "
                   "in no group", err=True)
    write_atomically(out, lambda tmp: write_table(df, tmp))  # a cut-short table reads as fewer groups
    # what was compared, for `split` to tell "no copy" from "never compared"
    write_atomically(compared_file(out), lambda tmp: write_table(pd.DataFrame({"path": compared}), tmp))
    exact = int((df["kind"] == "exact").sum()) if len(df) else 0
    typer.echo(f"{seen['photos']} photos: {df['group'].nunique() if len(df) else 0} duplicate groups, "
               f"{len(df)} members ({exact} byte-identical to another member)")
    typer.echo(f"wrote {out}")


def _require_photos_in(images: Path, run: Path) -> None:
    """--images must hold the run's photos: a wrong folder read none, and the crops and turns
    went unfound behind an exit 0 (an audit). The first 50 paths are looked for."""
    from pipelines.data.duplicates import compared_paths

    first = sorted(compared_paths(run) or ())[:50]
    if first and not any((images / p).is_file() for p in first):
        _fail(f"--images {images} holds none of the run's photos (looked for {len(first)}, e.g. {first[0]}): "
              "give the folder the run cleaned")


def _precision(value: float) -> str:
    return "undefined (no pair found)" if value != value else f"{value:.4f}"


def eval_duplicates_cmd(
    split_csv: Annotated[Path, typer.Argument(help="Manifest of real photos with a split column (and sha256).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON report to write.")],
    weights: Annotated[Path, typer.Option(help="Weights folder (the cards and safetensors).")] = Path("weights"),
    split: Annotated[str, typer.Option(help="Which split's photos: val to choose thresholds, test to report.")] = "test",
    copies: Annotated[int, typer.Option(min=1, help="Copies per transform and photo (re-encode, resize, crop, "
                                                    "rotate).")] = 2,
    seed: Annotated[int, typer.Option(min=0, help="Random seed (same seed, same result).")] = 0,
    sweep: Annotated[bool, typer.Option(help="Also score a grid of thresholds and name the best that keeps "
                                             "pair precision >= --min-precision (for val).")] = False,
    min_precision: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.995,
    records_out: Annotated[Optional[Path], typer.Option(help="Also save the engine's records (JSONL) and truth (CSV) "
                                                             "under this folder.")] = None,
    device: DeviceOption = "cpu",
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    max_phash_distance: PhashOption = None,
    max_crop_distance: CropOption = None,
    min_cosine: CosineOption = None,
    verify_k: VerifyOption = None,
) -> None:
    """Duplicate finding on one split's real photos and seeded copies of them: exact-copy
    recall, near recall per transform (JPEG q50-95, resize 0.5-2x, crop <= 10% a side,
    rotation 0.5-5 degrees), precision over predicted pairs (two different photos, even of one
    patient, are a false pair), per source; key distances and the pixel check's numbers;
    optionally a sweep of the keys' thresholds."""
    import time

    from pipelines.evaluation.duplicates_eval import (CopyPlan, aligned_distances, build_set, key_distances, run_engine,
                                                      score)
    from pipelines.evaluation.duplicates_eval import sweep as run_sweep

    cfg = _config(max_phash_distance, max_crop_distance, min_cosine, verify_k)
    # before the engine pass: -o naming the manifest replaced it after the pass, and a folder or
    # a path under a file failed there, naming a temporary file (an audit)
    not_an_input("-o", out, split_csv)
    require_writable("-o", out, file=True, keep=False)
    replaces_only_its_own("-o", out, (b"{",), "a JSON result of this command")
    if records_out is not None:
        require_writable("--records-out", records_out, keep=False)
    df = _split_manifest(split_csv)
    df = df[df["split"] == split].reset_index(drop=True)
    if df.empty:
        _fail(f"no rows of split {split!r} in {split_csv}")
    items, truth = build_set(df, CopyPlan(copies=copies, seed=seed))
    qc = _engine(weights, device=device)
    t0 = time.perf_counter()
    with typer.progressbar(length=len(items), label=f"engine ({len(items)} photos and copies)") as bar:
        records = run_engine(qc, items, list(truth["name"]), batch_size, progress=lambda d, n: bar.update(d - bar.pos))
    seconds = time.perf_counter() - t0
    if records_out is not None:
        records_out.mkdir(parents=True, exist_ok=True)
        lines = "".join(r.model_dump_json(exclude={"timings_ms"}) + "\n" for r in records)
        write_together({records_out / "truth.csv": lambda tmp: truth.to_csv(tmp, index=False),
                        records_out / "records.jsonl": lambda tmp: tmp.write_text(lines)})
    read = dict(zip(truth["name"], items)).__getitem__
    t0 = time.perf_counter()
    scored = score(records, truth, cfg, read=read)
    report = {"split": split, "manifest": str(split_csv), "copies_per_transform": copies, "seed": seed,
              "engine_seconds": round(seconds, 1), "grouping_seconds": round(time.perf_counter() - t0, 1),
              "score": scored, "key_distances": key_distances(records, truth),
              "aligned_distances": aligned_distances(items, truth, cfg.copy_check)}
    if sweep:
        best, _ = run_sweep(records, truth, cfg, min_precision)
        report["sweep"] = {"min_precision": min_precision, "best": score(records, truth, best, read=read)}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    s = report["score"]
    typer.echo(f"{split}: {s['n_originals']} photos, {s['n_copies']} copies; exact recall {s['exact_recall']:.3f}; near "
               + ", ".join(f"{k} {v:.3f}" for k, v in s["near_recall"].items())
               + f"; pair precision {_precision(s['precision'])} ({s['false_pairs']} false of {s['predicted_pairs']}, "
               f"{s['false_pairs_same_patient']} of one patient)")
    if sweep:
        b = report["sweep"]["best"]
        typer.echo(f"best on the grid: {b['config']}: near recall min {b['near_recall_min']:.3f}, "
                   f"precision {_precision(b['precision'])}")
    typer.echo(f"wrote {out}")
