"""Stage-2 commands: train-deep-sad, train-resnest, train-colour, eval, report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.commands.common import (RunFolder, _fail, number_in, require_writable, run_record, trained_on,
                                       training_output)

Marks = Annotated[float, typer.Option(
    help="Share of training crops given a clinician's drawn marks (arrows, outlines), whatever their label.")]
Seed = Annotated[int, typer.Option(min=0, help="Seeds the weights' start, the shuffles and the augmentation.")]
AllowUnboxed = Annotated[bool, typer.Option(
    help="Leave out cervix photos without a box (a detector's box file: its misses), counted on the card; "
         "else such a photo is an error.")]


def _check_numbers(lr: float, synthesise: float, marks: float) -> None:
    number_in("--lr", lr, 0.0, 10.0, above=True)  # 1e300 overflowed in torch: a 121-line traceback (an audit)
    number_in("--synthesise", synthesise, 0.0, 1.0)
    number_in("--marks", marks, 0.0, 1.0)


def _stage2_config(out: Path, epochs: int, batch_size: int, lr: float, target_sensitivity: Optional[float],
                   resume: bool, **kw):
    from pipelines.training.stage2 import Stage2Config

    return Stage2Config(out_dir=out, epochs=epochs, batch_size=batch_size, lr=lr,
                        target_sensitivity=target_sensitivity, resume=resume, **kw)


def _with_extra(crops: dict, size: int, manifest: Optional[Path], coco: Optional[Path],
                allow_unboxed: bool = False) -> dict:
    """Append an extra collection's crops to the training split only: validation (and so every
    threshold) stays on the site's own photos."""
    if (manifest is None) != (coco is None):
        _fail("give --extra-manifest and --extra-coco together")
    if manifest is not None:
        from pipelines.data.crop_set import extra_crops

        extra = extra_crops(manifest, coco, size, allow_unboxed=allow_unboxed)
        typer.echo(f"training crops: {len(crops['train'])} from the manifest + {len(extra)} extra")
        crops["train"] = crops["train"].concat(extra)
    return crops


def _data(manifest: Path, coco: Path, extra_manifest: Path | None, extra_coco: Path | None, crops: dict) -> dict:
    """The card's data; photos left out for want of a box (--allow-unboxed) are counted, and said."""
    from models.io import sha256_file

    unboxed = {split: len(c.unboxed) for split, c in crops.items() if c.unboxed}
    if unboxed:
        typer.echo("left out, no box: " + ", ".join(f"{n} {split}" for split, n in unboxed.items())
                   + " cervix photos (--allow-unboxed)")
    return trained_on(manifest, boxes=str(coco.resolve()), boxes_sha256=sha256_file(coco),
                      left_out_without_box=unboxed,
                      extra=[str(extra_manifest), str(extra_coco)] if extra_manifest else None)


def train_deep_sad_cmd(
    manifest: Annotated[Path, typer.Argument(help="Manifest with a split column.")],
    coco: Annotated[Path, typer.Option(help="Cervix boxes (ground truth or a detector's).")],
    out: RunFolder,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs (a resume may raise it).")] = 150,
    pretrain_epochs: Annotated[int, typer.Option(min=1, help="Autoencoder pretraining epochs.")] = 150,
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    lr: Annotated[float, typer.Option(min=0.0, help="Learning rate.")] = 1e-4,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="Weight decay.")] = 0.5e-6,
    eta: Annotated[float, typer.Option(help="Weight of the labeled samples.")] = 1.0,
    unsupervised: Annotated[bool, typer.Option(help="Deep SVDD: no labeled anomalies.")] = False,
    target_sensitivity: Annotated[Optional[float], typer.Option(
        min=0.01, max=1.0, help="Else the max-F1 threshold.")] = None,
    synthesise: Annotated[float, typer.Option(
        help="Share of regular crops turned green/iodine as extra labelled anomalies.")] = 0.0,
    marks: Marks = 0.0,
    seed: Seed = 0,
    resume: Annotated[bool, typer.Option(help="Continue the training run in --out from its checkpoint.")] = False,
    extra_manifest: Annotated[Optional[Path], typer.Option(
        help="Extra training-only collection (e.g. synthetic): its manifest (train split if it has one).")] = None,
    extra_coco: Annotated[Optional[Path], typer.Option(help="The extra collection's boxes.")] = None,
    allow_unboxed: AllowUnboxed = False,
) -> None:
    """Deep SAD on 32x32 cervix crops, as in the paper; threshold chosen on the val split."""
    _check_numbers(lr=lr, synthesise=synthesise, marks=marks)
    number_in("--weight-decay", weight_decay, 0.0, 10.0)
    number_in("--eta", eta, 0.0, above=True)  # -1 weighted the labelled anomalies negatively, exit 0 (an audit)
    training_output(out, "deep_sad.json", resume)
    import torch

    from pipelines.data.crop_set import split_crops
    from pipelines.training.stage2 import train_deep_sad

    cfg = _stage2_config(out, epochs, batch_size, lr, target_sensitivity, resume, weight_decay=weight_decay,
                         pretrain_epochs=pretrain_epochs, eta=eta, unsupervised=unsupervised, synthesise=synthesise,
                         marks=marks, seed=seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:  # a bad manifest or boxes file, no split column, too little data for a batch, a run already there
        crops = _with_extra(split_crops(manifest, coco, 32, splits=("train", "val"), allow_unboxed=allow_unboxed),
                            32, extra_manifest, extra_coco, allow_unboxed)
        card = train_deep_sad(cfg, crops["train"], crops["val"], device,
                              _data(manifest, coco, extra_manifest, extra_coco, crops))
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"exported {card}")


