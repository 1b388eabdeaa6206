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
from pipelines.engine.qc_result import Label, QCResult
from pipelines.evaluation.classification import Space, binary_metrics, calibrate_threshold

NON_REGULAR_KINDS = ("green", "iodine")


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
    """Each model's new threshold on these crops; ValueError when they do not hold both a
    regular and a green or iodine photo."""
    y = crops["y"].to_numpy()
    if y.sum() == 0 or y.sum() == len(y):
        raise ValueError(f"the engine found a cervix in {len(y)} photos, {int(y.sum())} of them green or iodine: "
                         "choosing a threshold needs both regular and green or iodine photos")
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
    """The card with its stage-2 threshold replaced and the choice recorded (`metrics.site_calibration`);
    the figures of its training (`metrics.val`, `pipeline_*`, `policy_choice.val_f1`) are left
    as they were measured, under the threshold before, which the record names."""
    key = SCORERS[card.name].threshold_key
    before = card.thresholds[key]
    return card.model_copy(update={
        "thresholds": card.thresholds | {key: float(threshold)},
        "metrics": card.metrics | {"site_calibration": record | {"threshold_before": before,
                                                                 "threshold": float(threshold)}}})
