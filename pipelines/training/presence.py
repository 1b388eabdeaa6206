"""Presence head training: colour histograms and the detector's pooled features of every
labelled photo, one scikit-learn logistic regression per feature set, their logits
standardised on the training photos and summed; the threshold is the cut with the best
balanced accuracy (cervix found, no_cervix called) on validation, moved to the middle of
its gap. Fitting takes seconds; computing the features takes one detector pass per photo.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from models.io import ModelCard, load_card, save_weights
from models.presence import PresenceConfig, PresenceHead
from pipelines.data.images import load_rgb
from pipelines.detector import load_detector
from pipelines.evaluation.classification import margin_threshold
from pipelines.presence import colour_histograms, detect_with_features

log = logging.getLogger(__name__)
_CERVIX = ("regular", "green", "iodine")


@dataclass
class PresenceTrainConfig:
    out_dir: Path
    c_hist: float = 0.1  # inverse L2 strength of each regression (strong: a few hundred photos)
    c_feat: float = 0.01
    batch_size: int = 8
    seed: int = 0


@dataclass
class PhotoFeatures:
    hist: np.ndarray
    feats: np.ndarray
    labels: np.ndarray  # 1: a cervix, 0: none
    sources: np.ndarray


def photo_features(detector, max_size: int, df: pd.DataFrame, device: torch.device,
                   batch_size: int = 8) -> PhotoFeatures:
    """Features of every row of known kind of a loaded manifest, decoded as the engine decodes."""
    rows = df[df["kind"].isin([*_CERVIX, "no_cervix"])]
    hist, feats = [], []
    paths = list(rows["abspath"])
    for start in range(0, len(paths), batch_size):
        images = [load_rgb(Path(p), 2 * max_size)[0] for p in paths[start : start + batch_size]]
        hist.append(colour_histograms(images).numpy())
        feats.append(detect_with_features(detector, [im.float() / 255 for im in images], device)[1].numpy())
    dim = detector.backbone.out_channels
    return PhotoFeatures(np.concatenate(hist) if hist else np.zeros((0, 512)),
                         np.concatenate(feats) if feats else np.zeros((0, dim)),
                         rows["kind"].isin(_CERVIX).to_numpy().astype(int), rows["source"].to_numpy())


def balanced_threshold(y: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, balanced accuracy) on validation scores, the threshold in the middle of
    the gap under the best cut."""
    best = (0.0, -1.0)
    for t in np.unique(scores):
        pred = scores >= t
        bacc = 0.5 * (pred[y == 1].mean() + (~pred[y == 0]).mean())
        if bacc > best[1]:
            best = (float(t), float(bacc))
    return margin_threshold(scores, best[0], "linear"), best[1]


def fit_head(train: PhotoFeatures, cfg: PresenceTrainConfig) -> PresenceHead:
    head = PresenceHead(PresenceConfig(feature_dim=train.feats.shape[1]))
    state = head.state_dict()
    for name, x, c in (("hist", train.hist, cfg.c_hist), ("feat", train.feats, cfg.c_feat)):
        mean, scale = x.mean(0), x.std(0) + 1e-6
        lr = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=cfg.seed)
        lr.fit((x - mean) / scale, train.labels)
        logits = lr.decision_function((x - mean) / scale)
        for key, value in (("mean", mean), ("scale", scale), ("weight", lr.coef_[0]), ("bias", lr.intercept_[0]),
                           ("logit_mean", logits.mean()), ("logit_scale", logits.std() + 1e-6)):
            state[f"{name}_{key}"] = torch.as_tensor(value, dtype=torch.float32).reshape(state[f"{name}_{key}"].shape)
    head.load_state_dict(state)
    return head.eval()


@torch.no_grad()
def score(head: PresenceHead, f: PhotoFeatures) -> np.ndarray:
    return head(torch.as_tensor(f.hist), torch.as_tensor(f.feats)).numpy()


def presence_rates(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    pred = scores >= threshold
    return {"cervix_found": float(pred[y == 1].mean()), "n_cervix": int((y == 1).sum()),
            "no_cervix_called": float((~pred[y == 0]).mean()), "n_no_cervix": int((y == 0).sum()),
            "roc_auc": float(roc_auc_score(y, scores)), "threshold": threshold}


def train_presence(cfg: PresenceTrainConfig, detector_card: Path, train_df: pd.DataFrame, val_df: pd.DataFrame,
                   device: torch.device, data_note: dict | None = None) -> Path:
    detector, det_card = load_detector(detector_card, device)
    max_size = det_card.config["max_size"]
    train, val = (photo_features(detector, max_size, d, device, cfg.batch_size) for d in (train_df, val_df))
    for name, part in (("training", train), ("validation", val)):
        if len(set(part.labels.tolist())) < 2:
            raise ValueError(f"presence {name} photos need some with and some without a cervix")
    head = fit_head(train, cfg)
    val_scores = score(head, val)
    threshold, _ = balanced_threshold(val.labels, val_scores)
    correct = (val_scores >= threshold) == (val.labels == 1)
    by_source = {s: {"correct": float(correct[val.sources == s].mean()), "n": int((val.sources == s).sum())}
                 for s in sorted(set(val.sources))}
    card = ModelCard(
        name="presence", architecture="presence_linear_heads",
        config={**asdict(head.cfg), "detector_sha256": load_card(detector_card).sha256},
        input_size=[head.cfg.hist_side, head.cfg.hist_side],
        preprocessing={"hist": f"photo resized to {head.cfg.hist_side} px long side, joint RGB histogram "
                               f"{head.cfg.hist_bins}^3, normalised, square root",
                       "features": "the detector's FPN maps, mean and max pooled per level over the photo's region"},
        classes=["no_cervix", "cervix"], thresholds={"score": float(threshold)},
        training={**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                  "detector": str(detector_card), "fit": "sklearn LogisticRegression(class_weight=balanced) per "
                  "feature set on standardised inputs; logits standardised on the training photos and summed",
                  "n_train": {"cervix": int(train.labels.sum()), "no_cervix": int((train.labels == 0).sum())},
                  "threshold_rule": "max balanced accuracy (cervix found, no_cervix called) on the validation "
                                    "split pooled over sources; then the middle of the gap under that cut"},
        data=data_note or {},
        metrics={"val": presence_rates(val.labels, val_scores, threshold) | {"per_source": by_source}},
    )
    return save_weights(head.state_dict(), Path(cfg.out_dir) / "presence", card)
