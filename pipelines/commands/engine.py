"""Engine commands: predict, clean, bench, export."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.commands.common import (_fail, _manifest, device_or_fail, replaces_only_its_own, require_writable,
                                       weights_missing)
from pipelines.engine.qc_result import COLOUR_CARD, POLICIES, Label, policies_for
from pipelines.outputs import write_json

DECODERS = ("auto", "pil", "torchvision")  # pipelines.engine.config.JpegDecoder
RUNTIMES = ("auto", "torch", "openvino")  # pipelines.engine.config.Runtime
PRECISIONS = ("auto", "f32", "bf16")  # pipelines.engine.openvino_runtime.Precision
RuntimeOption = Annotated[str, typer.Option(
    help="auto: on a CPU, when the weights folder carries an export (cervixqc export), every model on "
         "OpenVINO (missing exports converted once and cached), else torch; openvino: the same, "
         "exports or not (CPU only); torch.")]
PrecisionOption = Annotated[str, typer.Option(
    help="OpenVINO precision: auto (bf16 where the CPU runs it natively), f32 (labels as torch's), bf16.")]
PolicyOption = Annotated[Optional[str], typer.Option(
    help="deep_sad | resnest | either | both | two_of_three (the last needs colour.json; default: the "
         "cards' validation choice).")]
DeviceOption = Annotated[str, typer.Option(help="auto (cuda when present, else cpu), cpu or cuda.")]
DecoderOption = Annotated[str, typer.Option(help="JPEG decoder: auto (torchvision on cuda, else pil), pil "
                                                 "(DCT-scaled, best on CPU) or torchvision (decode_jpeg on the "
                                                 "device: nvJPEG on cuda).")]


def _check_policy(policy: Optional[str], weights: Path | None = None) -> None:
    if policy is not None and policy not in POLICIES:
        _fail(f"unknown policy {policy!r}: one of {', '.join(POLICIES)}")
    if policy is not None and weights is not None and policy not in policies_for(weights):
        _fail(f"policy {policy!r} needs a crop-colour model: {weights} has no {COLOUR_CARD} (cervixqc train-colour)")


def _check_decoder(jpeg_decoder: str) -> None:
    if jpeg_decoder not in DECODERS:
        _fail(f"--jpeg-decoder must be auto, pil or torchvision, not {jpeg_decoder!r}")


def _check_runtime(runtime: str, precision: str) -> None:
    if runtime not in RUNTIMES:
        _fail(f"--runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if precision not in PRECISIONS:
        _fail(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if runtime == "torch" and precision != "auto":  # taken and ignored without a word (an audit)
        typer.echo(f"warning: --precision {precision} is OpenVINO's; --runtime torch runs the models at torch's own "
                   "precision (f32 on the CPU, bf16 autocast on CUDA)", err=True)


def _weights_folder(weights: Path) -> None:
    if problem := weights_missing(weights):
        _fail(f"--weights: {problem}")


def _checked_weights(weights: Path, exports: bool) -> None:
    """The folder checked as the service checks it before it starts, `exports` (OpenVINO)
    included, without building a model: for commands whose engines start elsewhere (Ray's
    actors, bench's child processes), where a bad file was a traceback per process."""
    from models.io import WeightsIntegrityError
    from pipelines.engine.weights_folder import check_weights

    _weights_folder(weights)
    try:
        check_weights(weights, exports=exports)
    except (WeightsIntegrityError, ValueError) as e:
        _fail(str(e))


def _engine(weights: Path, **config):
    """The engine, with a clear exit instead of a traceback for weights it cannot run."""
    from models.io import WeightsIntegrityError
    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline

    _weights_folder(weights)
    try:
        return QCPipeline(weights, QCConfig(**config))
    except (ValueError, WeightsIntegrityError) as e:
        _fail(str(e))


def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    weights: Annotated[Path, typer.Option(help="Folder with detector/deep_sad/classifier .json + .safetensors.")] = Path("weights"),
    policy: PolicyOption = None,
    device: DeviceOption = "auto",
    jpeg_decoder: DecoderOption = "auto",
    runtime: RuntimeOption = "auto",
    precision: PrecisionOption = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record per line.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Photos per batch; each batch is printed as it ends.")] = 16,
) -> None:
    """Label images regular / non_regular (green, iodine) / no_cervix / unreadable. Exit status 1
    when not one image could be read (a script given one photo learns that it failed), 0 when
    at least one was labelled: an unreadable photo among others is a row of the answer, as in
    `clean`."""
    _check_policy(policy)
    _check_decoder(jpeg_decoder)
    _check_runtime(runtime, precision)
    if not any(os.path.lexists(p) for p in images):  # a mistyped name: refused before the models load, exit 2
        _fail(f"{images[0]} does not exist" if len(images) == 1 else
              f"not one of the {len(images)} files given exists (the first: {images[0]})")
    qc = _engine(weights, device=device, policy=policy, jpeg_decoder=jpeg_decoder, runtime=runtime, precision=precision)
    # batch by batch: `predict *.jpg` over thousands of photos held them all decoded at once
    # (about 2.7 MB each) and printed nothing until the last; folders go to `cervixqc clean`
    from pipelines.data.schema import row_key

    # a name that is not UTF-8 spelt as `clean` spells it (`\xNN`): --json crashed on it
    batches = ((images[i:i + batch_size], [row_key(str(p)) for p in images[i:i + batch_size]])
               for i in range(0, len(images), batch_size))
    unreadable = 0
    for r in (r for results in qc.run_stream(batches) for r in results):
        unreadable += r.label == Label.UNREADABLE
        if as_json:
            typer.echo(r.model_dump_json(exclude={"timings_ms"}))
        else:
            extra = r.kind or r.error or ""
            typer.echo(f"{r.label.value:>12}  {extra:<28} {_shown(r.path)}")
    if unreadable:
        typer.echo(f"{unreadable} of {len(images)} images could not be read", err=True)
    if images and unreadable == len(images):
        raise typer.Exit(1)


