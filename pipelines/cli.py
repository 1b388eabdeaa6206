"""The `cervixqc` command. Thin: parses arguments, calls pipelines, prints results.

Imports are inside the commands so that `cervixqc --help` does not pay for torch.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
log = logging.getLogger("cervixqc")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _csv(value: Optional[str]) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (images/, manifest.csv, coco.json).")],
    preset: Annotated[str, typer.Option(help="tiny | small | default | clinic")] = "small",
    n_images: Annotated[Optional[int], typer.Option("--n-images", "-n", help="Override the preset's count.")] = None,
    seed: Annotated[int, typer.Option(help="Same seed, same bytes.")] = 0,
    ratio: Annotated[Optional[float], typer.Option(help="Regular : non-regular (paper: ~27).")] = None,
    no_cervix_fraction: Annotated[Optional[float], typer.Option(help="Share of no-cervix images.")] = None,
    sources: Annotated[Optional[str], typer.Option(help="Comma-separated subset of sources.")] = None,
    max_side: Annotated[Optional[int], typer.Option(help="Cap the longer side (pixels).")] = None,
    megapixels: Annotated[Optional[float], typer.Option(help="Make every image this many MP.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Processes (default: all cores).")] = None,
) -> None:
    """Generate a synthetic multi-source cervix dataset (deterministic for a seed)."""
    from dataclasses import replace

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from pipelines.data.synth import PRESETS, SizePolicy, generate

    if preset not in PRESETS:
        _fail(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
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
    if max_side is not None or megapixels is not None:
        changes["size"] = SizePolicy(cfg.size.scale, max_side or cfg.size.max_side, megapixels)
    try:
        cfg = replace(cfg, **changes)
    except ValueError as e:
        _fail(str(e))
    with Progress(TextColumn("synth"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("synth", total=cfg.n_images)
        result = generate(cfg, out, workers=workers, progress=lambda i, n: bar.update(task, completed=i))
    typer.echo(f"wrote {result.n_images} images to {result.out_dir} in {result.seconds:.1f} s "
               f"({result.images_per_second:.1f} images/s)")
    typer.echo(f"manifest: {result.manifest}\ncoco:     {result.coco}")


@app.command()
def validate(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV or Parquet.")],
    root: Annotated[Optional[Path], typer.Option(help="Folder relative paths start from.")] = None,
    coco: Annotated[Optional[Path], typer.Option(help="Also check a COCO box file.")] = None,
) -> None:
    """Check a manifest (and optionally COCO boxes); lists every problem at once."""
    from pipelines.data.coco import CocoError, load_coco
    from pipelines.data.manifest import ManifestError, load_manifest

    try:
        df = load_manifest(manifest, root)
        typer.echo(f"{manifest}: {len(df)} rows, {df['patient_id'].nunique()} patients: ok")
        if coco is not None:
            ds = load_coco(coco)
            typer.echo(f"{coco}: {len(ds.images)} images, {len(ds.annotations)} boxes: ok")
    except (ManifestError, CocoError) as e:
        _fail(str(e))


@app.command()
def split(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV or Parquet.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest to write, with a split column.")],
    seed: Annotated[int, typer.Option()] = 0,
    fractions: Annotated[str, typer.Option(help="train,val,test shares.")] = "0.7,0.15,0.15",
    train_sources: Annotated[Optional[str], typer.Option(help="Cross-source: training sources, A,B.")] = None,
    val_sources: Annotated[Optional[str], typer.Option(help="Cross-source: validation sources.")] = None,
    test_sources: Annotated[Optional[str], typer.Option(help="Cross-source: test sources.")] = None,
    coco: Annotated[Optional[Path], typer.Option(help="Also write <out>_<split>.json subsets of these boxes.")] = None,
) -> None:
    """Split by patient (stratified by source and kind), or by source (cross-source)."""
    from pipelines.data.manifest import ManifestError, load_manifest, write_manifest
    from pipelines.data.splits import SplitFractions, cross_source_split, patient_split
    from pipelines.data.stats import compute_stats

    try:
        df = load_manifest(manifest, check_files=False)
        shares = SplitFractions(*[float(v) for v in _csv(fractions)])
        if train_sources or val_sources or test_sources:
            df["split"] = cross_source_split(df, _csv(train_sources), _csv(val_sources), _csv(test_sources),
                                             shares, seed)
        else:
            df["split"] = patient_split(df, shares, seed)
    except (ManifestError, ValueError, TypeError) as e:
        _fail(str(e))
    write_manifest(df, out)
    if coco is not None:
        from pipelines.data.coco import load_coco, save_coco, subset_coco

        boxes = load_coco(coco)
        for name in ("train", "val", "test"):
            part = subset_coco(boxes, set(df.loc[df["split"] == name, "path"]))
            if part.images:
                # COCO file names stay relative to the boxes' folder, so write beside them.
                typer.echo(f"wrote {save_coco(part, coco.parent / f'{out.stem}_{name}.json')}")
    stats = compute_stats(df)
    typer.echo(stats.table.to_string())
    left_out = int((df["split"] == "").sum())
    if left_out:
        typer.echo(f"{left_out} rows of sources listed in no split were left out (blank split)")
    typer.echo(f"wrote {out}")


@app.command()
def stats(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV or Parquet.")],
    chart: Annotated[Optional[Path], typer.Option(help="PNG bar chart to write (log scale).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Counts per source x kind x split, the imbalance ratio, and a log-scale chart."""
    from pipelines.data.manifest import ManifestError, load_manifest
    from pipelines.data.stats import compute_stats, plot_counts

    try:
        df = load_manifest(manifest, check_files=False)
    except ManifestError as e:
        _fail(str(e))
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


