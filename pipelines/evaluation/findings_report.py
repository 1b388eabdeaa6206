"""The quality findings' section of `cervixqc report`: per finding, the threshold and its
evidence on the test split (AUC, recall, precision, false flags per source), the score
distributions with the threshold line, and galleries to check the scores by eye: the
undegraded photos that score worst and best, and the degraded copies the threshold misses."""

from __future__ import annotations

import html
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.engine.qc_result import FINDINGS
from pipelines.evaluation.findings_calibration import without_known
from pipelines.evaluation.report import _plt, _png, gallery

_WORSE = {"blur": "blurrier", "dark": "darker", "overexposed": "brighter", "glare": "more glare"}


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def _table(card: dict) -> str:
    head = ("<tr><th>finding</th><th>threshold</th><th>AUC</th><th>recall</th><th>precision</th>"
            "<th>false flags, originals</th><th>false flags, ordinary copies</th><th>by source (originals)</th></tr>")
    rows = []
    for name in FINDINGS:
        m = card["metrics"]["test"][name]
        by_source = ", ".join(f"{html.escape(s)} {v:.3f}" for s, v in m["false_flags_original_by_source"].items())
        rows.append(f"<tr><td>{name}</td><td>{card['thresholds'][name]:.4g}</td>" + "".join(
            f"<td>{_fmt(m[k])}</td>" for k in ("auc", "recall", "precision", "false_flags_original",
                                              "false_flags_nuisance")) + f"<td>{by_source}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _new_source_table(card: dict) -> str:
    """Each calibration source left out once (`calibration_new_source`): how far the rule's
    thresholds carry to photos unlike those that chose them. Empty for older cards and for a
    calibration with one source."""
    left_out = card["metrics"].get("calibration_new_source", {})
    rows = [f"<tr><td>{name}</td><td>{html.escape(source)}</td><td>{m['threshold']:.4g}</td>"
            + "".join(f"<td>{_fmt(m[k])}</td>" for k in ("false_flags_original", "false_flags_nuisance", "recall"))
            + "</tr>" for name in FINDINGS for source, m in left_out.get(name, {}).items()]
    if not rows:
        return ""
    head = ("<tr><th>finding</th><th>source left out</th><th>threshold from the others</th>"
            "<th>its false flags, originals</th><th>ordinary copies</th><th>its recall</th></tr>")
    return ("<h3>Thresholds at a source that did not choose them</h3><p>Calibration splits only: "
            "each source left out, the rule run on the others, judged on it.</p>"
            f"<table>{head}{''.join(rows)}</table>")


def _histogram(test: pd.DataFrame, plain: pd.DataFrame, name: str, threshold: float) -> str:
    """`plain`: `test` less the photos known to have `name` (`without_known`), as the figures count them."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2.6))
    groups = {"originals": plain[plain["variant"] == "original"],
              "ordinary copies": plain[plain["variant"] == "nuisance"],
              f"degraded ({name})": test[test["variant"] == name]}
    values = np.concatenate([g[name].to_numpy() for g in groups.values()])
    bins = np.linspace(np.nanmin(values), np.nanmax(values), 40)
    for label, g in groups.items():
        ax.hist(g[name].dropna(), bins=bins, alpha=0.55, label=label)
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel(f"{name} score (larger: {_WORSE[name]})")
    ax.legend(fontsize=7)
    return _png(fig, f"{name}: test-split scores of originals, ordinary copies and degraded copies")


def _checked_files(folder: Path, card: dict) -> None:
    """The scores and thumbnails are the card's run's (recorded since the card kept their sha256s)."""
    from models.io import sha256_file

    for name, want in card["training"].get("files_sha256", {}).items():
        if sha256_file(folder / name) != want:
            raise ValueError(f"{folder / name} is not the file its findings.json was written with (files of two "
                             "runs?): run `cervixqc calibrate-findings` into the folder again")


def _left_out(data: dict) -> str:
    """The photos the calibration could not score, said on the page as on the command line."""
    n = data.get("photos_left_out", 0)
    return f"; {n} left out, unreadable or refused by the engine" if n else ""


def findings_section(folder: Path, n: int = 8) -> str:
    """HTML for the findings of one `cervixqc calibrate-findings` output folder. A damaged or
    foreign file is a ValueError naming it: a truncated thumbnail file, a card without
    thresholds or a renamed score column were tracebacks, and any JSON passed as a card
    without a test split (an audit)."""
    from pydantic import ValidationError

    from pipelines.engine.findings import load_findings_card
    from pipelines.data.schema import validation_reasons

    try:
        card = load_findings_card(folder / "findings.json", scoring=False).model_dump()
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as e:  # a damaged card said only "Unter...
        # (an audit); the card's own refusals (a missing threshold) name the file already
        why = validation_reasons(e)[:300] if isinstance(e, ValidationError) else str(e).splitlines()[0]
        raise ValueError(f"{folder / 'findings.json'}: not a findings card ({why})") from None
    _checked_files(folder, card)
    if "test" not in card["metrics"]:
        return "<h2>Quality findings</h2><p>The calibration had no test split: no figures to show.</p>"
    scores = pd.read_csv(folder / "findings_scores.csv", keep_default_na=False, na_values=[""])
    lacking = sorted({"split", "variant", *FINDINGS} - set(scores.columns))
    if lacking:
        raise ValueError(f"{folder / 'findings_scores.csv'}: no {', '.join(lacking)} column (not calibrate-findings' "
                         "scores): run it into the folder again")
    test_split = card["training"].get("config", {}).get("test_split", "test")
    test = scores[scores["split"] == test_split]
    try:
        with np.load(folder / "findings_thumbs.npz") as z:
            thumbs = z["thumbs"]  # once: each z[...] decompresses the whole array again
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{folder / 'findings_thumbs.npz'}: cannot read its thumbnails ({type(e).__name__}): run "
                         "`cervixqc calibrate-findings` into the folder again") from None
    if len(thumbs) != len(scores):  # files of two runs: the galleries would show other photos
        raise ValueError(f"{folder}: {len(thumbs)} thumbnails for {len(scores)} score rows (files of two runs?): "
                         "run `cervixqc calibrate-findings` into it again")
    crops = {str(i): thumbs[i] for i in test.index}

    def show(rows: pd.DataFrame, name: str, title: str) -> str:
        return gallery(crops, [str(i) for i in rows.index], [f"{v:.3g}" for v in rows[name]], title)

    parts = ["<h2>Quality findings</h2>",
             f"<p>{html.escape(card['training'].get('method', ''))}</p>",
             f"<p>Command: <code>{html.escape(card['training'].get('command', ''))}</code>; photos: "
             f"{html.escape(json.dumps(card['metrics'].get('data', {}).get('photos_by_split', {})))}"
             f"{_left_out(card['metrics'].get('data', {}))}.</p>",
             _table(card), _new_source_table(card)]
    for name in FINDINGS:
        t = card["thresholds"][name]
        plain = without_known(test, name)
        originals = plain[plain["variant"] == "original"].sort_values(name)
        degraded = test[test["variant"] == name].sort_values(name)
        known = int((test["variant"] == "original").sum() - len(originals))
        parts += [f"<h3>{name}</h3>", _histogram(test, plain, name, t),
                  f"<p>{known} photos known to have {name} (manifest <code>known_findings</code>) are not among its "
                  "undegraded photos here, as in the figures.</p>" if known else "",
                  show(originals.iloc[::-1][:n], name, f"{name}: undegraded photos with the highest scores "
                                                       f"(threshold {t:.3g})"),
                  show(originals[:n], name, f"{name}: undegraded photos with the lowest scores"),
                  show(degraded[degraded[name] < t][-n:], name, f"{name}: degraded copies the threshold misses")]
    return "".join(parts)