def _shown(name: str) -> str:
    """A name in predict's table with its control characters as `\\xNN`: a line feed split a
    row in two, and a carriage return wrote the name over the label on a terminal (an audit);
    --json keeps the name as it is."""
    return "".join(c if c.isprintable() or c == " " else f"\\x{ord(c):02x}" for c in name)


def clean(
    src: Annotated[Path, typer.Argument(help="Folder (recursive) or manifest CSV/Parquet.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Results folder (results.csv/.parquet, state).")],
    quarantine: Annotated[Optional[Path], typer.Option(help="Folder for links/copies of flagged files.")] = None,
    weights: Annotated[Path, typer.Option(help="Weights folder (the cards and safetensors).")] = Path("weights"),
    policy: PolicyOption = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    device: Annotated[str, typer.Option(help="auto (cuda when present, else cpu), cpu or cuda; Ray's actors "
                                                "too (they hold a GPU where the cluster has one).")] = "auto",
    jpeg_decoder: DecoderOption = "auto",
    runtime: RuntimeOption = "auto",
    precision: PrecisionOption = "auto",
    engine: Annotated[str, typer.Option(help="local | ray")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: a local Ray).")] = None,
    actors: Annotated[int, typer.Option(min=1, help="Ray actors (model replicas).")] = 1,
    quarantine_findings: Annotated[Optional[str], typer.Option(
        help="Quality findings whose flagged files also go to QUARANTINE/<finding>/ (e.g. blur,glare; "
             "the weights folder needs findings.json). The label is unchanged.")] = None,
    pixel_check: Annotated[bool, typer.Option(
        help="Look for cropped and turned copies by reading the closest photos again (about 0.4x the "
             "engine's time); off: re-encoded and resized copies only.")] = True,
) -> None:
    """Clean a collection: one result row per file; originals untouched; resumable. Duplicates
    (exact and near) are grouped over the whole collection in results.csv and duplicates.csv.
    Exit status 2 for a source without files (an unmounted share) and other refusals, 1 when
    not one file could be read as an image (the results are written), 0 otherwise."""
    _check_policy(policy, weights)  # before any Ray actor loads the weights
    _check_decoder(jpeg_decoder)
    _check_runtime(runtime, precision)
    if engine not in ("local", "ray"):
        _fail(f"unknown engine {engine!r}: local or ray")
    if engine == "local" and (address is not None or actors != 1):
        typer.echo("warning: --address and --actors are for --engine ray; ignored", err=True)
    if not src.exists():
        _fail(f"{src} does not exist")
    from pipelines.clean.inputs import list_inputs

    try:
        listed = list_inputs(src)  # a manifest's problems before any engine starts
    except ValueError as e:
        _fail(str(e))
    if not listed:  # a share not mounted: "0 files" and exit 0 read as a clean collection in a cron job
        _fail(f"{src} holds no files to clean (an unmounted share? a manifest without rows? only tables and "
              "notes, which a folder's listing skips: give a manifest itself as SRC)")
    from pipelines.commands.common import _csv
    from pipelines.engine.qc_result import check_findings

    try:
        findings = check_findings(_csv(quarantine_findings))
    except ValueError as e:
        _fail(f"--quarantine-findings: {e}")
    if findings and quarantine is None:
        _fail("--quarantine-findings needs --quarantine")
    if quarantine is not None:
        from pipelines.clean.quarantine import check_quarantine_names

        try:
            check_quarantine_names(listed)
        except ValueError as e:
            _fail(f"--quarantine: {e}")
    if findings and not (weights / "findings.json").is_file():
        _fail(f"--quarantine-findings: {weights} has no findings.json (cervixqc calibrate-findings makes one)")
    from pipelines.clean.notes import run_notes
    from pipelines.clean.ray_run import EngineFailed, RayStartError  # Ray itself is imported only by a Ray run
    from pipelines.clean.run import OutputsRefused, check_outputs
    from pipelines.clean.state import ResultsFolderError, refuse_folder_in_use

    try:
        check_outputs(src, out, quarantine)
        refuse_folder_in_use(out)
    except ValueError as e:  # ResultsFolderError is one
        _fail(str(e))
    if address is None:  # this machine's devices: --device cuda without one left an empty -o behind (an audit)
        device_or_fail(device)
    for name, folder in (("--out", out), ("--quarantine", quarantine)):
        if folder is not None:  # made when written: a refusal after this (weights, another run's) left them
            require_writable(name, folder, keep=False)
    try:
        summary = _clean_with_progress(src, out, quarantine, weights, policy, batch_size, device, jpeg_decoder, runtime,
                                       precision, engine, address, actors, findings, pixel_check, listed)
    except (ResultsFolderError, OutputsRefused) as e:  # the results folder is another run's, or another source's
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo(f"interrupted: the batches done so far are stored in {out}; run the same command to resume",
                   err=True)
        raise typer.Exit(130) from None
    except RayStartError as e:
        _fail(str(e))
    except EngineFailed as e:  # the rows stored so far are kept
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except (OSError, sqlite3.Error) as e:
        # the error's own text names the file (a patient's photo in the quarantine): only its kind here
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) if isinstance(e, sqlite3.Error) else ""
        typer.echo(f"error: stopped by a file error ({type(e).__name__}: {reason}) writing the results or the "
                   "quarantine; what was stored is kept: fix it and run the same command again to resume", err=True)
        raise typer.Exit(1) from None  # a failure during the work, not a refusal
    typer.echo(f"{summary.total} files: {summary.processed_now} processed now, {summary.skipped_done} already done; "
               + ", ".join(f"{k} {v}" for k, v in sorted(summary.by_label.items())))
    typer.echo(f"results: {summary.results_csv} and {summary.results_parquet}")
    if summary.quarantine_not_copied:
        typer.echo(f"warning: {summary.quarantine_not_copied} flagged files could not be copied into the quarantine "
                   "(another file under their names there, or a file the OS could not copy); "
                   "their rows are stored: move such files away and run the same command again to copy them",
                   err=True)
    for note in run_notes(summary.by_label):
        typer.echo(f"note: {note}", err=True)
    if src.is_file() and summary.by_label.get(Label.UNREADABLE.value, 0):
        for line in _misspelt_rows(summary.results_parquet):
            typer.echo(f"note: {line}", err=True)
    if summary.by_label.get(Label.UNREADABLE.value, 0) == summary.total:  # as predict: nothing could be read
        typer.echo(f"not one of the {summary.total} files could be read as an image", err=True)
        raise typer.Exit(1)