def train_resnest_cmd(
    manifest: Annotated[Path, typer.Argument(help="Manifest with a split column.")],
    coco: Annotated[Path, typer.Option(help="Cervix boxes (ground truth or a detector's).")],
    out: RunFolder,
    size: Annotated[int, typer.Option(min=32, help="Input size: 224 or 32, as the paper compares.")] = 224,
    arch: Annotated[str, typer.Option(help="timm name; resnest50d as the paper.")] = "resnest50d",
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs (a resume may raise it).")] = 100,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Default: 256 at 32 px, 64 at 224 px.")] = None,
    lr: Annotated[float, typer.Option(min=0.0, help="Learning rate.")] = 5e-4,
    imagenet_weights: Annotated[Optional[Path], typer.Option(help="Local timm weights file.")] = None,
    init_from: Annotated[Optional[Path], typer.Option(
        help="A classifier card of ours to start from (e.g. the 32 px model for a 224 px run).")] = None,
    target_sensitivity: Annotated[Optional[float], typer.Option(
        min=0.01, max=1.0, help="The threshold that keeps this validation sensitivity (else the max-F1 one).")] = None,
    synthesise: Annotated[float, typer.Option(help="Share of regular crops turned green/iodine.")] = 0.0,
    marks: Marks = 0.0,
    seed: Seed = 0,
    resume: Annotated[bool, typer.Option(help="Continue the training run in --out from its checkpoint.")] = False,
    extra_manifest: Annotated[Optional[Path], typer.Option(
        help="Extra training-only collection (e.g. synthetic): its manifest (train split if it has one).")] = None,
    extra_coco: Annotated[Optional[Path], typer.Option(help="The extra collection's boxes.")] = None,
    allow_unboxed: AllowUnboxed = False,
) -> None:
    """ResNeSt50 with the paper's recipe; binary and kind heads; threshold chosen on val."""
    _check_numbers(lr=lr, synthesise=synthesise, marks=marks)
    training_output(out, "classifier.json", resume)
    import timm
    import torch

    from models.classifier import ClassifierConfig
    from models.io import WeightsIntegrityError, load_card
    from pipelines.data.crop_set import split_crops
    from pipelines.training.stage2 import train_classifier

    if not timm.is_model(arch):  # before the crops load: timm's RuntimeError came after them, as a traceback
        _fail(f"--arch {arch!r}: no such timm model (e.g. resnest50d, resnest14d, resnet18)")
    if init_from is not None:
        if not init_from.is_file():
            _fail(f"--init-from {init_from}: no such model card")
        try:
            start = load_card(init_from).architecture
        except ValueError as e:  # not JSON, or not a model card
            _fail(f"--init-from {init_from}: not a model card ({type(e).__name__})")
        if start != arch:
            _fail(f"--init-from {init_from} is a {start}, not a {arch}")
    crop_size = round(size * 8 / 7)
    try:
        crops = _with_extra(split_crops(manifest, coco, crop_size, splits=("train", "val"),
                                        allow_unboxed=allow_unboxed), crop_size, extra_manifest, extra_coco,
                            allow_unboxed)
    except ValueError as e:  # a bad manifest or boxes file, no split column
        _fail(str(e))
    cfg = _stage2_config(out, epochs, batch_size or (256 if size <= 64 else 64), lr, target_sensitivity, resume,
                         weight_decay=0.0, synthesise=synthesise, marks=marks, seed=seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        card = train_classifier(cfg, ClassifierConfig(arch=arch, input_size=size), crops["train"], crops["val"],
                                device, str(imagenet_weights) if imagenet_weights else None,
                                _data(manifest, coco, extra_manifest, extra_coco, crops),
                                str(init_from) if init_from else None)
    except WeightsIntegrityError as e:
        _fail(f"--init-from: {e}")
    except ValueError as e:  # too little data for a batch, a run already there, one class in val
        _fail(str(e))
    typer.echo(f"exported {card}")


def train_colour_cmd(
    manifest: Annotated[Path, typer.Argument(help="Manifest with a split column.")],
    coco: Annotated[Path, typer.Option(help="Cervix boxes (ground truth or a detector's).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the model and its card.")],
    c: Annotated[float, typer.Option(help="Inverse L2 strength of the logistic regression.")] = 0.01,
    synthesise: Annotated[float, typer.Option(
        help="Share of regular crops turned green/iodine in each draw of the training crops.")] = 0.2,
    # at most 20: each draw holds a histogram per crop, so --copies 100000000 ran on toward running out of memory
    # (an audit), and draws past a few repeat the regulars that are not re-coloured
    copies: Annotated[int, typer.Option(
        min=1, max=20, help="Draws of the manifest's training crops (extra crops: one).")] = 3,
    extra_manifest: Annotated[Optional[Path], typer.Option(
        help="Extra training-only collection (e.g. synthetic): its manifest (train split if it has one).")] = None,
    extra_coco: Annotated[Optional[Path], typer.Option(help="The extra collection's boxes.")] = None,
    allow_unboxed: AllowUnboxed = False,
) -> None:
    """The crop-colour scorer (a logistic regression on the 32 px crop's colour histogram), the
    third vote of the two_of_three policy; threshold chosen on the val split."""
    if not (c > 0 and copies >= 1 and 0 <= synthesise <= 1) or c == float("inf"):  # nan fails every comparison
        _fail("need --c > 0, --copies >= 1 and 0 <= --synthesise <= 1")
    training_output(out, "colour.json", one_shot=True)
    if (extra_manifest is None) != (extra_coco is None):
        _fail("give --extra-manifest and --extra-coco together")
    from pipelines.data.crop_set import extra_crops, split_crops
    from pipelines.training.colour import ColourTrainConfig, train_colour

    try:
        crops = split_crops(manifest, coco, 32, splits=("train", "val"), allow_unboxed=allow_unboxed)
        if extra_manifest is not None:
            crops["extra"] = extra_crops(extra_manifest, extra_coco, 32, allow_unboxed=allow_unboxed)
        card = train_colour(ColourTrainConfig(out_dir=out, c=c, synthesise=synthesise, copies=copies),
                            crops["train"], crops["val"], crops.get("extra"),
                            _data(manifest, coco, extra_manifest, extra_coco, crops))
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"exported {card}")


