"""The bar every learned stage-2 model must clear: logistic regression on colour histograms.

Green-filter and Lugol's-iodine photos differ from regular ones above all in colour, so a
linear model on a colour histogram of the whole photo is the honest baseline (the real-images
issue measured one at F1 0.87 on held-out photos). It is trained on the same training split,
its threshold chosen on the same validation split by the same rule, and reported beside the
deep models on the same rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipelines.evaluation.classification import binary_metrics, calibrate_threshold

BINS = 8  # per channel: 512 joint RGB bins
_CERVIX = ("regular", "green", "iodine")


def colour_histogram(path: str, bins: int = BINS) -> np.ndarray:
    """Joint RGB histogram of the photo at 128 px, normalised, square-rooted (Hellinger)."""
    with Image.open(path) as im:
        im.draft("RGB", (256, 256))
        im = ImageOps.exif_transpose(im).convert("RGB")
        im.thumbnail((128, 128))
        q = (np.asarray(im, np.int64) * bins) // 256
    idx = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    h = np.bincount(idx.ravel(), minlength=bins**3).astype(np.float64)
    return np.sqrt(h / h.sum())


def baseline_report(df: pd.DataFrame, seed: int = 0) -> tuple[dict, pd.DataFrame]:
    """Fit on the train split's cervix photos, pick the threshold on val, score val and test
    (overall and per source). `df` is a loaded manifest with a split column. With the report,
    each val and test photo's probability and call: without them its figures could not be
    checked or traced to photos (an audit)."""
    if "split" not in df.columns:
        raise ValueError("the manifest has no split column: run `cervixqc split` first")
    df = df[df["kind"].isin(_CERVIX)]
    empty = [s for s in ("train", "val") if not (df["split"] == s).any()]
    if empty:  # was a bare KeyError: 'val'
        raise ValueError(f"no cervix photo in the {' and '.join(empty)} split: the baseline fits on train and "
                         "chooses its threshold on val")
    train = df.loc[df["split"] == "train", "kind"]
    if train.isin(("green", "iodine")).all() or train.eq("regular").all():  # sklearn's words, after every photo
        raise ValueError("the train split needs both regular and green or iodine photos to fit the baseline; "
                         f"it has {', '.join(sorted(set(train)))} only")
    feats = {s: np.stack([colour_histogram(p) for p in df.loc[df["split"] == s, "abspath"]])
             for s in ("train", "val", "test") if (df["split"] == s).any()}
    ys = {s: df.loc[df["split"] == s, "kind"].isin(("green", "iodine")).to_numpy().astype(int) for s in feats}
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000,
                                                               random_state=seed))
    model.fit(feats["train"], ys["train"])
    probs = {s: model.predict_proba(x)[:, 1] for s, x in feats.items()}
    threshold = calibrate_threshold(ys["val"], probs["val"], space="logit")
    report: dict = {"model": "LogisticRegression(C=0.1, balanced) on sqrt 8x8x8 RGB histograms, whole photo",
                    "threshold": threshold}
    rows = []
    for s in ("val", "test"):
        if s not in probs:
            continue
        part_rows = df.loc[df["split"] == s, ["path", "split", "source", "kind"]].rename(columns={"kind": "truth"})
        rows.append(part_rows.assign(probability=probs[s], flagged=probs[s] >= threshold))
        sources = df.loc[df["split"] == s, "source"].to_numpy()
        part = {"overall": binary_metrics(ys[s], probs[s], threshold).as_dict()}
        for src in sorted(set(sources)):
            m = sources == src
            part[src] = binary_metrics(ys[s][m], probs[s][m], threshold).as_dict()
        report[s] = part
    return report, pd.concat(rows, ignore_index=True)