def _misspelt_rows(results: Path, shown: int = 3) -> list[str]:
    """A manifest's missing files that the folder holds spelt otherwise (`img_1.jpg` for
    `IMG_1.JPG`, an accent stored as other Unicode), summed up from the hints their rows carry
    (`name_spellings`): each was an unreadable row, "No such file", with no hint, where
    `validate` names the spelling (an audit of Windows sheets)."""
    import pandas as pd

    rows = pd.read_parquet(results, columns=["path", "error"])
    errors = rows["error"].fillna("")
    named = rows[errors.str.contains("No such file", regex=False) & errors.str.contains("; ", regex=False)]
    hints = [(p, "; " + e.split("; ", 1)[1]) for p, e in zip(named["path"], named["error"])]
    if not hints:
        return []
    return [f"{len(hints)} missing listed files are in the folder under another spelling, e.g. {p!r}{h}"
            for p, h in hints[:1]] + [f"... and {p!r}{h}" for p, h in hints[1:shown]]


def _clean_with_progress(src, out, quarantine, weights, policy, batch_size, device, jpeg_decoder, runtime, precision,
                         engine, address, actors, findings, pixel_check, listed):
    from pipelines.clean.run import clean as run_clean
    from pipelines.commands.common import file_progress

    qc = decision = None
    if engine == "ray":  # what the engine would refuse, said before Ray starts (tracebacks from Ray before)
        decision = _ray_preflight(weights, policy, device, address, runtime)
    else:
        qc = _engine(weights, device=device, policy=policy, jpeg_decoder=jpeg_decoder, runtime=runtime,
                     precision=precision)

    def say(note: str) -> None:  # as soon as it holds: hours before the end of a 10^6-photo run
        typer.echo(f"note, so far (the run goes on; Ctrl-C stops it, the same command resumes): {note}", err=True)

    finishing = "every file has its row; finding duplicates and writing the results files"
    with file_progress("clean", then=finishing) as report:
        if engine == "ray":
            from pipelines.clean.ray_run import clean_ray

            summary = clean_ray(weights, src, out, quarantine, policy, batch_size, actors, address, report,
                                jpeg_decoder=jpeg_decoder, quarantine_findings=findings, pixel_check=pixel_check,
                                device=device, runtime=runtime, precision=precision, inputs=listed,
                                decision=decision, on_note=say)
        else:
            summary = run_clean(qc, src, out, quarantine, batch_size, progress=report, quarantine_findings=findings,
                                pixel_check=pixel_check, inputs=listed, on_note=say)
    return summary


