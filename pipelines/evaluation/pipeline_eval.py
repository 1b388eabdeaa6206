"""The whole pipeline judged on labelled photos, as a site meets it: photo in, label out.

Stage-by-stage metrics (detector mAP, stage-2 F1 on ground-truth crops) hide how the stages
compound: a green photo the detector misses is a miss for the green filter too. Here every
manifest row goes through the engine and its label is compared with the truth, per source:
cervix found, non-cervix photos called no_cervix, and non-regular sensitivity, specificity,
precision and F1 over the cervix photos (a cervix photo called no_cervix counts as "not
non-regular"), kind accuracy, and regulars flagged. Every policy is scored from the same run.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from pipelines.evaluation.classification import binary_metrics
from pipelines.engine.qc_result import Label, QCResult
from pipelines.engine.weights_folder import decision_of

# a tie goes to the simpler decision: the paper's final model, the other one, the pairs, then
# the vote of three
TIE_ORDER = ("resnest", "deep_sad", "both", "either", "two_of_three")
_CERVIX = ("regular", "green", "iodine")


def run_rows(qc, df: pd.DataFrame, batch_size: int = 16,
             progress: Callable[[int, int], None] | None = None) -> list[QCResult]:
    """The engine over a loaded manifest's rows (named by their manifest path), in order. Its
    config must have `kind_of_every_crop`: each policy's labels, under these thresholds or
    others, follow from the scores (`labels_under`), and each flagged crop then has its kind."""
    if not qc.cfg.kind_of_every_crop:
        raise ValueError("run_rows needs an engine with QCConfig(kind_of_every_crop=True)")
    out: list[QCResult] = []
    for start in range(0, len(df), batch_size):
        chunk = df.iloc[start : start + batch_size]
        out += qc.run(list(chunk["abspath"]), names=list(chunk["path"]))
        if progress is not None:
            progress(len(out), len(df))
    return out


def labels_under(qc, results: list[QCResult], policy: str) -> list[str]:
    """Each result's label had the engine used `policy` (same scores, other decision)."""
    labels = []
    for r in results:
        if r.label in (Label.REGULAR, Label.NON_REGULAR):
            labels.append(qc.label_for(r.deep_sad_score, r.resnest_prob, policy, r.colour_score).value)
        else:
            labels.append(r.label.value)
    return labels


def score_group(truth: pd.Series, labels: list[str], kinds: list[str | None]) -> dict:
    """The group's rates over the photos the engine could read; `unreadable` counts the rest.
    Kept in, a corrupt file was a missed cervix: one among 40 took a source's "cervix found"
    from 1.000 to 0.875, unsaid, like a model regression (an audit)."""
    t, lab = truth.to_numpy(), np.asarray(labels)
    read = lab != Label.UNREADABLE.value
    cervix, none = np.isin(t, _CERVIX) & read, (t == "no_cervix") & read
    out: dict = {"n": int(len(t)), "n_cervix": int(cervix.sum()), "n_no_cervix": int(none.sum()),
                 "unreadable": int((~read).sum())}
    out["cervix_found"] = float(np.isin(lab[cervix], ("regular", "non_regular")).mean()) if cervix.any() else None
    out["no_cervix_called"] = float((lab[none] == "no_cervix").mean()) if none.any() else None
    if cervix.any():
        y = np.isin(t[cervix], ("green", "iodine")).astype(int)
        flagged = (lab[cervix] == "non_regular").astype(float)
        m = binary_metrics(y, flagged, 0.5)
        out |= {k: getattr(m, k) for k in ("sensitivity", "specificity", "precision", "f1", "accuracy")}
        out |= {"n_non_regular": int(y.sum()), "confusion": m.confusion}
        regular = t[cervix] == "regular"
        out["regular_flagged"] = float(flagged[regular].mean()) if regular.any() else None
        hit = (y == 1) & (flagged == 1)
        k = np.asarray(kinds, dtype=object)[cervix]
        out["kind_accuracy"] = float((k[hit] == t[cervix][hit]).mean()) if hit.any() else None
    return out


def evaluate_pipeline(qc, df: pd.DataFrame, results: list[QCResult]) -> dict:
    """{policy: {"overall": {...}, source: {...}}} for every policy the weights allow, plus the
    default's name."""
    kinds = [r.kind for r in results]
    report: dict = {"default_policy": qc.policy}
    for policy in qc.policies:
        labels = labels_under(qc, results, policy)
        kinds_p = [k if lab == "non_regular" else None for k, lab in zip(kinds, labels)]
        per = {"overall": score_group(df["kind"], labels, kinds_p)}
        for source in sorted(df["source"].unique()):
            m = (df["source"] == source).to_numpy()
            per[source] = score_group(df["kind"][m], [lab for lab, k in zip(labels, m) if k],
                                      [x for x, k in zip(kinds_p, m) if k])
        report[policy] = per
    return report


def choose_policy(val_report: dict) -> tuple[str, dict[str, float]]:
    """The policy with the highest non-regular F1 of the whole pipeline on a validation
    report, and every policy's F1. Chosen on the engine's own detector crops, so a threshold
    that sits on the edge of the ground-truth crops' scores is judged as it behaves in use."""
    f1 = {p: val_report[p]["overall"].get("f1") for p in TIE_ORDER if p in val_report}
    if not val_report[next(iter(f1))]["overall"].get("n_non_regular"):
        raise ValueError("the validation report has no green or iodine photo: no F1 to choose a policy by")
    best = max(f1, key=lambda p: (f1[p], -TIE_ORDER.index(p)))
    return best, {p: float(v) for p, v in f1.items()}


def check_policy_report(report: dict, cards) -> None:
    """ValueError unless `report` is `eval-pipeline --split val`'s, of these very models and
    thresholds: a test report, or one of other weights, was taken without a word and the card
    then said "chosen on validation" (an audit). Reports name their split since 2026-12-04."""
    if report.get("split") != "val":
        rows = (f"split {report['split']!r}" if report.get("split") else "every row of its manifest"
                if "split" in report else "rows it does not name (written before reports named their split)")
        raise ValueError(f"the report is of {rows}: a policy is chosen on validation alone "
                         "(cervixqc eval-pipeline SPLIT.csv --split val)")
    here = decision_of("", cards)  # the models and thresholds as eval-pipeline recorded them
    other = [name for name in here["models"] if any(report.get(k, {}).get(name) != here[k][name]
                                                    for k in ("models", "thresholds"))]
    if other:
        raise ValueError(f"the report is of other models or thresholds than these cards' ({', '.join(other)}): "
                         "run eval-pipeline on this folder first")


def policy_record(val_report: dict, sad_card, cls_card, report_path: str, colour_card=None) -> dict:
    """What a stage-2 card keeps of the choice (`metrics.policy_choice`): the engine reads it
    only while every sha256 matches the models it loaded (`pipelines.engine.weights_folder.best_policy`)."""
    check_policy_report(val_report, (sad_card, cls_card, colour_card))
    best, f1 = choose_policy(val_report)
    return {"policy": best, "rule": "highest whole-pipeline non-regular F1 on validation; ties: "
            + " > ".join(TIE_ORDER), "val_f1": f1, "report": report_path,
            "n_non_regular": val_report[best]["overall"]["n_non_regular"],
            "deep_sad_sha256": sad_card.sha256, "classifier_sha256": cls_card.sha256,
            "colour_sha256": colour_card.sha256 if colour_card is not None else None}
