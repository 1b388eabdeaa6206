"""Whole-pipeline evaluation commands: eval-pipeline, baseline-colour, calibrate-stage2."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.commands.common import _fail, rate_text
from pipelines.data.schema import NON_REGULAR_KINDS
from pipelines.outputs import json_text, write_together


def _rows(manifest: Path, split: Optional[str], no_split_hint: str = ""):
    """The manifest's labelled rows of `split` (None: every row), or a clean exit that says what
    the manifest has."""
    from pipelines.data.manifest import ManifestError, load_manifest

    try:
        df = load_manifest(manifest)
    except ManifestError as e:
        _fail(str(e))
    if split is not None:
        if "split" not in df.columns:
            _fail(f"{manifest} has no split column{no_split_hint}")
        if not (df["split"] == split).any():
            splits = ", ".join(sorted(map(str, df["split"].unique())))
            _fail(f"{manifest}: no row in split {split!r} (its splits: {splits})")
        df = df[df["split"] == split].reset_index(drop=True)
    df = df[df["kind"] != ""].reset_index(drop=True)
    if df.empty:
        _fail(f"no labelled rows{' in split ' + split if split else ''} of {manifest}")
    return df


def _print(report: dict, policy: str) -> None:
    for name, m in report[policy].items():
        parts = [f"{name:>26}:"]
        if m["cervix_found"] is not None:
            parts.append(f"cervix found {m['cervix_found']:.3f} (n={m['n_cervix']})")
        if m["no_cervix_called"] is not None:
            parts.append(f"no_cervix called {m['no_cervix_called']:.3f} (n={m['n_no_cervix']})")
        if m.get("f1") is not None and m.get("n_non_regular"):
            parts.append(f"F1 {m['f1']:.3f} sens {m['sensitivity']:.3f} prec {rate_text(m['precision'])}")
        if m.get("regular_flagged") is not None:
            parts.append(f"regular flagged {m['regular_flagged']:.3f}")
        if m.get("kind_accuracy") is not None:
            parts.append(f"kind acc {m['kind_accuracy']:.3f}")
        typer.echo("  ".join(parts))


def eval_pipeline_cmd(
    manifest: Annotated[Path, typer.Argument(help="Labelled manifest (kinds, sources; a split column to pick from).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for pipeline_metrics.json and results.csv.")],
    weights: Annotated[Path, typer.Option(help="Weights folder.")] = Path("weights"),
    split: Annotated[Optional[str], typer.Option(help="Only rows of this split.")] = None,
    device: Annotated[str, typer.Option(help="auto (cuda when present), cpu, cuda or cuda:N.")] = "cpu",
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
) -> None:
    """Photo in, label out, judged against the manifest: cervix found, no_cervix called,
    non-regular F1 end to end, kind accuracy, regulars flagged; per source, every policy."""
    import pandas as pd

    from pipelines.commands.common import device_or_fail, require_writable
    from pipelines.commands.engine import _engine
    from pipelines.engine.qc_result import CSV_TEXT_FIELDS, spreadsheet_safe
    from pipelines.evaluation.pipeline_eval import evaluate_pipeline, labels_under, run_rows

    from pipelines.commands.common import first_file, not_an_input

    device = device_or_fail(device)
    for written in ("results.csv", "pipeline_metrics.json"):
        not_an_input("--out", out / written, manifest)
    if (out / "results.csv").exists() and not (out / "pipeline_metrics.json").exists():
        # a clean run's results folder: its results.csv was replaced by the evaluation's (an audit)
        _fail(f"--out {out} holds a results.csv that no eval-pipeline wrote (a clean run's?): write into another "
              "folder")
    foreign = first_file(out, "*.safetensors", "*_scores.npz", "stage2_calibration.json")
    if foreign:  # a weights folder, a stage-2 eval's or a calibration's: written into, exit 0 (an audit)
        _fail(f"--out {out} holds {foreign} (a weights folder, or another command's figures): write into another "
              "folder")
    require_writable("--out", out, keep=False)  # before the engine pass; made when the figures are written
    _check_split(manifest, weights, split)
    _check_chosen_here(manifest, weights, split)
    df = _rows(manifest, split)
    qc = _engine(weights, device=device, kind_of_every_crop=True)
    try:
        _refuse_other_figures(out / "pipeline_metrics.json", qc.decision, split)
        results = run_rows(qc, df, batch_size)
    finally:
        qc.close()
    # which models and thresholds these figures are of: two reports of one folder before and
    # after a swapped head (or a calibrate-stage2) could not be told apart (audits)
    report = (evaluate_pipeline(qc, df, results) | {k: qc.decision[k] for k in ("models", "thresholds")}
              | {"split": split})  # None: every row (a policy is chosen on "val" alone: `check_policy_report`)
    unreadable = report[qc.policy]["overall"]["unreadable"]
    if unreadable == len(df):
        _fail(f"not one of the {len(df)} photos could be read (results.csv is not written; `cervixqc validate` and "
              "the photos' own viewer tell why)", code=1)
    out.mkdir(parents=True, exist_ok=True)
    rows = pd.DataFrame([r.csv_row() for r in results])
    rows["label"] = labels_under(qc, results, qc.policy)  # the default's: the kinds were taken for every crop
    rows.loc[rows["label"] != "non_regular", "kind"] = None
    rows.insert(1, "truth", df["kind"].to_numpy())
    rows.insert(2, "source", df["source"].to_numpy())
    # names and sources as clean's results.csv has them, safe to open in a spreadsheet (they were raw: an audit)
    rows = rows.assign(**{c: rows[c].map(spreadsheet_safe) for c in (*CSV_TEXT_FIELDS, "source") if c in rows})
    # together: a full disk left a whole-looking metrics file beside a cut-short CSV (an audit)
    text = json_text(report)
    write_together({out / "results.csv": lambda tmp: rows.to_csv(tmp, index=False),
                    out / "pipeline_metrics.json": lambda tmp: tmp.write_text(text)})
    typer.echo(f"default policy: {report['default_policy']} (labels as the engine gives them)")
    _print(report, report["default_policy"])
    if unreadable:
        typer.echo(f"{unreadable} unreadable photos left out of every rate (label unreadable in results.csv)", err=True)
    typer.echo(f"wrote {out / 'pipeline_metrics.json'} (every policy) and {out / 'results.csv'}")


def _refuse_other_figures(path: Path, decision: dict, split: str | None) -> None:
    """An earlier eval-pipeline's figures are replaced only by those of the same models,
    thresholds and split (a rerun): one of other thresholds was replaced unsaid, and the two
    could not be compared any more (an audit)."""
    from pipelines.outputs import changed_since

    changed = changed_since(path, {"models": decision["models"], "thresholds": decision["thresholds"], "split": split})
    if changed is None:
        _fail(f"--out {path.parent} holds a {path.name} that cannot be read as an eval-pipeline's: write into "
              "another folder")
    if changed:
        import json

        _fail(f"--out {path.parent} holds the figures of other {', '.join(changed)} (split "
              f"{json.loads(path.read_text())['split'] or 'all'}): write into another folder to keep both, or delete it")


def _check_split(manifest: Path, weights: Path, split: str | None = None) -> None:
    """Said before any figure: a split other than the one the weights were trained under (their
    cards' `data.split_fingerprint`) may hold their training photos in its val and test rows;
    the train rows of that split, or of one that cannot tell (no sha256 column), are or may be
    those photos (`--split train` was judged as plainly as test; an audit). Each model is judged
    on its own card: a site's presence head refitted on its split (README) silenced the warning
    for the detector and stage 2 beside it, which that split's photos never trained (an audit)."""
    trained = _trained_under(manifest, weights)
    under = [name for name, same in (trained or {}).items() if same]
    if split == "train" and (trained is None or under):
        known = "are" if under else "may be (the manifest or the cards cannot tell: no sha256s)"
        typer.echo(f"warning: {manifest}'s train rows {known} the photos {weights}'s models were trained on, on "
                   "which they score better than on any other: these figures are not held-out ones", err=True)
    others = [name for name, same in (trained or {}).items() if not same]
    if others:
        which = f"any of {weights}'s models was" if not under else f"{weights}'s {_were(others)}"
        aside = f"; its {_were(under)}" if under else ""
        typer.echo(f"warning: {manifest} is not the split {which} trained under{aside} (the cards' "
                   "data.split_fingerprint): if any of its val or test photos were among their training photos, "
                   "these figures are not held-out ones. A site's own photos that no model here was trained on "
                   "are; to reproduce the cards' own figures, rebuild their split with the cards' "
                   "training.commands.", err=True)


def _were(names: list[str]) -> str:
    return f"{', '.join(names)} {'was' if len(names) == 1 else 'were'}"


def _check_chosen_here(manifest: Path, weights: Path, split: str | None) -> None:
    """Said before any figure: stage-2 thresholds that `calibrate-stage2` chose on this very
    manifest's rows. A site's test rows chosen on with `--split all` were then judged as a
    held-out figure (F1 1.000 at a small site), with no word (an audit)."""
    from models.io import UnreadableCard, load_card, sha256_file
    from pipelines.evaluation.stage2_thresholds import chosen_on

    try:
        here = sha256_file(manifest)
    except OSError:
        return  # named by the read that follows
    chose = {}
    for name in ("deep_sad", "classifier", "colour"):
        try:
            record = load_card(weights / f"{name}.json").metrics.get("site_calibration") or {}
        except UnreadableCard:
            continue
        if chosen_on(record, here, split):
            chose[name] = record.get("split")
    if chose:
        rows = ", ".join(f"{name} on its {s} rows" for name, s in chose.items())
        typer.echo(f"warning: the stage-2 thresholds in {weights} were chosen on this manifest ({rows}; "
                   "calibrate-stage2): these figures include the photos that chose them and are not held-out "
                   "ones; judge the cards on rows or photos that did not choose them", err=True)


def _trained_under(manifest: Path, weights: Path) -> dict[str, bool] | None:
    """For each of the folder's models whose card names its split: whether `manifest` is that
    split; None when no card or the manifest cannot tell (no fingerprint, no split column,
    unreadable)."""
    from models.io import UnreadableCard, load_card
    from pipelines.data.manifest import ManifestError, load_manifest
    from pipelines.data.splits import split_fingerprint

    fingerprints = {}
    for name in ("detector", "presence", "deep_sad", "classifier", "colour"):
        try:
            fingerprint = load_card(weights / f"{name}.json").data.get("split_fingerprint")
        except UnreadableCard:  # absent (presence, colour), or named by the engine's load that follows
            continue
        if fingerprint is not None:
            fingerprints[name] = fingerprint
    if not fingerprints:
        return None
    try:
        here = split_fingerprint(load_manifest(manifest, check_files=False))
    except ManifestError:
        return None  # named by the read that follows
    return None if here is None else {name: fingerprint == here for name, fingerprint in fingerprints.items()}


def baseline_colour_cmd(
    manifest: Annotated[Path, typer.Argument(help="Labelled manifest with a split column.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o",
                                                help="Folder to write baseline_metrics.json in.")] = None,
) -> None:
    """The colour-histogram logistic regression every stage-2 model must beat, on the same
    train/val/test rows (threshold from val)."""
    from pipelines.commands.common import require_writable
    from pipelines.data.manifest import ManifestError, load_manifest
    from pipelines.evaluation.colour_baseline import baseline_report

    if out is not None:  # a folder, checked before the fits
        require_writable("--out", out, keep=False)  # made when the metrics are written
    try:
        df = load_manifest(manifest)
        report, photos = baseline_report(df)
    except (ManifestError, ValueError, KeyError) as e:
        _fail(str(e))
    for s in ("val", "test"):
        for name, m in report.get(s, {}).items():
            scores = (f"F1 {m['f1']:.3f} sens {m['sensitivity']:.3f} spec {rate_text(m['specificity'])} "
                      f"prec {rate_text(m['precision'])} AUC {rate_text(m['roc_auc'])}" if m["n_positive"]
                      else f"spec {rate_text(m['specificity'])} (no non-regular photos)")
            typer.echo(f"{s:>4} {name:>14}: {scores} (n={m['n']}, pos={m['n_positive']})")
    if out is not None:
        from models.io import sha256_file

        out.mkdir(parents=True, exist_ok=True)
        report |= {"manifest": str(manifest.resolve()), "manifest_sha256": sha256_file(manifest)}
        text = json_text(report)
        write_together({out / "baseline_metrics.json": lambda tmp: tmp.write_text(text),
                        out / "baseline_scores.csv": lambda tmp: photos.to_csv(tmp, index=False)})
        typer.echo(f"wrote {out / 'baseline_metrics.json'} and {out / 'baseline_scores.csv'} (each val and test "
                   "photo's probability)")



def _calibration_rows(manifest: Path, split: str):
    """The labelled cervix photos that choose, or a clean exit that says what to pass."""
    from pipelines.evaluation.stage2_thresholds import MIN_PER_CLASS

    df = _rows(manifest, None if split == "all" else split,
               ": pass --split all to choose on every row, or make one with `cervixqc split`")
    if (df["kind"] == "no_cervix").any():
        typer.echo(f"note: {int((df['kind'] == 'no_cervix').sum())} no_cervix photos left out: stage 2 judges "
                   "cervix crops", err=True)
        df = df[df["kind"] != "no_cervix"].reset_index(drop=True)
    held_out = int((df["split"] == "test").sum()) if split == "all" and "split" in df.columns else 0
    if held_out:  # the README's route then judged on them as held out, F1 1.000 at a small site (an audit)
        typer.echo(f"warning: --split all takes this manifest's {held_out} test rows too: they choose the thresholds, "
                   "so `eval-pipeline --split test` on it is no held-out figure afterwards; choose on val and judge "
                   "on test, or judge on photos outside this manifest", err=True)
    n_pos = int(df["kind"].isin(NON_REGULAR_KINDS).sum())
    if min(n_pos, len(df) - n_pos) < MIN_PER_CLASS:
        _fail(f"{manifest}: {len(df)} cervix photos{'' if split == 'all' else ' in split ' + split}, {n_pos} of "
              f"them green or iodine: choosing a threshold needs at least {MIN_PER_CLASS} regular and "
              f"{MIN_PER_CLASS} green or iodine photos"
              + ("" if split == "all" else ": give validation a larger share (`cervixqc split --fractions "
                                           "0.5,0.3,0.2`, without --folds) or add photos; `--split all` chooses on "
                                           "every row, the test rows too"))
    return df


def _calibration_output(out: Path) -> None:
    from pipelines.commands.common import require_writable

    require_writable("-o", out, keep=False)  # made when the files are written
    if (out / "detector.json").exists():
        _fail(f"-o {out} is a weights folder: its cards would be replaced, and the figures on them with them; "
              "write into another folder and copy the cards into a copy of the weights folder")
    trained = [n for n in ("deep_sad.json", "classifier.json", "colour.json") if (out / n).exists()]
    if trained and not (out / "stage2_calibration.json").exists():
        # a training run's folder: its card was replaced by one of other weights, which then no
        # longer described the safetensors beside it (an audit)
        _fail(f"-o {out} holds {', '.join(trained)} of a training run, not of a calibration: write into another "
              "folder")
    if (out / "stage2_calibration.json").exists():
        typer.echo(f"{out} holds an earlier calibration: this run replaces its files", err=True)


def calibrate_stage2_cmd(
    manifest: Annotated[Path, typer.Argument(help="The site's labelled manifest (regular, green, iodine; a split "
                                                  "column to pick from).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the stage-2 cards with the new thresholds, "
                                                          "stage2_calibration.json and stage2_scores.csv.")],
    weights: Annotated[Path, typer.Option(help="Weights folder whose networks are kept.")] = Path("weights"),
    split: Annotated[str, typer.Option(help="The rows that choose: a split's name, or `all` for every row.")] = "val",
    target_sensitivity: Annotated[Optional[float], typer.Option(
        min=0.01, max=1.0, help="Each threshold the highest that still flags this share of the green and iodine "
                                "photos, instead of the best F1.")] = None,
    device: Annotated[str, typer.Option(help="auto (cuda when present), cpu, cuda or cuda:N.")] = "cpu",
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
) -> None:
    """Stage-2 thresholds chosen again on a site's own labelled photos, the networks kept: the
    training rule (best F1, then the middle of the gap) on the engine's own crops. Copy the
    cards it writes into a copy of the weights folder to use them. Cards under which the kept
    policy reads a lower F1 on these very photos are not written (exit 1)."""
    from models.io import sha256_file
    from pipelines.commands.common import device_or_fail, file_progress, run_record
    from pipelines.commands.engine import _engine, _weights_folder
    from pipelines.evaluation.pipeline_eval import run_rows
    from pipelines.evaluation.stage2_thresholds import SCORERS, calibrate

    device = device_or_fail(device)
    _weights_folder(weights)
    if split == "test":  # accepted before, and the README's next step judged on the rows that chose (an audit)
        _fail("--split test: rows that choose the thresholds are no test afterwards; choose on val (or all, for "
              "a site's photos that no model here was trained on) and judge on test")
    if split in ("train", "all") and any((_trained_under(manifest, weights) or {}).values()):
        typer.echo(f"warning: {manifest} is the split these networks were trained under: its {split} rows hold "
                   "their training photos, on which they score better than on a site's; thresholds chosen there "
                   "are optimistic", err=True)
    _calibration_output(out)
    df = _calibration_rows(manifest, split)
    qc = _engine(weights, device=device, kind_of_every_crop=True)
    try:
        with file_progress("engine") as report:
            results = run_rows(qc, df, batch_size, report)
    finally:
        qc.close()
    unreadable = [p for p, r in zip(df["path"], results) if r.label.value == "unreadable"]
    if unreadable:
        shown = ", ".join(unreadable[:10]) + (f" and {len(unreadable) - 10} more" if len(unreadable) > 10 else "")
        typer.echo(f"warning: {len(unreadable)} photos could not be read, left out: {shown}", err=True)
    record = {"manifest": str(manifest.resolve()), "manifest_sha256": sha256_file(manifest), "split": split,
              "photos": len(df),
              "left_out": {"no_cervix_called": sum(r.label.value == "no_cervix" for r in results),
                           "unreadable": len(unreadable)},
              "rule": ("highest threshold flagging the target share of the green and iodine photos"
                       if target_sensitivity is not None else "highest F1")
                      + " on the engine's crops of these photos, then the middle of the gap under it "
                        "(pipelines.evaluation.classification.calibrate_threshold)",
              "target_sensitivity": target_sensitivity, "weights": str(weights.resolve())} | run_record()
    try:
        cal = calibrate(qc, df, results, record, target_sensitivity)
    except ValueError as e:
        _fail(str(e), code=1)
    for name, before in cal.thresholds_before.items():
        alone = cal.figures["models_alone"][name]
        typer.echo(f"{name:>10}: {cal.figures['thresholds'][name]['key']} {before:.6g} -> {cal.thresholds[name]:.6g}  "
                   f"(alone on these photos: F1 {rate_text(alone['before']['overall']['f1'])} -> "
                   f"{rate_text(alone['after']['overall']['f1'])})")
    b, a = cal.kept_policy["before"], cal.kept_policy["after"]
    typer.echo(f"policy {cal.policy} (kept), before -> after: F1 {rate_text(b['f1'])} -> {rate_text(a['f1'])}, "
               f"sensitivity {rate_text(b['sensitivity'])} -> {rate_text(a['sensitivity'])}, regulars flagged "
               f"{rate_text(b['regular_flagged'])} -> {rate_text(a['regular_flagged'])} over {len(df)} photos "
               f"({record['left_out']['no_cervix_called']} called no_cervix, {len(unreadable)} unreadable: no "
               "stage-2 score)")
    if cal.policy_worse:
        _fail(f"not written: under the new thresholds the kept policy {cal.policy} reads a lower F1 on the very "
              "photos that chose them (each threshold is its own model's best alone, not the policy's); keep the "
              "cards the weights have, or judge another policy with `cervixqc eval-pipeline`", code=1)
    n_pos = cal.figures["record"]["non_regular_scored"]
    n_reg = len(cal.crops) - n_pos
    if min(n_pos, n_reg) < 30:
        judge = ("photos outside this manifest (`cervixqc eval-pipeline OTHER.csv --weights COPY`)" if split == "all"
                 else "its test rows (`cervixqc eval-pipeline SPLIT --split test --weights COPY`)")
        typer.echo(f"warning: chosen on {n_pos} green or iodine and {n_reg} regular photos, so few that one photo "
                   f"moves a threshold; judge the cards on photos that did not choose them, {judge}, before a site "
                   "uses them", err=True)
    writers = {out / f"{name}.json": (lambda tmp, c=card: tmp.write_text(c.model_dump_json(indent=2) + "\n"))
               for name, card in cal.cards.items()}
    writers[out / "stage2_calibration.json"] = lambda tmp: tmp.write_text(json_text(cal.figures))
    writers[out / "stage2_scores.csv"] = lambda tmp: cal.crops.to_csv(tmp, index=False)
    out.mkdir(parents=True, exist_ok=True)
    write_together(writers)
    for name in SCORERS:  # an earlier run's card of a model these weights lack would be copied in with these
        if name not in cal.cards:
            (out / f"{name}.json").unlink(missing_ok=True)
    typer.echo("these figures are of the photos that chose the thresholds, not held-out ones")
    names = " ".join(str(out / f"{n}.json") for n in cal.cards)
    typer.echo(f"wrote {names}; to use them: cp -r {weights} SITE (a new folder) && cp {names} SITE/")