def _ray_preflight(weights: Path, policy: Optional[str], device: str, address: Optional[str],
                   runtime: str = "auto") -> dict:
    """The run's decision (policy and models' sha256s: the weights hashed once), or one
    `error:` line for what Ray's actors would fail on: the folder checked as the service checks
    it, exports included (a damaged OpenVINO export killed every actor, 384 lines of tracebacks:
    an audit)."""
    from models.io import WeightsIntegrityError
    from pipelines.engine.weights_folder import decision_for

    try:
        import ray  # noqa: F401
    except ImportError:
        _fail("--engine ray needs Ray: install cervixqc with its ray extra (make test installs every extra)")
    _checked_weights(weights, exports=runtime != "torch")
    try:
        decision = decision_for(weights, policy)
    except (WeightsIntegrityError, ValueError) as e:
        _fail(str(e))
    if address is None:  # a local Ray has this machine's devices: cuda without one failed every actor
        device_or_fail(device)
    return decision


def bench(
    images: Annotated[Optional[Path], typer.Option(help="Folder of test images (default: synthesise).")] = None,
    mix_from: Annotated[Optional[Path], typer.Option(
        help="Build the bench set from this folder of real photos, one subfolder per source: 90 photos of each "
             "as they are + 10 others re-encoded at phone sizes (1.9-12 MP).")] = None,
    keep_mix: Annotated[Optional[Path], typer.Option(
        help="Build the --mix-from set in this folder and keep it (the other benchmarks, e.g. "
             "tests.benchmarks.findings_cost, read it; without it the set goes with the run).")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Weights folder (default: untrained, default sizes).")] = None,
    n_images: Annotated[int, typer.Option(min=1, help="Images to synthesise (the clinic preset: 0.3-12 MP).")] = 24,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the figures as JSON too.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The figures as JSON on stdout (the summary lines go to "
                                                         "stderr then).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda; every mode runs on it (OpenVINO modes on cpu only).")] = "auto",
    jpeg_decoder: DecoderOption = "auto",
    modes: Annotated[Optional[str], typer.Option(
        help="Batched modes, comma-separated, each RUNTIME[:PRECISION][+ahead] (e.g. torch,openvino:f32,openvino+ahead); "
             "the first is the reference for labels. Default: torch, torch+ahead, auto:f32, auto, auto+ahead.")] = None,
    detector_batches: Annotated[Optional[str], typer.Option(
        help="Also time the batched engine at these detector batch sizes, side by side (e.g. 1,4,8).")] = None,
    naive_images: Annotated[Optional[int], typer.Option(
        min=1, help="Time the naive loop on this many of the photos, spread through the set (default: all); "
                    "for long runs, where the naive loop would take most of the time.")] = None,
    decode_threads: Annotated[Optional[int], typer.Option(
        min=1, help="The batched engine's decode threads (reading, header checks, PIL decode; default: the "
                    "engine's).")] = None,
) -> None:
    """Naive per-image loop vs the batched engine (torch, then OpenVINO at f32 and at its own
    precision), same models, files and device, one run; labels compared with torch's."""
    import tempfile

    _check_decoder(jpeg_decoder)
    device = device_or_fail(device)
    parts = [s.strip() for s in (detector_batches or "").split(",") if s.strip()]
    if not all(s.isdigit() and int(s) > 0 for s in parts):
        _fail(f"--detector-batches must be positive integers, comma-separated, not {detector_batches!r}")
    sizes = [int(s) for s in parts]

    from pipelines.evaluation.engine_bench import BATCHED_MODES, parse_mode

    try:
        chosen = tuple(parse_mode(m) for m in modes.split(",")) if modes else BATCHED_MODES
    except ValueError as e:
        _fail(str(e))

    if images is not None and not images.is_dir():
        _fail(f"--images {images}: not a folder")
    if weights is not None:  # each mode's child process failed on them, a traceback after the modes before it
        _checked_weights(weights, exports=any(runtime != "torch" for runtime, _, _ in chosen))
    if out is not None:
        require_writable("--out", out, file=True, keep=False)  # before the benchmark's minutes
        replaces_only_its_own("--out", out, (b"{",), "a JSON result of this command")
    if keep_mix is not None and mix_from is None:
        _fail("--keep-mix keeps the set --mix-from builds: give --mix-from too")
    work = Path(tempfile.mkdtemp(prefix="cervixqc-bench-"))
    try:  # the synthesised photos and weights go with the run (43 MB a run were left in /tmp)
        result = _bench_in(work, images, mix_from, keep_mix, weights, n_images, batch_size, device, jpeg_decoder,
                           chosen, sizes, naive_images, decode_threads)
    except typer.Exit:  # a RuntimeError too, in click
        raise
    except RuntimeError as e:  # a mode's process failed: which, and its error's last line, not a traceback
        lines = str(e).strip().splitlines() or [repr(e)]
        typer.echo(f"error: {lines[0].rstrip(':')}" + (f": {lines[-1]}" if len(lines) > 1 else ""), err=True)
        raise typer.Exit(1) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    naive = result["naive"]

    def memory(run: dict) -> str:
        gpu = f", GPU {run['peak_gpu_reserved_mb']:.0f} MB reserved" if "peak_gpu_reserved_mb" in run else ""
        return f"peak RSS {run['peak_rss_mb']:.0f} MB{gpu}"

    if as_json:  # alone on stdout, for jq and scripts
        typer.echo(json.dumps(result, indent=2))
    shown = result["batched"][0]["images"] if result["batched"] else naive["images"]
    subset = f" (on {naive['images']} of the {shown} photos)" if naive["images"] < shown else ""
    typer.echo(f"naive: {naive['images_per_s']:.1f} images/s{subset}, {memory(naive)}", err=as_json)
    for run in result["batched"]:
        split = ", ".join(f"{k} {v:.2f}s" for k, v in run["stage_seconds"].items())
        typer.echo(f"{run['mode']}: {run['images_per_s']:.1f} images/s = {run['speedup_vs_naive']:.2f}x naive; "
                   f"{memory(run)}; labels differing from torch "
                   f"{run['labels_differing_from_first_batched']['count']}, findings flags "
                   f"{run['findings_differing_from_first_batched']['count']}; {split}", err=as_json)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, result)


