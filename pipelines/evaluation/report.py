"""`cervixqc report`: one self-contained HTML file (figures embedded) with the paper's tables
and figures, built from the score files `cervixqc eval` writes: Table 6, confusion matrices
(Tables 5, 7, 8), the Deep SAD score box plot with its threshold (Fig. 4), galleries of
lowest/highest scores and of misclassified crops (Figs. 5-6), t-SNE of ResNeSt pooled
features (Figs. 7-8), and ROC/PR curves."""

from __future__ import annotations

import base64
import html
import io
import math
import zipfile
from pathlib import Path

import numpy as np

from pipelines.evaluation.classification import binary_metrics
from pipelines.outputs import write_atomically

KIND_NAMES = ("regular", "green", "iodine")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, caption: str) -> str:
    """The figure embedded as base64 PNG, with its caption as text (searchable, testable)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}"/>'
            f'<figcaption>{html.escape(caption)}</figcaption></figure>')


def _label(run: dict) -> str:
    """Model, size and split: `eval` writes a val and a test run of one model side by side in
    one folder, and two rows named alike let a validation figure pass for a test one."""
    name = "Deep SAD" if str(run["model"]) == "deep_sad" else "ResNeSt"
    s = int(run["input_size"])
    weights = f", weights {str(run['model_sha256'])[:12]}" if "model_sha256" in run else ""
    return f"{name}, {s}x{s}, {run.get('split', 'split unknown')}{weights}"


def _role(run: dict) -> str:
    """What a row's photos are to its threshold and training, as `eval` read it from the card
    (`stage2_eval.threshold_role`); a scores file from before that record is named by its split
    alone, and says so."""
    if "role" in run:
        return str(run["role"])
    named = {"val": "thresholds chosen here: optimistic", "test": "held out"}.get(str(run.get("split", "")), "")
    return f"{named} (by the split's name)" if named else ""


def _splits(runs: list[dict]) -> str:
    return ", ".join(sorted({str(r.get("split", "unknown")) for r in runs}))


def _figure(v: float) -> str:
    return f"{v:.3f}" if math.isfinite(v) else "n/a"  # undefined: no positive, or nothing flagged


RUN_KEYS = ("model", "input_size", "y", "score", "threshold", "paths", "kinds")


def load_runs(eval_dir: Path) -> list[dict]:
    """Every `*_scores.npz` of an eval folder. A damaged file or one without the keys `cervixqc
    eval` writes is a ValueError naming it (they were a BadZipFile or KeyError traceback)."""
    runs = []
    for f in sorted(Path(eval_dir).glob("*_scores.npz")):
        try:
            with np.load(f, allow_pickle=False) as z:
                run = {k: z[k] for k in z.files} | {"file": f.name}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"{f}: not a readable scores file ({type(e).__name__})") from None
        missing = [k for k in RUN_KEYS if k not in run]
        if missing:
            raise ValueError(f"{f}: not a `cervixqc eval` scores file (no {', '.join(missing)})")
        runs.append(run)
    _refuse_mixed_inputs(runs)
    # split first, then model: rows of val and test interleaved (ResNeSt test, ResNeSt val, Deep
    # SAD test ...), and a validation figure read beside a held-out one as its peer (an audit)
    order, splits = {"classifier": 0, "deep_sad": 1}, {"val": 0, "test": 1}
    return sorted(runs, key=lambda r: (splits.get(str(r.get("split", "")), 2), order.get(str(r["model"]), 2),
                                       int(r["input_size"])))


def _refuse_mixed_inputs(runs: list[dict]) -> None:
    """Runs of one split that scored other manifests or box files (the split of another seed,
    a detector's boxes beside the checked ones) are not one comparison: they stood side by
    side in Table 6 under one split name, unsaid (an audit). Files from before `eval`
    recorded its inputs cannot tell and are taken as they are."""
    for key, what in (("manifest_sha256", "manifests"), ("coco_sha256", "box files")):
        by_split: dict[str, dict[str, str]] = {}
        for run in runs:
            if key in run:
                by_split.setdefault(str(run.get("split", "")), {})[str(run[key])] = run["file"]
        for split, files in by_split.items():
            if len(files) > 1:
                raise ValueError(f"the {split!r} evals scored different {what} ({', '.join(sorted(files.values()))}): "
                                 "a report compares runs of one manifest and box file; put the others in another "
                                 "folder")


def given_files_scored(runs: list[dict], manifest: Path, coco: Path) -> None:
    """The report's --manifest and --coco must be the files `eval` scored (it records their
    sha256, as `_refuse_mixed_inputs` reads them): other boxes under the same photo names drew
    galleries of other crops, captioned with the scored run's scores, exit 0 (an audit). Runs
    from before the record cannot tell."""
    from models.io import sha256_file

    for key, given, option in (("manifest_sha256", manifest, "--manifest"), ("coco_sha256", coco, "--coco")):
        digest = sha256_file(given)
        other = sorted(r["file"] for r in runs if key in r and str(r[key]) != digest)
        if other:
            raise ValueError(f"{option} {given} is not the file {', '.join(other[:3])} scored (their sha256s "
                             f"differ): pass the one `cervixqc eval` was given")


def left_out(run: dict) -> dict[str, int] | None:
    """Photos of each kind `eval` left out for want of a box (None: a scores file from before
    it recorded them)."""
    if "left_out_kinds" not in run:
        return None
    return {str(k): int(n) for k, n in zip(run["left_out_kinds"], run["left_out_counts"])}


def left_out_by_source(run: dict) -> dict[str, dict[str, int]] | None:
    """`left_out` of each source (None: a scores file from before it recorded them)."""
    if "left_out_sources" not in run:
        return None
    by: dict[str, dict[str, int]] = {}
    for src, kind, n in zip(run["left_out_sources"], run["left_out_source_kinds"], run["left_out_source_counts"]):
        by.setdefault(str(src), {})[str(kind)] = int(n)
    return by


def table6(runs: list[dict]) -> str:
    """The paper's Table 6, with how many crops each row scored and how many photos had no box:
    with a detector's box file its misses are in no figure, and the table alone read as if
    every positive had been found (an audit)."""
    rows, notes = [], []

    def row(label: str, role: str, y: np.ndarray, score: np.ndarray, threshold: float, without: str) -> str:
        m = binary_metrics(y, score, threshold)
        return (f"<tr><td>{html.escape(label)}</td><td>{html.escape(role)}</td>" + "".join(
            f"<td>{_figure(v)}</td>" for v in (m.sensitivity, m.specificity, m.precision, m.f1, m.accuracy, m.roc_auc,
                                               m.pr_auc))
            + f"<td>{threshold:.4g}</td><td>{len(y)}</td><td>{without}</td></tr>")

    for r in runs:
        missing, by_source = left_out(r), left_out_by_source(r)
        without = "?" if missing is None else str(sum(missing.values()))
        rows.append(row(_label(r), _role(r), r["y"], r["score"], float(r["threshold"]), without))
        # and each source's: pooled, one source's false flags hid behind the others' specificity
        # (atlas test 0.833 under 0.970 pooled, every positive an atlas photo: an audit)
        sources = np.asarray(r.get("sources", []), dtype=str)
        for source in sorted(set(sources)) if len(set(sources)) > 1 else []:
            at = sources == source
            own = "" if by_source is None else str(sum(by_source.get(source, {}).values()))
            rows.append(row(f"\u2003{source}", "", r["y"][at], r["score"][at], float(r["threshold"]), own))
        if missing:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(missing.items()))
            where = "" if not by_source else "; " + "; ".join(
                f"{src}: " + ", ".join(f"{n} {k}" for k, n in sorted(ks.items()))
                for src, ks in sorted(by_source.items()))
            notes.append(f"{_label(r)}: {sum(missing.values())} photos had no box ({kinds}{where}) and are in none of "
                         "its figures; with a detector's boxes they are its misses, and the whole pipeline's "
                         "sensitivity is lower (cervixqc eval-pipeline)")
    head = ("<tr><th></th><th>Split's role</th><th>Sens./recall</th><th>Spec.</th><th>Prec.</th><th>F1</th>"
            "<th>Acc.</th><th>ROC-AUC</th><th>Average precision</th><th>Threshold (the card's)</th><th>Crops scored</th>"
            "<th>Left out (no box)</th></tr>")
    return f"<table>{head}{''.join(rows)}</table>" + "".join(f"<p>{html.escape(n)}</p>" for n in notes)


def confusion(run: dict) -> str:
    (tn, fp), (fn, tp) = binary_metrics(run["y"], run["score"], float(run["threshold"])).confusion
    return (f"<table><tr><th>{html.escape(_label(run))}: predicted \u2193 / truth \u2192</th><th>Non-regular</th>"
            f"<th>Regular</th></tr><tr><th>Non-regular</th><td>{tp}</td><td>{fp}</td></tr>"
            f"<tr><th>Regular</th><td>{fn}</td><td>{tn}</td></tr></table>")


def score_boxplot(run: dict) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    groups = [run["score"][run["kinds"] == k] for k in range(3)]
    ax.boxplot([g for g in groups], tick_labels=list(KIND_NAMES))
    ax.axhline(float(run["threshold"]), color="red", ls="--", label=f"threshold {float(run['threshold']):.3g}")
    ax.set_ylabel("distance to centre" if str(run["model"]) == "deep_sad" else "P(non-regular)")
    ax.set_title(f"{_label(run)} scores by class")
    ax.legend()
    return _png(fig, f"Fig. 4: {_label(run)} scores by class, threshold dashed")


def curves(runs: list[dict]) -> str:
    from sklearn.metrics import precision_recall_curve, roc_curve

    drawn = [r for r in runs if len(np.unique(r["y"])) == 2]
    # a run of one class has no curve: it was skipped without a word, and with no other run the
    # page showed two empty axes (a site's validation split without green or iodine photos)
    skipped = "".join(f"<p>{html.escape(_label(r))}: no ROC or precision-recall curve, "
                      + (f"its crops are all {'non-regular' if r['y'][0] else 'regular'}" if len(r["y"]) else "no crops")
                      + "</p>" for r in runs if not any(r is d for d in drawn))
    if not drawn:
        return skipped
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for r in drawn:
        fpr, tpr, _ = roc_curve(r["y"], r["score"])
        p, rec, _ = precision_recall_curve(r["y"], r["score"])
        m = binary_metrics(r["y"], r["score"], float(r["threshold"]))
        style = "-" if str(r.get("split", "")) == "test" else "--"
        a.plot(fpr, tpr, style, label=f"{_label(r)} (AUC {_figure(m.roc_auc)})")
        b.plot(rec, p, style, label=f"{_label(r)} (AP {_figure(m.pr_auc)})")
        b.axhline(float(np.mean(r["y"])), color="grey", lw=0.6, ls=":")  # chance: the positives' share
    a.plot([0, 1], [0, 1], color="grey", lw=0.6, ls=":")  # chance
    a.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    b.set(xlabel="recall", ylabel="precision", title="Precision-recall")
    a.legend(fontsize=7, loc="lower right")  # where ROC and PR curves of usable models leave room
    b.legend(fontsize=7, loc="lower left")
    return _png(fig, "ROC and precision-recall curves (test solid, validation dashed; dotted: chance)") + skipped


TSNE_MIN_POINTS = 10


def tsne(run: dict, max_points: int = 1500, seed: int = 0) -> str:
    from sklearn.manifold import TSNE

    feats = run["features"]
    if len(feats) < TSNE_MIN_POINTS:  # scikit-learn refused 2 points, and the whole report failed (an audit)
        return f"<p>t-SNE of {html.escape(_label(run))}: left out, {len(feats)} crops are too few to map</p>"
    idx = np.random.default_rng(seed).permutation(len(feats))[:max_points]
    emb = TSNE(n_components=2, init="pca", perplexity=min(30, max(2, len(idx) // 4)), random_state=seed).fit_transform(feats[idx])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for k, colour in zip(range(3), ("#6b8fb8", "#3fa34d", "#a0522d")):
        m = run["kinds"][idx] == k
        ax.scatter(emb[m, 0], emb[m, 1], s=6, c=colour, label=KIND_NAMES[k])
    ax.set_title(f"t-SNE of {_label(run)} pooled features (ground truth)")
    ax.legend(markerscale=3)
    return _png(fig, f"Figs. 7-8: t-SNE of {_label(run)} pooled features, coloured by ground truth")


def gallery(crops: dict[str, np.ndarray], paths: list[str], captions: list[str], title: str) -> str:
    if not paths:
        return f"<p>{html.escape(title)}: none</p>"
    plt = _plt()
    n = len(paths)
    cols = min(8, n)
    rows = -(-n // cols)
    # at least 4 tiles wide: a one-crop gallery's title ran across its caption (an audit)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * max(cols, 4), 1.9 * rows + 0.3), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, p, cap in zip(axes.flat, paths, captions):
        if p in crops:  # a path the manifest or boxes do not hold gets its caption, not a KeyError
            ax.imshow(crops[p])
        ax.set_title(cap, fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _png(fig, title)


def crop_caption(kind: str, flagged: bool, score: float) -> str:
    """A gallery tile's truth, what the threshold made of it, and its score to 4 decimals:
    "regular 1" read as a certain flag where it was 0.9999993, and a misclassified crop's
    label was left to the reader to work out (an audit)."""
    return f"{kind} \u2192 {'non-reg.' if flagged else 'regular'}\n{score:.4f}"


def galleries(run: dict, crops: dict[str, np.ndarray], n: int = 8) -> str:
    order = np.argsort(run["score"])
    paths = run["paths"].tolist()
    kinds = [KIND_NAMES[k] for k in run["kinds"]]

    pred = run["score"] >= float(run["threshold"])

    def pick(ix):
        return [paths[i] for i in ix], [crop_caption(kinds[i], bool(pred[i]), float(run["score"][i])) for i in ix]

    wrong = np.flatnonzero(pred != run["y"].astype(bool))
    wrong = wrong[np.argsort(-np.abs(run["score"][wrong] - float(run["threshold"])))][: 2 * n]
    return "".join([
        gallery(crops, *pick(order[:n]), f"{_label(run)}: lowest scores"),
        gallery(crops, *pick(order[::-1][:n]), f"{_label(run)}: highest scores"),
        gallery(crops, *pick(order[::-1][np.isin(order[::-1], np.flatnonzero(run['kinds'] == 0))][:n]),
                f"{_label(run)}: regular crops with the highest scores"),
        gallery(crops, *pick(wrong), f"{_label(run)}: misclassified ({len(np.flatnonzero(pred != run['y'].astype(bool)))})"),
    ])


def build_report(eval_dir: Path | None, crops: dict[str, np.ndarray], out: Path,
                 title: str = "cervixqc stage-2 report", findings_dir: Path | None = None,
                 made: dict[str, str] | None = None) -> Path:
    """`crops`: path -> HxWx3 uint8 thumbnail for the galleries; `findings_dir`: a
    `cervixqc calibrate-findings` output folder, for the quality findings' section (the
    report may hold only that: `eval_dir` None); `made`: when and by what command (`created`,
    `command`), under the title: a page passed on had no date or command to trace it by (an
    audit)."""
    runs = load_runs(eval_dir) if eval_dir is not None else []
    if eval_dir is not None and not Path(eval_dir).is_dir():  # "no *_scores.npz in nothere" (an audit)
        raise ValueError(f"{eval_dir}: {'not a folder' if Path(eval_dir).exists() else 'no such folder'} (give the "
                         "folder `cervixqc eval -o` wrote)")
    if eval_dir is not None and not runs:
        raise ValueError(f"no *_scores.npz in {eval_dir}: run `cervixqc eval` first")
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if made:
        parts.append(f"<p>Made {html.escape(made.get('created', ''))} by <code>{html.escape(made.get('command', ''))}"
                     "</code></p>")
    if runs:
        parts += [f"<p>Split: {html.escape(_splits(runs))}; non-regular (green + iodine) is the positive "
                  "class; thresholds are each model card's: chosen on the training's validation split, or on a site's "
                  "photos where the card records a site calibration (calibrate-stage2).</p>",
                  "<h2>Performance of models (Table 6)</h2>", table6(runs),
                  "<h2>Confusion matrices (Tables 5, 7, 8)</h2>", "".join(confusion(r) for r in runs),
                  "<h2>ROC and precision-recall</h2>", curves(runs)]
    for r in runs:
        parts.append(f"<h2>{html.escape(_label(r))}</h2>")
        parts.append(score_boxplot(r))
        if "features" in r:
            parts.append(tsne(r))
        parts.append(galleries(r, crops))
    if findings_dir is not None:
        from pipelines.evaluation.findings_report import findings_section

        parts.append(findings_section(Path(findings_dir)))
    style = "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;margin:8px 0}" \
            "td,th{border:1px solid #999;padding:3px 8px;text-align:right}img{max-width:100%}</style>"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{style}"
            f"</head><body>{''.join(parts)}</body></html>")
    return write_atomically(out, lambda tmp: tmp.write_text(page))
