"""Quality-finding commands: calibrate-findings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.commands.common import _fail, _manifest, _split_manifest, command_line, rate_text, training_output


def calibrate_findings_cmd(
    manifest: Annotated[Path, typer.Argument(
        help="Manifest of real photos with a split column (cervixqc split; any manifest with --thresholds-from).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for findings.json (the card), the scores and "
                                                           "the test thumbnails.")],
    weights: Annotated[Path, typer.Option(help="Weights folder whose engine finds the cervix crops.")] = Path("weights"),
    max_false_flags: Annotated[float, typer.Option(
        min=0.0, max=0.5, help="Share of undegraded photos a threshold may flag on the calibration splits.")] = 0.015,
    seed: Annotated[int, typer.Option(min=0, help="Random seed (same seed, same result).")] = 0,
    thresholds_from: Annotated[Optional[Path], typer.Option(
        "--thresholds-from", help="A findings card (e.g. weights/findings.json) whose thresholds are judged on every "
                                  "photo of the manifest instead of choosing new ones (no split needed): how they do "
                                  "on a site's own photos.")] = None,
) -> None:
    """Thresholds for blur, dark, overexposed and glare from degraded copies of labelled photos:
    chosen on train+val, reported on test. Copy OUT/findings.json into a weights folder to use them.
    With --thresholds-from, another card's thresholds are judged on every photo instead."""
    from rich.progress import Progress

    from models.io import WeightsIntegrityError, sha256_file
    from pipelines.commands.engine import _engine
    from pipelines.engine.findings import FindingsCard, load_findings_card
    from pipelines.engine.qc_result import FINDINGS
    from pipelines.engine.loading import loading
    from pipelines.evaluation.findings_calibration import (CalibrationConfig, calibrate, judge, score_variants,
                                                           write_outputs)

    judged = None
    if thresholds_from is not None and thresholds_from.is_dir():  # IsADirectoryError (an audit)
        _fail(f"--thresholds-from {thresholds_from} is a folder: give the findings card in it "
              f"({thresholds_from / 'findings.json'})")
    if thresholds_from is not None:  # before the minutes of scoring, checked as the engine checks it
        try:
            with loading(thresholds_from):
                judged = load_findings_card(thresholds_from)
        except WeightsIntegrityError as e:
            _fail(f"--thresholds-from: not a findings card this cervixqc can use: {e}")
    # judged thresholds: nothing is chosen on any photo, so every one is a test photo
    df = _split_manifest(manifest) if judged is None else _manifest(manifest).assign(split="test")
    if "kind" in df.columns and (df["kind"] == "no_cervix").any():  # the findings judge the cervix crop
        typer.echo(f"note: {int((df['kind'] == 'no_cervix').sum())} no_cervix photos left out: the findings are "
                   "calibrated on cervix crops", err=True)
        df = df[df["kind"] != "no_cervix"]
    if "known_findings" in df.columns:  # the generator's own camera blur: such photos may be flagged
        from pipelines.data.manifest import known_findings

        marked = df["known_findings"].map(known_findings).explode().dropna().value_counts()
        if len(marked):
            typer.echo("note: " + ", ".join(f"{n} photos known to have {f}" for f, n in marked.items()) +
                       " (manifest `known_findings`): not counted as photos that finding must leave alone", err=True)
    if judged is not None and (judged.metrics.get("data") or {}).get("manifest_sha256") == sha256_file(manifest):
        typer.echo(f"warning: {manifest} is the manifest {thresholds_from} was calibrated on: its train and val "
                   "photos chose these thresholds; its own test figures are the fair ones", err=True)
    # before the minutes of scoring; made when the files are written. A rerun into the same -o
    # says it replaces the earlier card (it did so without a word: an audit)
    training_output(out, "findings.json", one_shot=True)
    cfg = CalibrationConfig(max_false_flags=max_false_flags, seed=seed)
    # found after minutes of scoring (an audit)
    if judged is None and not df["split"].isin(cfg.calibration_splits).any():
        _fail(f"{manifest}: no row in the splits {', '.join(cfg.calibration_splits)}, where the thresholds are "
              "chosen; run `cervixqc split` first")
    qc = _engine(weights)
    # every finding scored (thresholds are what this command decides)
    qc.findings_card = FindingsCard(thresholds=dict.fromkeys(FINDINGS, float("inf")))
    from pipelines.commands.common import progress_console

    with Progress(transient=True, console=progress_console()) as bar:
        task = bar.add_task("degrading and scoring", total=len(df))
        scores, thumbs, skipped = score_variants(qc, df, cfg, lambda done, total: bar.update(task, completed=done))
    if skipped:
        shown = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        typer.echo(f"warning: {len(skipped)} photos could not be read or were refused by the engine, left out: {shown}",
                   err=True)
        df = df[~df["path"].isin(set(skipped))]
    if df.empty:
        _fail(f"no photo of {manifest} could be scored")
    try:
        thresholds, metrics = (calibrate(scores, cfg) if judged is None
                               else ({n: judged.thresholds[n] for n in FINDINGS}, judge(scores, judged)))
    except ValueError as e:
        _fail(str(e))
    data = {"manifest": str(manifest), "manifest_sha256": sha256_file(manifest), "photos": int(len(df)),
            "photos_left_out": len(skipped),
            "photos_by_split": {k: int(v) for k, v in df["split"].value_counts().items()},
            "weights_detector_sha256": qc.det_card.sha256}
    if judged is not None:  # the detector whose crops chose them, which a copy of this card names
        data["thresholds_from"] = {"card": str(thresholds_from), "sha256": sha256_file(thresholds_from)}
        data["judged_with_detector_sha256"] = data.pop("weights_detector_sha256")
        data["weights_detector_sha256"] = (judged.metrics.get("data") or {}).get("weights_detector_sha256")
    write_outputs(out, scores, thumbs, thresholds, metrics, cfg, command_line(), data)
    for name in FINDINGS:
        m = (metrics["test"] if "test" in metrics else metrics["calibration"])[name]
        # rate_text: a finding every photo is known to have has no AUC or recall (None), which
        # failed the format after the card was written, a traceback (an audit)
        typer.echo(f"{name:>12}  threshold {thresholds[name]:.4g}  AUC {rate_text(m['auc'])}  recall "
                   f"{rate_text(m['recall'])}  precision {rate_text(m['precision'])}  false flags (originals) "
                   f"{rate_text(m['false_flags_original'])}")
    shown = "figures of every photo" if judged is not None else "test" if "test" in metrics else "calibration"
    typer.echo(f"wrote {out / 'findings.json'} ({shown} above)")