def export(
    weights: Annotated[Path, typer.Option(help="Weights folder with the cards and safetensors.")] = Path("weights"),
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where the exported files go (default: the "
                                                                   "weights folder, where the engine looks for "
                                                                   "them).")] = None,
    models: Annotated[str, typer.Option(help="Comma-separated: detector, deep_sad, classifier.")] = "detector,deep_sad",
    fp16_weights: Annotated[bool, typer.Option(help="Store weights as float16 (half the file; computed at the "
                                                    "runtime's precision).")] = True,
    int8_calibration: Annotated[Optional[Path], typer.Option(
        help="Quantize the detector to INT8, calibrated on these photos: a folder, or a manifest (only its train "
             "rows when it has a split column). The engine runs it at --precision auto only.")] = None,
    int8_photos: Annotated[int, typer.Option(min=1, help="Calibration photos drawn (seeded) from "
                                                        "--int8-calibration.")] = 160,
) -> None:
    """Export models to OpenVINO IR with a card each (source sha256, file sha256s, parity to
    torch). The default leaves the classifier out: its 51 MB would break the weights budget,
    and the engine converts it at its first load instead (cached; see `openvino_runtime.converted`)."""
    from models.io import WeightsIntegrityError, load_card
    from pipelines.commands.common import command_line
    from pipelines.engine import openvino_runtime

    names = [m.strip() for m in models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(openvino_runtime.EXPORTABLE))
    if unknown or not names:
        _fail(f"--models must name some of {', '.join(openvino_runtime.EXPORTABLE)}, not {models!r}")
    missing = [n for n in names if not (weights / f"{n}.json").is_file()]
    if missing:  # "no detector.json, deep_sad.json in weights", run from another folder (an audit)
        _fail(f"no {', '.join(f'{n}.json' for n in missing)} in {weights.resolve()}: name the weights folder with "
              "--weights")
    if not openvino_runtime.available():
        _fail("export needs the openvino package (pip install openvino)")
    from pipelines.engine.detector import load_detector
    from pipelines.engine.stage2 import load_stage2
    from pipelines.engine.loading import loading

    if int8_calibration is not None and "detector" not in names:
        _fail("--int8-calibration quantizes the detector: add it to --models")
    loaded = {}
    for name in names:  # every one before any is written: a damaged second model left the first exported, exit 2
        try:  # as the engine loads them: a card its builder cannot take is named, not a traceback
            with loading(weights / f"{name}.json"):
                loaded[name] = (load_detector if name == "detector" else load_stage2)(weights / f"{name}.json")
        except WeightsIntegrityError as e:
            _fail(str(e))
    target = out or weights
    # a folder holding other weights of these names: its exports replaced by ones it then refused
    # to run ("exported from other weights"), exit 0 (an audit)
    for name, (_, card) in loaded.items():
        there = target / f"{name}.json"
        if target.resolve() != weights.resolve() and there.is_file():
            try:
                theirs = load_card(there).sha256
            except WeightsIntegrityError:
                theirs = None
            if theirs != card.sha256:
                _fail(f"--out {target} holds another {name} model ({there.name}); its exports would be replaced by "
                      f"ones of {weights}'s, which it refuses to run: export into {weights}, a copy of it, or a "
                      "folder without weights")
    # before the calibration's minutes; made when written: a refusal of the calibration left it empty (an audit)
    require_writable("--out", target, keep=False)
    quantize, quantization = (_int8_detector(weights, int8_calibration, int8_photos) if int8_calibration is not None
                              else (None, ""))
    target.mkdir(parents=True, exist_ok=True)
    command = command_line()
    for name, (model, card) in loaded.items():
        q = name == "detector" and quantize is not None
        exported = openvino_runtime.export(name, model, card, target, weights / f"{name}.json",
                                           compress_to_fp16=fp16_weights, command=command,
                                           quantize=quantize if q else None, quantization=quantization if q else "")
        worst = max(exported.parity.values())
        typer.echo(f"{name}: {target / exported.xml} (+ .bin, card {openvino_runtime.card_path(target, name).name}); "
                   f"{'INT8, ' if q else ''}max |openvino f32 - torch| {worst:.2e}")


