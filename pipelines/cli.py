"""The `cervixqc` command: quality control of uterine cervix photos, and the stack to train it.

Thin: parses arguments, calls pipelines, prints results. `serve` is added by service/cli.py
(the console entry point), which keeps the import direction service -> pipelines.

Commands live in pipelines/commands/ (one module per area) and import their heavy
dependencies inside the command, so that `cervixqc --help` does not pay for torch.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated, Optional

import typer

from pipelines.commands import collection, data, detector, duplicates, engine, evaluation, findings, presence, stage2
from pipelines.commands.common import per_core_limit

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"cervixqc {version('cervixqc')}")
        except PackageNotFoundError:
            typer.echo("cervixqc (not installed: a bare checkout)")
        raise typer.Exit()


@app.callback(context_settings={"help_option_names": ["-h", "--help"]})
def _root(threads: Annotated[Optional[int], typer.Option(
        help="CPU threads for torch (default: the container's CPU quota where one is set and "
             "OMP_NUM_THREADS is not, else torch's own choice, one per core). Set it when two jobs share "
             "a machine: two processes each using every core run slower than one. Before the command: "
             "cervixqc --threads 1 clean ...")] = None,
          _: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False) -> None:
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter("must be >= 1", param_hint="--threads")
        limit = per_core_limit()
        if threads > limit:
            raise typer.BadParameter(f"must be <= {limit} (4 per core here)", param_hint="--threads")
        import torch

        torch.set_num_threads(threads)

app.command("synth")(data.synth)
app.command("validate")(data.validate)
app.command("split")(data.split)
app.command("stats")(data.stats)
app.command("import-cvat")(data.import_cvat_cmd)
app.command("import-labels")(collection.import_labels_cmd)
app.command("merge-manifests")(collection.merge_manifests_cmd)
app.command("propose-boxes")(collection.propose_boxes_cmd)
app.command("fix-boxes")(collection.fix_boxes_cmd)
app.command("match-boxes")(collection.match_boxes_cmd)
app.command("extract-listed")(collection.extract_listed_cmd)
app.command("train-detector")(detector.train_detector_cmd)
app.command("eval-detector")(detector.eval_detector_cmd)
app.command("detect")(detector.detect_cmd)
app.command("bench-detector")(detector.bench_detector_cmd)
app.command("train-presence")(presence.train_presence_cmd)
app.command("train-deep-sad")(stage2.train_deep_sad_cmd)
app.command("train-resnest")(stage2.train_resnest_cmd)
app.command("train-colour")(stage2.train_colour_cmd)
app.command("eval")(stage2.eval_cmd)
app.command("report")(stage2.report_cmd)
app.command("eval-pipeline")(evaluation.eval_pipeline_cmd)
app.command("baseline-colour")(evaluation.baseline_colour_cmd)
app.command("calibrate-stage2")(evaluation.calibrate_stage2_cmd)
app.command("predict")(engine.predict)
app.command("clean")(engine.clean)
app.command("bench")(engine.bench)
app.command("export")(engine.export)
app.command("contact-sheet")(data.contact_sheet_cmd)
app.command("calibrate-findings")(findings.calibrate_findings_cmd)
app.command("demo")(data.demo)
app.command("duplicates")(duplicates.duplicates_cmd)
app.command("eval-duplicates")(duplicates.eval_duplicates_cmd)


def empty_argument(args: list[str]) -> str | None:
    """Why an empty argument is refused, or None. Click reads "" as the path ".", so an unset
    shell variable (`cervixqc clean "$SRC" -o "$OUT"`) cleaned the current folder, or wrote
    the results there, exit 0 (an audit). No option of ours means anything by an empty value."""
    for k, arg in enumerate(args, 1):
        if arg == "" or (arg.startswith("--") and arg.endswith("=")):
            shown = f"{arg!r} " if arg else ""
            return f"argument {k} {shown}is empty (an unset shell variable?)"
    return None


def stop_as_interrupted() -> None:
    """SIGTERM ends a command as Ctrl-C does: `docker stop`, systemd's stop, `kill`, a batch
    scheduler's time limit. It killed a training run silently (exit 143, no word of --resume)
    and a `clean` without its "run the same command to resume" (an audit); now the commands'
    own KeyboardInterrupt paths run, exit 130. In this process alone: a forked worker (a
    multiprocessing pool's, a DataLoader's) inherits the handler, and a pool's terminate()
    sends it SIGTERM, which must still end it at once. Not for `serve`: uvicorn has its own."""
    import signal

    main_pid = os.getpid()

    def interrupt(signum, frame):
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main() -> None:  # pragma: no cover - console entry
    # CERVIXQC_LOG_LEVEL as the service reads it (debug adds tracebacks, which may name files)
    level = os.environ.get("CERVIXQC_LOG_LEVEL", "info").upper()
    logging.basicConfig(level=level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO",
                        format="%(levelname)s %(name)s: %(message)s")
    # faiss logs at INFO which CPU build it loaded, "ModuleNotFoundError" and all: read as a failure
    logging.getLogger("faiss").setLevel(max(logging.WARNING, logging.getLogger().level))
    from models.io import WeightsIntegrityError

    empty = empty_argument(sys.argv[1:])
    if empty:
        typer.echo(f"error: {empty}; nothing was run", err=True)
        sys.exit(2)
    if sys.argv[1:2] != ["serve"]:
        stop_as_interrupted()
    try:
        app()
    except (OSError, WeightsIntegrityError) as e:
        # the last net under every command: an output that cannot be written, a card that
        # cannot be read, was a 40-60 line traceback; the commands check what they can first
        if isinstance(e, OSError) and e.strerror:
            named = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
            message = f"{named}: {e.strerror}" if named else e.strerror
        else:
            message = str(e)
        typer.echo(f"error: {message}", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