@app.command("import-cvat")
def import_cvat_cmd(
    export: Annotated[Path, typer.Argument(help="CVAT 'COCO 1.0' annotations JSON.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Normalised COCO JSON to write.")],
    clip_tolerance: Annotated[float, typer.Option(help="Clip boxes this many px past the border.")] = 2.0,
) -> None:
    """Import a CVAT COCO export: normalise names, boxes and metadata; refuse bad boxes."""
    from pipelines.data.coco import CocoError, import_cvat, save_coco

    try:
        ds, notes = import_cvat(export, clip_tolerance)
    except CocoError as e:
        _fail(str(e))
    for n in notes:
        typer.echo(f"note: {n}")
    save_coco(ds, out)
    typer.echo(f"wrote {out}: {len(ds.images)} images, {len(ds.annotations)} boxes")


@app.command("train-detector")
def train_detector_cmd(
    train_coco: Annotated[Path, typer.Argument(help="Training COCO JSON (images relative to its folder).")],
    val_coco: Annotated[Path, typer.Argument(help="Validation COCO JSON.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: checkpoint, log, detector.safetensors/.json.")],
    arch: Annotated[str, typer.Option(help="retinanet | fasterrcnn | fcos")] = "retinanet",
    backbone: Annotated[str, typer.Option(help="resnet50 | resnet34 | resnet18 | mobilenet_v3_large")] = "resnet50",
    size: Annotated[int, typer.Option(help="Input size: the long side is resized to this.")] = 512,
    epochs: Annotated[int, typer.Option()] = 12,
    batch_size: Annotated[int, typer.Option()] = 8,
    lr: Annotated[float, typer.Option()] = 2e-4,
    workers: Annotated[int, typer.Option(help="Data-loading processes.")] = 2,
    seed: Annotated[int, typer.Option()] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's checkpoint.")] = False,
    extra_coco: Annotated[Optional[Path], typer.Option(help="Extra (synthetic) COCO set to mix in.")] = None,
    extra_ratio: Annotated[float, typer.Option(help="Extra samples per real sample each epoch.")] = 0.0,
    backbone_weights: Annotated[Optional[Path], typer.Option(help="Local backbone state dict.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Cap steps per epoch (smoke runs).")] = None,
    warmup: Annotated[int, typer.Option(help="Warm-up iterations.")] = 100,
) -> None:
    """Train a detector on COCO boxes; keeps the best epoch by validation mAP@[.5:.95].
    Multi-GPU: torchrun --nproc_per_node N -m pipelines.cli train-detector ..."""
    from models.detector import DetectorConfig
    from pipelines.training.detector import DetectorTrainConfig, train_detector

    try:
        model = DetectorConfig(arch=arch, backbone=backbone, min_size=size, max_size=size,
                               pretrained_backbone=backbone_weights is not None)
    except ValueError as e:
        _fail(str(e))
    cfg = DetectorTrainConfig(train_coco=train_coco, val_coco=val_coco, out_dir=out, model=model, epochs=epochs,
                              batch_size=batch_size, lr=lr, workers=workers, seed=seed, resume=resume,
                              extra_coco=extra_coco, extra_ratio=extra_ratio, backbone_weights=backbone_weights,
                              max_steps_per_epoch=max_steps, warmup_iters=warmup)
    result, card = train_detector(cfg)
    if card is not None:
        typer.echo(f"best epoch {result.best_epoch + 1}: {json.dumps(result.best_metrics)}")
        typer.echo(f"exported {card}")