def _bench_in(work: Path, images: Path | None, mix_from: Path | None, keep_mix: Path | None, weights: Path | None,
              n_images: int, batch_size: int, device: str, jpeg_decoder: str, chosen: tuple, sizes: list[int],
              naive_images: int | None = None, decode_threads: int | None = None) -> dict:
    """`bench`'s run, its generated photos and weights under `work`."""
    from pipelines.clean.inputs import list_inputs
    from pipelines.evaluation.engine_bench import bench as run_bench
    from pipelines.evaluation.engine_bench import usable

    if mix_from is not None:
        from pipelines.evaluation.engine_bench import real_mix

        if not mix_from.is_dir():
            _fail(f"--mix-from {mix_from}: not a folder")
        if keep_mix is not None and keep_mix.exists() and not keep_mix.is_dir():  # exit 1, "File exists" (an audit)
            _fail(f"--keep-mix {keep_mix}: a file, not a folder")
        try:
            images = real_mix(mix_from, keep_mix or work / "mix")
        except ValueError as e:  # counted as written: a --keep-mix holding older photos passed the count
            _fail(str(e))
    if images is None:
        from dataclasses import replace

        from pipelines.data.synth import PRESETS, generate

        images = generate(replace(PRESETS["clinic"], n_images=n_images, seed=0), work / "images").out_dir / "images"
    if weights is None:
        from pipelines.evaluation.untrained import write_untrained_weights

        weights = write_untrained_weights(work / "weights")
        typer.echo("note: untrained weights at default sizes (speed only; labels are meaningless)", err=True)
    # every file the loops can read, any format or case of its name (only *.jpg was taken)
    paths, left_out = usable([images / p for p in list_inputs(images)])
    if left_out:
        typer.echo(f"note: {left_out} files in {images} are not readable photos and are left out", err=True)
    if not paths:
        _fail(f"no readable photos in {images}")
    result = run_bench(weights, paths, batch_size, device, jpeg_decoder, chosen,  # type: ignore[arg-type]
                       naive_images=naive_images, decode_threads=decode_threads)
    if sizes:
        from pipelines.evaluation.engine_bench import detector_batch_ab

        result["detector_batch"] = detector_batch_ab(weights, paths, sizes, batch_size, device)
    return result


