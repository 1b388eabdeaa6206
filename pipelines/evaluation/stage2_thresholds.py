"""Stage-2 thresholds chosen again on a site's own labelled photos, the networks kept.

Why: the bundled thresholds were chosen on validation photos of three public collections, and
a site's camera moves the scores (an `atlas` case filmed through a cyan speculum reads Deep SAD
distances of 1.9-4.7 on its regular photos, over the bundled 1.82: weights/README.md). Retraining both networks takes an
hour on a 2-core CPU and needs cervix boxes; choosing the thresholds again needs only labels
and one engine pass. The rule is training's (`calibrate_threshold`: the highest F1, then the
middle of the gap under it, in log space for distances and logit space for probabilities),
applied to the scores of the engine's own crops, since those are what the thresholds meet in
use (training chose them on ground-truth crops).

The policy is kept: its record on the cards names the networks' sha256s, which do not change,
and every policy's figures before and after are reported beside it. Photos the engine called
no_cervix or could not read have no stage-2 score; they are left out of the choice and
counted, and they count against every policy's figures as in `eval-pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from models.io import ModelCard
from pipelines.data.schema import NON_REGULAR_KINDS
from pipelines.engine.qc_result import Label, QCResult
from pipelines.evaluation.classification import Space, binary_metrics, calibrate_threshold
from pipelines.evaluation.pipeline_eval import evaluate_pipeline

# Fewer photos of a class than this choose nothing: with 1 green photo of 3 the colour threshold
# went 0.736 -> 0.076 (an audit). A choice, not a measurement: the bundled thresholds rest on
# 12 green and iodine validation photos, and between this and 30 the command warns.
MIN_PER_CLASS = 10


@dataclass(frozen=True)
class Scorer:
    """Where one stage-2 model's score lives in a result and on its card."""

    result_field: str
    threshold_key: str
    space: Space


SCORERS = {"deep_sad": Scorer("deep_sad_score", "distance", "log"),
           "classifier": Scorer("resnest_prob", "probability", "logit"),
           "colour": Scorer("colour_score", "probability", "logit")}


def scored_crops(df: pd.DataFrame, results: list[QCResult]) -> pd.DataFrame:
    """One row per photo the engine found a cervix in: path, source, kind, y (1 = green or
    iodine) and each model's score (NaN where the folder has no such model)."""
    rows = []
    for (_, row), r in zip(df.iterrows(), results):
        if r.label not in (Label.REGULAR, Label.NON_REGULAR):
            continue
        rows.append({"path": row["path"], "source": row["source"], "kind": row["kind"],
                     "y": int(row["kind"] in NON_REGULAR_KINDS),
                     **{name: np.nan if getattr(r, s.result_field) is None else float(getattr(r, s.result_field))
                        for name, s in SCORERS.items()}})
    return pd.DataFrame(rows, columns=["path", "source", "kind", "y", *SCORERS])


def choose(crops: pd.DataFrame, cards: dict[str, ModelCard], target_sensitivity: float | None = None
           ) -> dict[str, float]:
    """Each model's new threshold on these crops; ValueError when they hold fewer than
    `MIN_PER_CLASS` regular or green and iodine photos."""
    y = crops["y"].to_numpy()
    if min(y.sum(), len(y) - y.sum()) < MIN_PER_CLASS:
        raise ValueError(f"the engine found a cervix in {len(y)} photos, {int(y.sum())} of them green or iodine: "
                         f"choosing a threshold needs at least {MIN_PER_CLASS} regular and {MIN_PER_CLASS} green or "
                         "iodine photos")
    return {name: calibrate_threshold(y, crops[name].to_numpy(), target_sensitivity, space=SCORERS[name].space)
            for name in cards}


def model_figures(crops: pd.DataFrame, name: str, threshold: float) -> dict:
    """One model alone at `threshold` over the scored crops, overall and per source."""
    out = {}
    for group, part in [("overall", crops), *crops.groupby("source", sort=True)]:
        m = binary_metrics(part["y"].to_numpy(), part[name].to_numpy(), threshold)
        out[str(group)] = {k: getattr(m, k) for k in ("f1", "sensitivity", "specificity", "precision")} | {
            "n": m.n, "n_positive": m.n_positive}
    return out