@app.command("eval-detector")
def eval_detector_cmd(
    card: Annotated[Path, typer.Argument(help="The detector's model card (detector.json).")],
    coco: Annotated[Path, typer.Argument(help="COCO JSON to evaluate on.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for metrics JSON and gallery PNG.")],
    manifest: Annotated[Optional[Path], typer.Option(help="Manifest with sources, for per-source metrics.")] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    batch_size: Annotated[int, typer.Option()] = 8,
) -> None:
    """COCO mAP@[.5:.95], AP50/75, AP by size, per-class AP, top-1 recall@0.5, and a gallery."""
    from models.io import WeightsIntegrityError
    from pipelines.evaluation.detector_report import evaluate_detector

    try:
        report = evaluate_detector(card, coco, None, out, device, batch_size, manifest=manifest)
    except WeightsIntegrityError as e:
        _fail(str(e))
    for name, m in report.items():
        typer.echo(f"{name:>10}: mAP {m['map']:.3f}  AP50 {m['ap50']:.3f}  AP75 {m['ap75']:.3f}  "
                   f"top-1 recall@0.5 {m['top1_recall50']:.3f}  ({m['n_images']} images)")
    typer.echo(f"wrote {out / 'detector_metrics.json'} and {out / 'detector_gallery.png'}")