def _int8_detector(weights: Path, source: Path, n: int):
    """(quantize, description) for the detector: calibration inputs recorded from the torch
    engine over n seeded photos of `source` (its train rows for a manifest with splits)."""
    import numpy as np

    from pipelines.clean.inputs import list_inputs
    from pipelines.engine.quantize import describe, quantize_detector

    if not source.exists():
        _fail(f"{source} does not exist")
    if source.is_file():
        df = _manifest(source)
        if "split" in df.columns:
            df = df[df["split"] == "train"]
        photos = [Path(p) for p in df["abspath"]]
        what = f"{source.name} (train rows)" if "split" in df.columns else source.name
    else:
        photos = [source / p for p in list_inputs(source)]
        what = source.name
    if not photos:
        _fail(f"no calibration photos in {source}" + (" (no train rows)" if source.is_file() else ""))
    rng = np.random.default_rng(0)
    photos = [photos[i] for i in sorted(rng.choice(len(photos), min(n, len(photos)), replace=False))]
    qc = _engine(weights, device="cpu", runtime="torch", findings=False)
    inputs = qc.detector_inputs(photos)
    if not inputs:  # said "3 photos" and failed in NNCF after the conversion
        _fail(f"none of the {len(photos)} calibration photos of {what} could be read as a photo")
    read = sum(len(batch) for batch in inputs)  # the photos it calibrated on: "4 photos" counted 3 unreadable ones
    unread = f" ({len(photos) - read} of the {len(photos)} drawn could not be read)" if read < len(photos) else ""
    typer.echo(f"INT8 calibration: {read} photos of {what}{unread}, {len(inputs)} detector batches")
    return (lambda ov_model: quantize_detector(ov_model, inputs)), describe(read, what)
