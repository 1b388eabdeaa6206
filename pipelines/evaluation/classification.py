"""The paper's metrics with non-regular as the positive class, through scikit-learn, and the
threshold calibration that is only ever done on a validation split."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)


@dataclass
class BinaryMetrics:
    sensitivity: float  # recall of non-regular
    specificity: float
    precision: float
    f1: float
    accuracy: float
    roc_auc: float
    pr_auc: float
    confusion: list[list[int]]  # [[TN, FP], [FN, TP]] (rows truth regular/non-regular)
    threshold: float
    n: int
    n_positive: int

    def as_dict(self) -> dict:
        return asdict(self)


def binary_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> BinaryMetrics:
    """Scores are larger for non-regular (a Deep SAD distance or a ResNeSt probability)."""
    y = np.asarray(y_true).astype(int)
    s = np.asarray(scores, float)
    pred = (s >= threshold).astype(int)
    cm = confusion_matrix(y, pred, labels=[0, 1])
    tn, fp = int(cm[0, 0]), int(cm[0, 1])
    both = len(np.unique(y)) == 2
    return BinaryMetrics(
        sensitivity=float(recall_score(y, pred, zero_division=0)),
        specificity=tn / (tn + fp) if tn + fp else float("nan"),
        precision=float(precision_score(y, pred, zero_division=0)),
        f1=float(f1_score(y, pred, zero_division=0)),
        accuracy=float(accuracy_score(y, pred)),
        roc_auc=float(roc_auc_score(y, s)) if both else float("nan"),
        pr_auc=float(average_precision_score(y, s)) if both else float("nan"),
        confusion=cm.astype(int).tolist(),
        threshold=float(threshold),
        n=int(len(y)),
        n_positive=int(y.sum()),
    )


def calibrate_threshold(y_true: np.ndarray, scores: np.ndarray, target_sensitivity: float | None = None) -> float:
    """Max-F1 threshold, or the highest threshold that still reaches `target_sensitivity`.
    Call it on validation scores only: a threshold tuned on the test split is a lie."""
    y = np.asarray(y_true).astype(int)
    s = np.asarray(scores, float)
    if y.sum() == 0 or y.sum() == len(y):
        raise ValueError("threshold calibration needs both regular and non-regular validation samples")
    if target_sensitivity is not None:
        pos = np.sort(s[y == 1])[::-1]
        k = int(np.ceil(target_sensitivity * len(pos))) - 1
        return float(pos[max(0, min(k, len(pos) - 1))])
    precision, recall, thresholds = precision_recall_curve(y, s)
    f1 = 2 * precision[:-1] * recall[:-1] / np.clip(precision[:-1] + recall[:-1], 1e-12, None)
    return float(thresholds[int(np.argmax(f1))])


def metrics_by_group(y_true, scores, threshold: float, groups) -> dict[str, BinaryMetrics]:
    """Overall plus one entry per group value (per source, as the paper reports Peru)."""
    y, s, g = np.asarray(y_true), np.asarray(scores), np.asarray(groups)
    out = {"overall": binary_metrics(y, s, threshold)}
    for name in sorted(set(g.tolist())):
        m = g == name
        out[str(name)] = binary_metrics(y[m], s[m], threshold)
    return out