def with_thresholds(card: ModelCard, threshold: float, record: dict) -> ModelCard:
    """The card with its stage-2 threshold replaced and the choice recorded (`metrics.site_calibration`,
    a calibration before it kept as its `earlier`); the figures of its training (`metrics.val`,
    `pipeline_*`, `policy_choice.val_f1`) are left as they were measured, under the threshold
    before, which the record names."""
    key = SCORERS[card.name].threshold_key
    before = card.thresholds[key]
    return card.model_copy(update={
        "thresholds": card.thresholds | {key: float(threshold)},
        "metrics": card.metrics | {"site_calibration": record | {
            "threshold_before": before, "threshold": float(threshold),
            "earlier": card.metrics.get("site_calibration")}}})


def chosen_on(record: dict, manifest_sha256: str, split: str | None) -> bool:
    """Whether a card's `site_calibration` record chose its threshold on rows of this manifest
    that a figure of `split` (None: every row) includes: `eval` and `eval-pipeline` both say so
    before their figures."""
    chose = record.get("split")
    return record.get("manifest_sha256") == manifest_sha256 and (chose == "all" or split in (None, chose))


POLICY_FIGURES = ("f1", "sensitivity", "precision", "regular_flagged")


@dataclass
class Calibration:
    """New stage-2 cards and what they do on the photos that chose them."""

    policy: str
    thresholds_before: dict[str, float]
    thresholds: dict[str, float]
    cards: dict[str, ModelCard]
    crops: pd.DataFrame
    figures: dict  # stage2_calibration.json

    @property
    def kept_policy(self) -> dict[str, dict]:
        return self.figures["record"]["kept_policy"]

    @property
    def policy_worse(self) -> bool:
        """Each threshold is its own model's best alone, not the policy's: on a site's split the
        kept policy read F1 0.909 -> 0.903 on the very photos that chose them, sensitivity
        0.882 -> 0.824 (an audit). Such cards are not written."""
        def f1(when: str) -> float:
            v = self.kept_policy[when]["f1"]
            return 0.0 if v is None or v != v else float(v)

        return f1("after") < f1("before")


def calibrate(qc, df: pd.DataFrame, results: list[QCResult], record: dict,
              target_sensitivity: float | None = None) -> Calibration:
    """Thresholds for the engine's stage-2 models from its results on `df`'s labelled cervix
    photos; `record` (where the photos came from, the command) goes on each new card. The
    figures after are the engine's own rule (`label_for` reads its cards' thresholds) over the
    same results under the new cards, so they are what an engine on them gives (tested).
    ValueError when the scored photos do not hold both classes."""
    crops = scored_crops(df, results)
    cards = {name: card for name, card in
             {"deep_sad": qc.sad_card, "classifier": qc.cls_card, "colour": qc.colour_card}.items() if card is not None}
    old = {name: card.thresholds[SCORERS[name].threshold_key] for name, card in cards.items()}
    thresholds = choose(crops, cards, target_sensitivity)
    before = evaluate_pipeline(qc, df, results)
    kept = {"before": {k: before[qc.policy]["overall"].get(k) for k in POLICY_FIGURES}}
    try:
        qc.sad_card, qc.cls_card, qc.colour_card = (
            with_thresholds(card, thresholds[name], {}) if card is not None else None
            for name, card in (("deep_sad", qc.sad_card), ("classifier", qc.cls_card), ("colour", qc.colour_card)))
        after = evaluate_pipeline(qc, df, results)
    finally:
        qc.sad_card, qc.cls_card, qc.colour_card = cards["deep_sad"], cards["classifier"], cards.get("colour")
    kept["after"] = {k: after[qc.policy]["overall"].get(k) for k in POLICY_FIGURES}
    record = record | {"policy_kept": qc.policy, "kept_policy": kept, "photos_scored": len(crops),
                       "non_regular_scored": int(crops["y"].sum())}
    figures = {"record": record,
               "thresholds": {name: {"key": SCORERS[name].threshold_key, "before": old[name], "after": thresholds[name]}
                              for name in cards},
               "models_alone": {name: {"before": model_figures(crops, name, old[name]),
                                       "after": model_figures(crops, name, thresholds[name])} for name in cards},
               "pipeline": {"before": before, "after": after}}
    new_cards = {name: with_thresholds(card, thresholds[name], record) for name, card in cards.items()}
    return Calibration(qc.policy, old, thresholds, new_cards, crops, figures)
