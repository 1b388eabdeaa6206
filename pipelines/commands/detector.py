"""Detector commands: train-detector, eval-detector, detect, bench-detector."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.commands.common import _csv, _fail, rate_text, training_output
from pipelines.outputs import write_json


def train_detector_cmd(
    train_coco: Annotated[Path, typer.Argument(help="Training COCO JSON (images relative to its folder).")],
    val_coco: Annotated[Path, typer.Argument(help="Validation COCO JSON.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: checkpoint, log, detector.safetensors/.json.")],
    arch: Annotated[str, typer.Option(help="retinanet | fasterrcnn | fcos")] = "retinanet",
    backbone: Annotated[str, typer.Option(help="resnet50 | resnet34 | resnet18 | mobilenet_v3_large")] = "resnet50",
    size: Annotated[int, typer.Option(min=32, help="Input size: the long side is resized to this.")] = 512,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs (a resume may raise it).")] = 12,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    lr: Annotated[float, typer.Option(min=0.0, help="Learning rate.")] = 2e-4,
    workers: Annotated[int, typer.Option(help="Data-loading processes (0: in this one; at most 4 per core).")] = 2,
    seed: Annotated[int, typer.Option(min=0, help="Random seed (same seed, same result).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's checkpoint.")] = False,
    extra_coco: Annotated[Optional[Path], typer.Option(help="Extra (synthetic) COCO set to mix in.")] = None,
    extra_ratio: Annotated[float, typer.Option(min=0.0, help="Extra samples per real sample each epoch "
                                                             "(needs --extra-coco, and it needs this > 0).")] = 0.0,
    backbone_weights: Annotated[Optional[Path], typer.Option(help="Local backbone state dict.")] = None,
    init_from: Annotated[Optional[Path], typer.Option(
        help="A detector card of ours to start from (same architecture; its --size may differ), e.g. one "
             "trained on synthetic data.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Cap steps per epoch (smoke runs).")] = None,
    warmup: Annotated[int, typer.Option(min=0, help="Warm-up iterations.")] = 100,
    fpn_channels: Annotated[Optional[int], typer.Option(
        help="FPN and RetinaNet head width (torchvision: 256; at 128 the head does a quarter of the arithmetic, "
             "and the bundled detector ran 1.8x faster in OpenVINO). Default: --init-from's card's width, else "
             "256. With --init-from a card of another width, only its backbone body is loaded.")] = None,
    permute_channels: Annotated[bool, typer.Option(
        help="Let the photometric jitter swap colour channels too (torchvision's RandomPhotometricDistort, "
             "about 2 of 3 photos); --no-permute-channels keeps each photo's colours in order.")] = True,
    quarter_turns: Annotated[bool, typer.Option(
        help="Turn half the training photos by 90 degrees as well as flipping them, so a photo stored "
             "sideways without an EXIF tag looks like one seen in training.")] = False,
) -> None:
    """Train a detector on COCO boxes; keeps the best epoch by validation mAP@[.5:.95].
    Multi-GPU: torchrun --nproc_per_node N -m pipelines.cli train-detector ... (each rank exits
    at the end of training; rank 0 logs the exported card instead of the lines below)."""
    from models.detector import DetectorConfig
    from pipelines.commands.common import number_in, processes_in
    from pipelines.training.detector import DetectorTrainConfig, train_detector

    number_in("--lr", lr, 0.0, 10.0, above=True)  # 1e300 overflowed in torch: a 121-line traceback (an audit)
    number_in("--extra-ratio", extra_ratio, 0.0)
    processes_in("--workers", workers, 0)
    training_output(out, "detector.json", resume)
    if (extra_coco is None) != (extra_ratio == 0):  # either alone trained without the extra set, unsaid
        _fail("--extra-ratio without --extra-coco mixes in nothing" if extra_coco is None else
              "--extra-coco needs --extra-ratio > 0 (extra samples per real one each epoch): at 0 none is drawn")
    if fpn_channels is None:  # the card's: at 256, the README's site command kept only the bundled
        # 128-wide detector's backbone, and 2 epochs read mAP 0.000 against 0.963 (an audit)
        fpn_channels = _card_width(init_from) if init_from is not None else 256
    try:
        model = DetectorConfig(arch=arch, backbone=backbone, min_size=size, max_size=size,
                               pretrained_backbone=backbone_weights is not None, fpn_channels=fpn_channels)
    except ValueError as e:
        _fail(str(e))
    cfg = DetectorTrainConfig(train_coco=train_coco, val_coco=val_coco, out_dir=out, model=model, epochs=epochs,
                              batch_size=batch_size, lr=lr, workers=workers, seed=seed, resume=resume,
                              extra_coco=extra_coco, extra_ratio=extra_ratio, backbone_weights=backbone_weights,
                              init_from=init_from,
                              max_steps_per_epoch=max_steps, warmup_iters=warmup, permute_channels=permute_channels,
                              quarter_turns=quarter_turns)
    try:
        result, card = train_detector(cfg)
    except ValueError as e:
        _fail(str(e))
    if card is not None:
        typer.echo(f"best epoch {result.best_epoch + 1}: {json.dumps(result.best_metrics)}")
        typer.echo(f"exported {card}")


def _card_width(card: Path) -> int:
    """The FPN width of a detector card (256 for cards from before the width was a setting), or
    one `error:` line naming the card."""
    from models.io import UnreadableCard, load_card

    try:
        return int(load_card(card).config.get("fpn_channels", 256))
    except (UnreadableCard, OSError, ValueError, TypeError) as e:
        _fail(f"--init-from {card}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def _detector(card: Path, device: str):
    """The card's detector, or one `error:` line with exit 2 (weights that cannot be read are a
    refusal, before any photo is read)."""
    from models.io import WeightsIntegrityError
    from pipelines.engine.detector import load_detector

    try:
        return load_detector(card, device)
    except WeightsIntegrityError as e:
        _fail(str(e))


def eval_detector_cmd(
    card: Annotated[Path, typer.Argument(help="The detector's model card (detector.json).")],
    coco: Annotated[Path, typer.Argument(help="COCO JSON to evaluate on.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for metrics JSON and gallery PNG.")],
    manifest: Annotated[Optional[Path], typer.Option(
        help="Manifest with sources, for per-source metrics; every image of the box file must be one of its "
             "rows.")] = None,
    device: Annotated[str, typer.Option(help="auto (cuda when present), cpu, cuda or cuda:N.")] = "cpu",
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
) -> None:
    """COCO mAP@[.5:.95], AP50/75, AP by size, per-class AP, top-1 recall@0.5, and a gallery."""
    from pipelines.commands.common import device_or_fail, first_file, require_writable
    from pipelines.data.coco import CocoError, load_coco, missing_images
    from pipelines.data.detection import CocoDetection
    from pipelines.data.manifest import ManifestError, load_manifest
    from pipelines.data.presets import detection_eval
    from pipelines.evaluation.detector_report import evaluate_detector, image_sources

    device = device_or_fail(device)
    foreign = first_file(out, "*.safetensors")
    if foreign:  # figures and a gallery written into a weights folder, exit 0 (an audit); eval-pipeline refused
        _fail(f"--out {out} holds {foreign} (a weights folder): write the figures into another folder")
    # every input checked before the model runs: a bad box file, a size mismatch, a missing
    # photo or a manifest with a BOM were tracebacks, some after the whole inference (an audit)
    try:
        boxes = load_coco(coco)
        if not boxes.images:  # "cannot write empty image", exit 1, after writing a report of nulls (an audit)
            raise ValueError(f"{coco}: the box file lists no images: nothing to evaluate")
        sources = None
        if manifest is not None:
            sources = image_sources(boxes, coco.parent, load_manifest(manifest, check_files=False))
        missing = missing_images(boxes, coco.parent)
        if missing:
            raise ValueError(f"{coco}: {len(missing)} of its images are no file under {coco.parent} (names are "
                             f"taken from the box file's folder), e.g. {missing[:3]}")
        model, mcard = _detector(card, device)
        ds = CocoDetection(boxes, coco.parent, detection_eval(), 2 * mcard.config["max_size"], mcard.classes)
    except (CocoError, ManifestError, ValueError) as e:
        _fail(str(e))
    record = _eval_record(mcard, coco, manifest)
    _say_if_trained_on(mcard, record["boxes_sha256"], coco)
    _refuse_other_eval(out / EVAL_RECORD, record)
    require_writable("--out", out, keep=False)
    try:
        report = evaluate_detector(model, mcard, ds, out, device, batch_size, sources=sources)
    except ValueError as e:  # a photo that does not decode: found only by reading it
        _fail(str(e), code=1)
    write_json(out / EVAL_RECORD, record)

    for name, m in report.items():
        typer.echo(f"{name:>14}: mAP {rate_text(m['map'])}  AP50 {rate_text(m['ap50'])}  AP75 {rate_text(m['ap75'])}  "
                   f"top-1 recall@0.5 {rate_text(m['top1_recall50'])}  cervix found {rate_text(m['cervix_found'])} "
                   f"(n={m['n_cervix']})  no_cervix called {rate_text(m['no_cervix_called'])} (n={m['n_no_cervix']})")
    typer.echo(f"wrote {out / 'detector_metrics.json'} and {out / 'detector_gallery.png'}")


def _say_if_trained_on(mcard, boxes_sha256: str, coco: Path) -> None:
    """Said before any figure: the box file is one the detector trained on, or chose its epoch
    and score threshold on (its card's `data.*_coco_sha256`); such figures were printed as
    plainly as a test file's (an audit). Cards from before the record cannot tell."""
    roles = {"train_coco_sha256": "trained on", "extra_coco_sha256": "trained on (its extra set)",
             "val_coco_sha256": "chose its epoch and score threshold on"}
    said = [what for key, what in roles.items() if mcard.data.get(key) == boxes_sha256]
    if said:
        typer.echo(f"warning: {coco} is the box file this detector {said[0]}: these figures are optimistic, not "
                   "held-out ones; judge it on a split it did not see", err=True)


# what an eval-detector's figures are of, beside them (detector_metrics.json holds rows alone)
EVAL_RECORD = "detector_eval.json"


def _eval_record(mcard, coco: Path, manifest: Path | None) -> dict:
    """The detector and the files its figures were measured on, by sha256: a report named no
    weights, box file or manifest, and could not be traced (an audit)."""
    from models.io import sha256_file
    from pipelines.commands.common import run_record

    return {"detector_sha256": mcard.sha256, "score_threshold": mcard.thresholds.get("score"),
            "boxes": str(coco.resolve()), "boxes_sha256": sha256_file(coco),
            "manifest": None if manifest is None else str(manifest.resolve()),
            "manifest_sha256": None if manifest is None else sha256_file(manifest)} | run_record()


def _refuse_other_eval(path: Path, record: dict) -> None:
    """Figures of another detector, threshold or box file are not replaced: a validation run
    into a test run's folder replaced it, exit 0 (an audit). A rerun of the same replaces them."""
    from pipelines.outputs import changed_since

    changed = changed_since(path, {k: record[k] for k in ("detector_sha256", "score_threshold", "boxes_sha256")})
    if changed is None:
        _fail(f"--out {path.parent} holds a {path.name} that cannot be read as an eval-detector's: write into another "
              "folder")
    if changed:
        what = ", ".join(k.removesuffix("_sha256") for k in changed)
        _fail(f"--out {path.parent} holds the figures of another {what} ({json.loads(path.read_text()).get('boxes')}): "
              "write into another folder to keep both, or delete it")


def detect_cmd(
    card: Annotated[Path, typer.Argument(help="The detector's model card.")],
    manifest: Annotated[Path, typer.Argument(help="Manifest whose images to run on.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="COCO JSON of the top box per image; its file names "
                                      "are the manifest's paths taken from the folder it is written in.")],
    device: Annotated[str, typer.Option(help="auto (cuda when present), cpu, cuda or cuda:N.")] = "cpu",
    min_score: Annotated[Optional[float], typer.Option(min=0.0, max=1.0,
                                                       help="Default: the card's threshold.")] = None,
) -> None:
    """Detector boxes as COCO, for training and evaluating stage 2 on detector crops."""
    from pipelines.commands.common import _manifest, box_file_output, device_or_fail, not_an_input, require_writable
    from pipelines.data.coco import save_coco
    from pipelines.data.manifest import rebased
    from pipelines.engine.detector import DETECTED, detect_to_coco

    device = device_or_fail(device)
    not_an_input("--out", out, manifest, card)  # the manifest was replaced by the boxes, exit 0 (an audit)
    require_writable("--out", out, file=True)
    stamp = box_file_output("--out", out, "detect", legacy_prefix=DETECTED)
    df = _manifest(manifest)
    model, mcard = _detector(card, device)
    # named from the box file's folder, as every reader takes them: `-o` elsewhere wrote the
    # manifest's own relative paths, which named no file from there (an audit)
    names = list(rebased(df, out)["path"])
    ds, unreadable = detect_to_coco(model, mcard, [Path(p) for p in df["abspath"]], names, device, min_score=min_score)
    if unreadable:
        typer.echo(f"{len(unreadable)} photos could not be read and are left out of the box file (first: "
                   f"{', '.join(unreadable[:3])})", err=True)
    if not ds.images:
        _fail(f"not one of the {len(df)} photos could be read; nothing written", code=1)
    ds.info["written_by"] = stamp
    save_coco(ds, out)
    typer.echo(f"wrote {out}: {len(ds.annotations)} boxes on {len(ds.images)} images")


def bench_detector_cmd(
    coco: Annotated[Path, typer.Argument(help="COCO JSON whose images to use.")],
    arch: Annotated[str, typer.Option(help="retinanet, fasterrcnn or fcos.")] = "retinanet",
    backbone: Annotated[str, typer.Option(help="resnet50, resnet34, resnet18 or mobilenet_v3_large.")] = "resnet50",
    size: Annotated[int, typer.Option(min=32, help="Input size (short and long side).")] = 512,
    n_images: Annotated[int, typer.Option(min=1, help="Images per timed round.")] = 32,
    batch_sizes: Annotated[str, typer.Option(help="Inference batch sizes, comma-separated.")] = "1,16",
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the figures as JSON too.")] = None,
) -> None:
    """Detector inference images/s per batch size and training images/s, side by side."""
    from models.detector import DetectorConfig
    from pipelines.commands.common import device_or_fail, replaces_only_its_own, require_writable
    from pipelines.data.coco import CocoError, load_coco
    from pipelines.evaluation.detector_bench import bench_detector

    # each of these was a traceback, the output's only after the whole benchmark (an audit)
    sizes = _csv(batch_sizes)
    if not sizes or not all(b.isdigit() and int(b) > 0 for b in sizes):
        _fail(f"--batch-sizes must be positive integers, comma-separated, not {batch_sizes!r}")
    device = device_or_fail(device)
    if out is not None:
        require_writable("--out", out, file=True, keep=False)
        replaces_only_its_own("--out", out, (b"{",), "a JSON result of this command")
    try:
        cfg = DetectorConfig(arch=arch, backbone=backbone, min_size=size, max_size=size)
        load_coco(coco)
    except (ValueError, CocoError, OSError) as e:
        _fail(str(e))
    result = bench_detector(cfg, coco, n_images, [int(b) for b in sizes], device=device)
    typer.echo(json.dumps(result, indent=2))
    if out is not None:
        write_json(out, result)

