"""Engine commands: predict, clean, bench."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.commands.common import _fail


POLICIES = ("deep_sad", "resnest", "either", "both")  # pipelines.qc.Policy (not imported: it pulls in torch)
DECODERS = ("pil", "torchvision")  # pipelines.qc.JpegDecoder
DecoderOption = Annotated[str, typer.Option(help="JPEG decoder: pil (DCT-scaled, best on CPU) or torchvision "
                                                 "(decode_jpeg on the device: nvJPEG on cuda).")]


def _check_policy(policy: Optional[str]) -> None:
    if policy is not None and policy not in POLICIES:
        _fail(f"unknown policy {policy!r}: one of {', '.join(POLICIES)}")


def _check_decoder(jpeg_decoder: str) -> None:
    if jpeg_decoder not in DECODERS:
        _fail(f"--jpeg-decoder must be pil or torchvision, not {jpeg_decoder!r}")


def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    weights: Annotated[Path, typer.Option(help="Folder with detector/deep_sad/classifier .json + .safetensors.")] = Path("weights"),
    policy: Annotated[Optional[str], typer.Option(help="deep_sad | resnest | either | both (default: the "
                                                  "stage-2 model with the better validation F1)")] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    jpeg_decoder: DecoderOption = "pil",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record per line.")] = False,
) -> None:
    """Label images regular / non_regular (green, iodine) / no_cervix / unreadable."""
    from pipelines.qc import QCConfig, QCPipeline

    _check_policy(policy)
    _check_decoder(jpeg_decoder)
    if not (weights / "detector.json").is_file():
        _fail(f"no weights in {weights}: expected detector.json, deep_sad.json and classifier.json")
    qc = QCPipeline(weights, QCConfig(device=device, policy=policy, jpeg_decoder=jpeg_decoder))  # type: ignore[arg-type]
    results = qc.run(images, names=[str(p) for p in images])
    for r in results:
        if as_json:
            typer.echo(r.model_dump_json(exclude={"timings_ms"}))
        else:
            extra = r.kind or r.error or ""
            typer.echo(f"{r.label.value:>12}  {extra:<28} {r.path}")


def clean(
    src: Annotated[Path, typer.Argument(help="Folder (recursive) or manifest CSV/Parquet.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Results folder (results.csv/.parquet, state).")],
    quarantine: Annotated[Optional[Path], typer.Option(help="Folder for links/copies of flagged files.")] = None,
    weights: Annotated[Path, typer.Option()] = Path("weights"),
    policy: Annotated[Optional[str], typer.Option(help="deep_sad | resnest | either | both (default: the "
                                                  "stage-2 model with the better validation F1)")] = None,
    batch_size: Annotated[int, typer.Option()] = 16,
    device: Annotated[str, typer.Option(help="Local engine's device (Ray actors take a GPU where the "
                                                "cluster has one).")] = "cpu",
    jpeg_decoder: DecoderOption = "pil",
    engine: Annotated[str, typer.Option(help="local | ray")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: a local Ray).")] = None,
    actors: Annotated[int, typer.Option(help="Ray actors (model replicas).")] = 1,
) -> None:
    """Clean a collection: one result row per file; originals untouched; resumable."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from pipelines.clean import clean as run_clean
    from pipelines.qc import QCConfig, QCPipeline

    _check_policy(policy)
    _check_decoder(jpeg_decoder)
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

            summary = clean_ray(weights, src, out, quarantine, policy, batch_size, actors, address, report,
                                jpeg_decoder=jpeg_decoder)
        else:
            qc = QCPipeline(weights, QCConfig(device=device, policy=policy,
                                              jpeg_decoder=jpeg_decoder))  # type: ignore[arg-type]
            summary = run_clean(qc, src, out, quarantine, batch_size, progress=report)
    typer.echo(f"{summary.total} files: {summary.processed_now} processed now, {summary.skipped_done} already done; "
               + ", ".join(f"{k} {v}" for k, v in sorted(summary.by_label.items())))
    typer.echo(f"results: {summary.results_csv} and {summary.results_parquet}")


def bench(
    images: Annotated[Optional[Path], typer.Option(help="Folder of test images (default: synthesise).")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Weights folder (default: untrained, default sizes).")] = None,
    n_images: Annotated[int, typer.Option(help="Images to synthesise (1-12 MP mix).")] = 24,
    batch_size: Annotated[int, typer.Option()] = 16,
    out: Annotated[Optional[Path], typer.Option(help="Write the figures as JSON too.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda; both modes run on it.")] = "cpu",
    jpeg_decoder: DecoderOption = "pil",
    detector_batches: Annotated[Optional[str], typer.Option(
        help="Also time the batched engine at these detector batch sizes, side by side (e.g. 1,4,8).")] = None,
) -> None:
    """Naive per-image loop vs the batched engine, same models, files and device, one run."""
    import tempfile

    _check_decoder(jpeg_decoder)
    parts = [s.strip() for s in (detector_batches or "").split(",") if s.strip()]
    if not all(s.isdigit() and int(s) > 0 for s in parts):
        _fail(f"--detector-batches must be positive integers, comma-separated, not {detector_batches!r}")
    sizes = [int(s) for s in parts]

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
    result = run_bench(weights, paths, batch_size, device, jpeg_decoder)  # type: ignore[arg-type]
    if sizes:
        from pipelines.evaluation.engine_bench import detector_batch_ab

        result["detector_batch"] = detector_batch_ab(weights, paths, sizes, batch_size, device)
    typer.echo(json.dumps(result, indent=2))
    if out is not None:
        out.write_text(json.dumps(result, indent=2))