@app.command("detect")
def detect_cmd(
    card: Annotated[Path, typer.Argument(help="The detector's model card.")],
    manifest: Annotated[Path, typer.Argument(help="Manifest whose images to run on.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="COCO JSON of the top box per image.")],
    device: Annotated[str, typer.Option()] = "cpu",
    min_score: Annotated[Optional[float], typer.Option(help="Default: the card's threshold.")] = None,
) -> None:
    """Detector boxes as COCO, for training and evaluating stage 2 on detector crops."""
    from pipelines.data.coco import save_coco
    from pipelines.data.manifest import load_manifest
    from pipelines.detector import detect_to_coco

    df = load_manifest(manifest)
    ds = detect_to_coco(card, list(df["path"]), manifest.parent, device, min_score=min_score)
    save_coco(ds, out)
    typer.echo(f"wrote {out}: {len(ds.annotations)} boxes on {len(ds.images)} images")


@app.command("bench-detector")
def bench_detector_cmd(
    coco: Annotated[Path, typer.Argument(help="COCO JSON whose images to use.")],
    arch: Annotated[str, typer.Option()] = "retinanet",
    backbone: Annotated[str, typer.Option()] = "resnet50",
    size: Annotated[int, typer.Option()] = 512,
    n_images: Annotated[int, typer.Option(help="Images per timed round.")] = 32,
    batch_sizes: Annotated[str, typer.Option(help="Inference batch sizes, comma-separated.")] = "1,16",
    device: Annotated[str, typer.Option()] = "cpu",
    out: Annotated[Optional[Path], typer.Option(help="Write the figures as JSON too.")] = None,
) -> None:
    """Detector inference images/s per batch size and training images/s, side by side."""
    from models.detector import DetectorConfig
    from pipelines.evaluation.detector_bench import bench_detector

    cfg = DetectorConfig(arch=arch, backbone=backbone, min_size=size, max_size=size)
    result = bench_detector(cfg, coco, n_images, [int(b) for b in _csv(batch_sizes)], device=device)
    typer.echo(json.dumps(result, indent=2))
    if out is not None:
        out.write_text(json.dumps(result, indent=2))


def _stage2_config(out: Path, epochs: int, batch_size: int, lr: float, target_sensitivity: Optional[float],
                   resume: bool, **kw):
    from pipelines.training.stage2 import Stage2Config

    return Stage2Config(out_dir=out, epochs=epochs, batch_size=batch_size, lr=lr,
                        target_sensitivity=target_sensitivity, resume=resume, **kw)


@app.command("train-deep-sad")
def train_deep_sad_cmd(
    manifest: Annotated[Path, typer.Argument(help="Manifest with a split column.")],
    coco: Annotated[Path, typer.Option(help="Cervix boxes (ground truth or a detector's).")],
    out: Annotated[Path, typer.Option("--out", "-o")],
    epochs: Annotated[int, typer.Option()] = 150,
    pretrain_epochs: Annotated[int, typer.Option(help="Autoencoder pretraining epochs.")] = 150,
    batch_size: Annotated[int, typer.Option()] = 4,
    lr: Annotated[float, typer.Option()] = 1e-4,
    weight_decay: Annotated[float, typer.Option()] = 0.5e-6,
    eta: Annotated[float, typer.Option(help="Weight of the labeled samples.")] = 1.0,
    unsupervised: Annotated[bool, typer.Option(help="Deep SVDD: no labeled anomalies.")] = False,
    target_sensitivity: Annotated[Optional[float], typer.Option(help="Else the max-F1 threshold.")] = None,
    resume: Annotated[bool, typer.Option()] = False,
) -> None:
    """Deep SAD on 32x32 cervix crops, as in the paper; threshold chosen on the val split."""
    import torch

    from pipelines.data.crop_set import split_crops
    from pipelines.training.stage2 import train_deep_sad

    crops = split_crops(manifest, coco, 32, splits=("train", "val"))
    cfg = _stage2_config(out, epochs, batch_size, lr, target_sensitivity, resume, weight_decay=weight_decay,
                         pretrain_epochs=pretrain_epochs, eta=eta, unsupervised=unsupervised)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = train_deep_sad(cfg, crops["train"], crops["val"], device,
                          {"manifest": str(manifest), "boxes": str(coco)})
    typer.echo(f"exported {card}")


@app.command("train-resnest")
def train_resnest_cmd(
    manifest: Annotated[Path, typer.Argument(help="Manifest with a split column.")],
    coco: Annotated[Path, typer.Option(help="Cervix boxes (ground truth or a detector's).")],
    out: Annotated[Path, typer.Option("--out", "-o")],
    size: Annotated[int, typer.Option(help="Input size: 224 or 32, as the paper compares.")] = 224,
    arch: Annotated[str, typer.Option(help="timm name; resnest50d as the paper.")] = "resnest50d",
    epochs: Annotated[int, typer.Option()] = 100,
    batch_size: Annotated[Optional[int], typer.Option(help="Default: 256 at 32 px, 64 at 224 px.")] = None,
    lr: Annotated[float, typer.Option()] = 5e-4,
    imagenet_weights: Annotated[Optional[Path], typer.Option(help="Local timm weights file.")] = None,
    target_sensitivity: Annotated[Optional[float], typer.Option()] = None,
    synthesise: Annotated[float, typer.Option(help="Share of regular crops turned green/iodine.")] = 0.0,
    resume: Annotated[bool, typer.Option()] = False,
) -> None:
    """ResNeSt50 with the paper's recipe; binary and kind heads; threshold chosen on val."""
    import torch

    from models.classifier import ClassifierConfig
    from pipelines.data.crop_set import split_crops
    from pipelines.training.stage2 import train_classifier

    crops = split_crops(manifest, coco, round(size * 8 / 7), splits=("train", "val"))
    cfg = _stage2_config(out, epochs, batch_size or (256 if size <= 64 else 64), lr, target_sensitivity, resume,
                         weight_decay=0.0, synthesise=synthesise)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = train_classifier(cfg, ClassifierConfig(arch=arch, input_size=size), crops["train"], crops["val"], device,
                            str(imagenet_weights) if imagenet_weights else None,
                            {"manifest": str(manifest), "boxes": str(coco)})
    typer.echo(f"exported {card}")


@app.command("eval")
def eval_cmd(
    card: Annotated[Path, typer.Argument(help="A stage-2 model card (deep_sad.json or classifier.json).")],
    manifest: Annotated[Path, typer.Argument(help="Manifest with a split column.")],
    coco: Annotated[Path, typer.Option(help="Cervix boxes (ground truth or a detector's).")],
    out: Annotated[Path, typer.Option("--out", "-o")],
    split: Annotated[str, typer.Option(help="Which split to score.")] = "test",
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    """Sensitivity, specificity, precision, F1, accuracy, ROC/PR-AUC, confusion matrix,
    overall and per source, at the threshold in the card."""
    from models.io import WeightsIntegrityError
    from pipelines.evaluation.stage2_eval import evaluate_stage2

    try:
        report = evaluate_stage2(card, manifest, coco, split, out, device)
    except (WeightsIntegrityError, ValueError) as e:
        _fail(str(e))
    for name, m in report.items():
        typer.echo(f"{name:>10}: sens {m['sensitivity']:.3f} spec {m['specificity']:.3f} prec {m['precision']:.3f} "
                   f"F1 {m['f1']:.3f} acc {m['accuracy']:.3f} AUC {m['roc_auc']:.3f} (n={m['n']}, pos={m['n_positive']})")


@app.command("report")
def report_cmd(
    eval_dir: Annotated[Path, typer.Argument(help="Folder of `cervixqc eval` outputs (*_scores.npz).")],
    manifest: Annotated[Path, typer.Option(help="The manifest the scores came from (for gallery crops).")],
    coco: Annotated[Path, typer.Option(help="The boxes the crops came from.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write.")] = Path("report.html"),
) -> None:
    """A self-contained HTML report with the paper's tables and figures."""
    from pipelines.data.coco import load_coco
    from pipelines.data.crop_set import extract_crops
    from pipelines.data.manifest import load_manifest
    from pipelines.evaluation.report import build_report, load_runs

    runs = load_runs(eval_dir)
    wanted = set().union(*(set(r["paths"].tolist()) for r in runs)) if runs else set()
    df = load_manifest(manifest)
    crops = extract_crops(df[df["path"].isin(wanted)], load_coco(coco).boxes_by_file(), 96)
    thumbs = {p: crops.images[i].permute(1, 2, 0).numpy() for i, p in enumerate(crops.paths)}
    try:
        typer.echo(f"wrote {build_report(eval_dir, thumbs, out)}")
    except ValueError as e:
        _fail(str(e))


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    weights: Annotated[Path, typer.Option(help="Folder with detector/deep_sad/classifier .json + .safetensors.")] = Path("weights"),
    policy: Annotated[str, typer.Option(help="deep_sad | resnest | either | both")] = "resnest",
    device: Annotated[str, typer.Option()] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record per line.")] = False,
) -> None:
    """Label images regular / non_regular (green, iodine) / no_cervix / unreadable."""
    from pipelines.qc import QCConfig, QCPipeline

    if policy not in ("deep_sad", "resnest", "either", "both"):
        _fail(f"unknown policy {policy!r}")
    if not (weights / "detector.json").is_file():
        _fail(f"no weights in {weights}: expected detector.json, deep_sad.json and classifier.json")
    qc = QCPipeline(weights, QCConfig(device=device, policy=policy))  # type: ignore[arg-type]
    results = qc.run(images, names=[str(p) for p in images])
    for r in results:
        if as_json:
            typer.echo(r.model_dump_json(exclude={"timings_ms"}))
        else:
            extra = r.kind or r.error or ""
            typer.echo(f"{r.label.value:>12}  {extra:<28} {r.path}")


@app.command()
def clean(
    src: Annotated[Path, typer.Argument(help="Folder (recursive) or manifest CSV/Parquet.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Results folder (results.csv/.parquet, state).")],
    quarantine: Annotated[Optional[Path], typer.Option(help="Folder for links/copies of flagged files.")] = None,
    weights: Annotated[Path, typer.Option()] = Path("weights"),
    policy: Annotated[str, typer.Option(help="deep_sad | resnest | either | both")] = "resnest",
    batch_size: Annotated[int, typer.Option()] = 16,
    device: Annotated[str, typer.Option()] = "cpu",
    engine: Annotated[str, typer.Option(help="local | ray")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: a local Ray).")] = None,
    actors: Annotated[int, typer.Option(help="Ray actors (model replicas).")] = 1,
) -> None:
    """Clean a collection: one result row per file; originals untouched; resumable."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from pipelines.clean import clean as run_clean
    from pipelines.qc import QCConfig, QCPipeline

    if engine not in ("local", "ray"):
        _fail(f"unknown engine {engine!r}: local or ray")
    if not src.exists():
        _fail(f"{src} does not exist")
    with Progress(TextColumn("clean"), BarColumn(), TaskProgressColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn()) as bar:
        task = bar.add_task("clean", total=None)
        report = lambda d, n: bar.update(task, completed=d, total=n)  # noqa: E731
        if engine == "ray":
            from pipelines.clean_ray import clean_ray

            summary = clean_ray(weights, src, out, quarantine, policy, batch_size, actors, address, report)
        else:
            qc = QCPipeline(weights, QCConfig(device=device, policy=policy))  # type: ignore[arg-type]
            summary = run_clean(qc, src, out, quarantine, batch_size, progress=report)
    typer.echo(f"{summary.total} files: {summary.processed_now} processed now, {summary.skipped_done} already done; "
               + ", ".join(f"{k} {v}" for k, v in sorted(summary.by_label.items())))
    typer.echo(f"results: {summary.results_csv} and {summary.results_parquet}")


@app.command()
def bench(
    images: Annotated[Optional[Path], typer.Option(help="Folder of test images (default: synthesise).")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Weights folder (default: untrained, default sizes).")] = None,
    n_images: Annotated[int, typer.Option(help="Images to synthesise (1-12 MP mix).")] = 24,
    batch_size: Annotated[int, typer.Option()] = 16,
    out: Annotated[Optional[Path], typer.Option(help="Write the figures as JSON too.")] = None,
) -> None:
    """Naive per-image loop vs the batched engine, same models and files, one run."""
    import tempfile

    from pipelines.evaluation.engine_bench import bench as run_bench

    work = Path(tempfile.mkdtemp(prefix="cervixqc-bench-"))
    if images is None:
        from pipelines.data.synth import PRESETS, generate

        from dataclasses import replace

        images = generate(replace(PRESETS["clinic"], n_images=n_images, seed=0), work / "images").out_dir / "images"
    if weights is None:
        from pipelines.evaluation.untrained import write_untrained_weights

        weights = write_untrained_weights(work / "weights")
        typer.echo("note: untrained weights at default sizes (speed only; labels are meaningless)")
    paths = sorted(p for p in images.rglob("*.jpg"))
    result = run_bench(weights, paths, batch_size)
    typer.echo(json.dumps(result, indent=2))
    if out is not None:
        out.write_text(json.dumps(result, indent=2))


@app.command("contact-sheet")
def contact_sheet_cmd(
    out: Annotated[Path, typer.Argument(help="Image to write (.jpg or .png).")],
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """One generated image per source (rows) and kind (columns), cervix boxes drawn."""
    from pipelines.data.synth.contact_sheet import contact_sheet

    typer.echo(f"wrote {contact_sheet(out, seed)}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where to write the demo dataset.")] = Path(".cache/demo"),
) -> None:
    """Until the service lands: make a small synthetic set and print its statistics."""
    typer.echo("cervixqc: the HTTP service is not built yet (see the open issues); running the "
               "data demo instead: synthetic data + stats.")
    synth(out, preset="tiny", n_images=None, seed=0, ratio=None, no_cervix_fraction=None, sources=None,
          max_side=None, megapixels=None, workers=None)
    stats(out / "manifest.csv", chart=out / "stats.png", as_json=False)


def main() -> None:  # pragma: no cover - console entry
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
