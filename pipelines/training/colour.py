"""Training the crop-colour scorer (models/colour.py): colour histograms of the training crops,
one scikit-learn logistic regression, the threshold from the validation crops (max F1, moved
to the middle of the gap in logit space, as the classifier's). Seconds on the CPU.

The recipe is the one measured before it was built (weights/README.md, "Crop colour"): the real
training crops drawn `copies` times, each draw turning a `synthesise` share of regulars green or
iodine with the generator's transforms (real green/iodine photos are few: 60 in the bundled
data), plus the synthetic scenes' crops once, for renderings the real sources lack. Trained on
real crops alone it read validation F1 1.000 but 0.41-0.45 on the never-trained synthetic
source; with the synthesised crops 0.70-0.72; with the scenes as well 0.84-0.86. C 0.01 (strong
L2: a few hundred real crops, 512 inputs) against 0.1 and 1.0: no better on validation, worse on
the synthetic source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.colour import CropColour, CropColourConfig
from models.io import ModelCard, save_weights
from pipelines.data.crop_set import CropDataset, CropSet
from pipelines.engine.stage2 import colour_scores, crop_histograms
from pipelines.evaluation.classification import binary_metrics, calibrate_threshold, metrics_by_group
from pipelines.training.linear import fit_standardised_logistic
from pipelines.training.stage2 import warn_if_weak


@dataclass
class ColourTrainConfig:
    out_dir: Path
    c: float = 0.01  # inverse L2 strength
    synthesise: float = 0.2  # share of regular crops turned green/iodine in each draw
    copies: int = 3  # draws of the main training crops (the extra crops are drawn once)
    seed: int = 0


def histograms(crops: CropSet, cfg: CropColourConfig, synthesise: float = 0.0,
               copies: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(histograms [copies * N, bins^3], non-regular labels) of `copies` draws of the crops."""
    if not len(crops):
        return np.zeros((0, cfg.hist_bins**3), np.float32), np.zeros(0, int)
    ds = CropDataset(crops, None, synthesise)
    xs, ys = [], []
    for _ in range(copies):
        images, kinds = zip(*(ds[i] for i in range(len(ds))))
        xs.append(crop_histograms(torch.stack(images) * 255, cfg).numpy())
        ys.append((torch.stack(kinds) > 0).long().numpy())
    return np.concatenate(xs), np.concatenate(ys)


def train_colour(cfg: ColourTrainConfig, train: CropSet, val: CropSet, extra: CropSet | None = None,
                 data_note: dict | None = None) -> Path:
    # an empty split was blamed on the classes before (an audit); extra crops train too
    n_train = len(train) + (len(extra) if extra is not None else 0)
    empty = next((name for name, n in (("train", n_train), ("val", len(val))) if not n), None)
    if empty:
        raise ValueError(f"no {empty} crop: no cervix photo of the manifest's {empty} split has a box (the colour "
                         "model trains on train and takes its threshold on val); split it with `cervixqc split`")
    model_cfg = CropColourConfig(crop_side=int(train.images.shape[-1]))
    torch.manual_seed(cfg.seed)
    parts = [histograms(train, model_cfg, cfg.synthesise, cfg.copies)]
    if extra is not None:
        parts.append(histograms(extra, model_cfg, cfg.synthesise, 1))
    x, y = (np.concatenate(p) for p in zip(*parts))
    if len(np.unique(y)) < 2:
        raise ValueError("the colour model needs regular and non-regular training crops")
    fit = fit_standardised_logistic(x, y, cfg.c, cfg.seed, class_weight="balanced")
    model = CropColour(model_cfg)
    model.load_state_dict({"mean": torch.tensor(fit.mean, dtype=torch.float32),
                           "scale": torch.tensor(fit.scale, dtype=torch.float32),
                           "weight": torch.tensor(fit.weight, dtype=torch.float32),
                           "bias": torch.tensor(fit.bias)})
    probs = colour_scores(model, val.images.float()).numpy()
    yv = val.non_regular.numpy()
    threshold = calibrate_threshold(yv, probs, space="logit")
    val_metrics = binary_metrics(yv, probs, threshold)
    # --c 1e-6 exported a model at validation ROC-AUC 0.0 that flagged every crop, unsaid (an audit)
    warn_if_weak(probs, val_metrics, "the colour model")
    per_source = {k: v.as_dict() for k, v in metrics_by_group(yv, probs, threshold, val.sources).items()}
    card = ModelCard(
        name="colour", architecture="crop_colour_logistic", config=model_cfg.as_dict(),
        input_size=[model_cfg.crop_side, model_cfg.crop_side],
        preprocessing={"crop": f"cervix box + margin, resized to {model_cfg.crop_side} px (the Deep SAD crop)",
                       "features": f"sqrt-normalised joint RGB histogram, {model_cfg.hist_bins} bins per channel"},
        classes=["regular", "non_regular"], thresholds={"probability": float(threshold)},
        training={"c": cfg.c, "synthesise": cfg.synthesise, "copies": cfg.copies, "seed": cfg.seed,
                  "n_train_rows": int(len(y)), "n_train_non_regular": int(y.sum()),
                  "fit": "sklearn LogisticRegression(class_weight='balanced') on standardised histograms",
                  "threshold_rule": "max F1 on validation crops, midpoint of the gap in logit space"},
        data=data_note or {},
        metrics={"val": val_metrics.as_dict(), "val_per_source": per_source},
    )
    return save_weights(model.state_dict(), Path(cfg.out_dir) / "colour", card)