def eval_cmd(
    card: Annotated[Path, typer.Argument(help="A stage-2 model card (deep_sad.json or classifier.json).")],
    manifest: Annotated[Path, typer.Argument(help="Manifest with a split column.")],
    coco: Annotated[Path, typer.Option(help="Cervix boxes (ground truth or a detector's).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the metrics JSON and figures.")],
    split: Annotated[str, typer.Option(help="Which split to score.")] = "test",
    device: Annotated[str, typer.Option(help="auto (cuda when present), cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """Sensitivity, specificity, precision, F1, accuracy, ROC/PR-AUC, confusion matrix,
    overall and per source, at the threshold in the card."""
    from models.io import WeightsIntegrityError
    from pipelines.commands.common import device_or_fail, rate_text, require_writable
    from pipelines.evaluation.stage2_eval import CHOSEN_HERE, evaluate_stage2

    device = device_or_fail(device)
    require_writable("--out", out, keep=False)  # a file there failed after the scoring, exit 1 (an audit)
    try:
        report, by_source, role = evaluate_stage2(card, manifest, coco, split, out, device)
    except (WeightsIntegrityError, ValueError) as e:
        _fail(str(e))
    if role == CHOSEN_HERE:  # eval-pipeline said so; eval did not (an audit)
        typer.echo(f"warning: the threshold in {card.name} was chosen on these {split} rows (calibrate-stage2): these "
                   "figures include the photos that chose it and are not held-out ones", err=True)
    elif role:
        typer.echo(f"{split} rows: {role}")
    left_out: dict[str, int] = {}
    for kinds in by_source.values():
        for k, n in kinds.items():
            left_out[k] = left_out.get(k, 0) + n
    for name, m in report.items():
        rates = "  ".join(f"{label} {rate_text(m[key])}" for label, key in (
            ("sens", "sensitivity"), ("spec", "specificity"), ("prec", "precision"), ("F1", "f1"),
            ("acc", "accuracy"), ("AUC", "roc_auc")))
        missed = left_out if name == "overall" else by_source.get(name, {})
        said = f"; left out, no box: {', '.join(f'{n} {k}' for k, n in sorted(missed.items()))}" if missed else ""
        typer.echo(f"{name:>10}: {rates} (n={m['n']}, pos={m['n_positive']}{said})")
    if left_out:
        typer.echo(f"left out, no box in {coco.name}: " + ", ".join(f"{n} {k}" for k, n in sorted(left_out.items()))
                   + " (not in the figures above)")


def report_cmd(
    eval_dir: Annotated[Optional[Path], typer.Argument(
        help="Folder of `cervixqc eval` outputs (*_scores.npz); may be left out with --findings.")] = None,
    manifest: Annotated[Optional[Path], typer.Option(help="The manifest the scores came from (for gallery crops).")] = None,
    coco: Annotated[Optional[Path], typer.Option(help="The boxes the crops came from.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write.")] = Path("report.html"),
    findings: Annotated[Optional[Path], typer.Option(
        help="A `cervixqc calibrate-findings` output folder: adds a section per quality finding.")] = None,
) -> None:
    """A self-contained HTML report with the paper's tables and figures, and/or the quality
    findings' evidence (--findings)."""
    from pipelines.data.coco import load_coco
    from pipelines.data.crop_set import extract_crops
    from pipelines.data.manifest import load_manifest
    from pipelines.evaluation.report import build_report, given_files_scored, load_runs

    if eval_dir is None and findings is None:
        _fail("give an eval folder, --findings, or both")
    from pipelines.commands.common import not_an_input, replaces_only_its_own

    # -o naming the manifest, the box file or an eval's own file wrote the HTML over it (an audit)
    not_an_input("-o", out, manifest, coco, *(sorted(eval_dir.glob("*")) if eval_dir and eval_dir.is_dir() else []),
                 *(sorted(findings.glob("*")) if findings and findings.is_dir() else []))
    require_writable("-o", out, file=True)  # checked first: it failed after the whole report was built
    replaces_only_its_own("-o", out, (b"<!doctype html>",), "a report of this command (HTML)")
    if findings is not None:
        lacking = [f for f in ("findings.json", "findings_scores.csv", "findings_thumbs.npz")
                   if not (findings / f).is_file()]
        if lacking:
            _fail(f"{findings}: no {', '.join(lacking)} (run `cervixqc calibrate-findings` first)")
    if eval_dir is not None and (manifest is None or coco is None):
        _fail("an eval folder needs --manifest and --coco (for the gallery crops)")
    try:  # files named with what is wrong in them, not tracebacks (ValidationError is a ValueError)
        runs = load_runs(eval_dir) if eval_dir is not None else []
        thumbs: dict = {}
        if eval_dir is not None:
            given_files_scored(runs, manifest, coco)
            wanted = set().union(*(set(r["paths"].tolist()) for r in runs)) if runs else set()
            df = load_manifest(manifest)
            # another set's manifest drew blank tiles, and other photos under the scores of the
            # ones it shared a name with, exit 0 (an audit)
            strangers = sorted(wanted - set(df["path"]))
            if strangers:
                raise ValueError(f"--manifest {manifest}: {len(strangers)} of the {len(wanted)} photos the eval scored "
                                 f"are not its rows (e.g. {', '.join(strangers[:3])}): pass the manifest `cervixqc "
                                 "eval` was given")
            crops = extract_crops(df[df["path"].isin(wanted)], load_coco(coco).boxes_by_file(), 96,
                                  allow_unboxed=True, boxes_root=coco.parent)
            thumbs = {p: crops.images[i].permute(1, 2, 0).numpy() for i, p in enumerate(crops.paths)}
        typer.echo(f"wrote {build_report(eval_dir, thumbs, out, findings_dir=findings, made=run_record())}")
    except (ValueError, OSError) as e:  # CocoError and pydantic's ValidationError are ValueErrors
        _fail(str(e))

