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
from typing import Callable

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from models.io import ModelCard, load_card, save_weights
from models.presence import PresenceConfig, PresenceHead
from pipelines.data.images import load_rgb
from pipelines.engine.detector import load_detector
from pipelines.evaluation.classification import margin_threshold
from pipelines.training.linear import fit_standardised_logistic
from pipelines.engine.presence import colour_histograms, detect_with_features

log = logging.getLogger(__name__)
_CERVIX = ("regular", "green", "iodine")


@dataclass
class PresenceTrainConfig:
    out_dir: Path
    c_hist: float = 0.1  # inverse L2 strength of each regression (strong: a few hundred photos)
    c_feat: float = 0.01
    batch_size: int = 8
    seed: int = 0
    # Each extra photo's weight against a main one (before the classes are balanced). Measured
    # on validation (real val found / rejected, synthetic `archive` val found): 1.0 gave
    # 0.915 / 0.987 / 0.987, 0.05 gave 0.981 / 0.974 / 0.987, 0.01 0.981 / 0.987 / 0.815: a few
    # hundred real photos must not be outvoted by a thousand synthetic scenes, yet the scenes
    # must still count enough for synthetic cervixes to pass.
    extra_weight: float = 0.05
    # The colour head's share of the summed score (PresenceConfig.colour_weight). Measured by
    # leaving each source out (`new_source_rates`, bundled data, 2026-12-01): colour alone found
    # 0.41 of a left-out cervix source's photos, features alone 0.87 (other organs 0.84 / 0.92);
    # 0.75 raised every left-out rate over 1.0 (cervix sources pooled 0.741 -> 0.810, other
    # organs 0.935 -> 0.948) but called one more validation negative a cervix (whole pipeline
    # 0.974 vs 0.980), so by the rule fixed beforehand (validation balanced accuracy no worse)
    # 1.0 stays; a site can weigh its own `metrics.new_source` the same way.
    colour_weight: float = 1.0
    # Zoomed copies of each main training photo (a random part of 35-100% of its area, its own
    # aspect), each weighted zoom_weight; off by default. Measured 2026-12-01 on the bundled data
    # (weights/README.md, "Zoomed copies"): two copies at 0.25 raised the left-out-source rates
    # (cervix sources pooled 0.741 -> 0.803, other organs 0.935 -> 0.943) and passed validation
    # (whole pipeline found 0.991 -> 0.981, no_cervix 0.980 -> 0.993), but the never-trained
    # synthetic source's cervixes were found 0.963 -> 0.881 (the copies dilute the synthetic
    # scenes' share); with that share restored (extra_weight 0.075) still 0.941. Cervix-only
    # copies (left-out cervix rate 0.810, but stage 0 found 0.962 of the validation cervixes and
    # 0.904 of the synthetic `archive` ones), negative-only copies (0.724) and photometric
    # jitter (0.637: colour is what tells a cervix from other tissue) were no better. A site
    # whose photos are close-ups can try it against its own validation split.
    zoom_copies: int = 0
    zoom_weight: float = 0.25
    zoom_min_area: float = 0.35
    # Copies of each main training photo turned by a quarter (1: 90 degrees; 2: 90 and 270),
    # each weighted turn_weight; off by default. A photo turned in its pixels (no EXIF tag)
    # changed 6.2% of the validation labels, 12 of 16 regular to no_cervix (README,
    # Limitations; tests/benchmarks/label_stability.py). Measured 2026-12-05 (weights/README.md,
    # "Quarter-turned copies"): two copies at 1.0 cut those changes (16 -> 9 at 90 degrees) but
    # found fewer validation cervixes (0.991 -> 0.962) and synthetic `teaching` ones (0.959 ->
    # 0.781); at 0.25 validation read the same. Not kept.
    turn_copies: int = 0
    turn_weight: float = 1.0


def zoomed(image: torch.Tensor, min_area: float, generator: torch.Generator) -> torch.Tensor:
    """A random part of a uint8 CHW photo with its aspect, `min_area`-1 of its area: the close-ups
    and other framings a new site films. Not v2.RandomResizedCrop: it resizes to one fixed size
    and draws its own aspect, where stage 0 must see the photo as the engine decodes it."""
    h, w = image.shape[-2:]
    side = float(torch.empty(()).uniform_(min_area, 1.0, generator=generator)) ** 0.5
    ch, cw = max(8, int(h * side)), max(8, int(w * side))
    y = int(torch.randint(0, h - ch + 1, (), generator=generator))
    x = int(torch.randint(0, w - cw + 1, (), generator=generator))
    return image[:, y : y + ch, x : x + cw]


@dataclass
class PhotoFeatures:
    hist: np.ndarray
    feats: np.ndarray
    labels: np.ndarray  # 1: a cervix, 0: none
    sources: np.ndarray


def photo_features(detector, max_size: int, df: pd.DataFrame, device: torch.device,
                   batch_size: int = 8, augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> PhotoFeatures:
    """Features of every row of known kind of a loaded manifest, decoded as the engine decodes
    (then `augment`ed, for training copies)."""
    rows = df[df["kind"].isin([*_CERVIX, "no_cervix"])]
    hist, feats = [], []
    paths = list(rows["abspath"])
    for start in range(0, len(paths), batch_size):
        images = [load_rgb(Path(p), 2 * max_size)[0] for p in paths[start : start + batch_size]]
        if augment is not None:
            images = [augment(im) for im in images]
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


def concat(parts: list[PhotoFeatures]) -> PhotoFeatures:
    return PhotoFeatures(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("hist", "feats", "labels", "sources")))


def balanced_weights(labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Row weights rescaled so that both classes carry the same total (sklearn's "balanced",
    but on weighted totals, so down-weighted extra rows do not tilt the classes)."""
    out = weights.astype(np.float64).copy()
    for c in (0, 1):
        m = labels == c
        out[m] *= (out.sum() / 2) / out[m].sum()
    return out


def fit_head(train: PhotoFeatures, cfg: PresenceTrainConfig, weights: np.ndarray | None = None) -> PresenceHead:
    head = PresenceHead(PresenceConfig(feature_dim=train.feats.shape[1], colour_weight=cfg.colour_weight))
    state = head.state_dict()
    w = balanced_weights(train.labels, np.ones(len(train.labels)) if weights is None else weights)
    for name, x, c in (("hist", train.hist, cfg.c_hist), ("feat", train.feats, cfg.c_feat)):
        fit = fit_standardised_logistic(x, train.labels, c, cfg.seed, sample_weight=w)
        logits = fit.logits(x)
        for key, value in (("mean", fit.mean), ("scale", fit.scale), ("weight", fit.weight), ("bias", fit.bias),
                           ("logit_mean", logits.mean()), ("logit_scale", logits.std() + 1e-6)):
            state[f"{name}_{key}"] = torch.as_tensor(value, dtype=torch.float32).reshape(state[f"{name}_{key}"].shape)
    head.load_state_dict(state)
    return head.eval()


def fit_with_extra(main: PhotoFeatures, extra: PhotoFeatures | None, cfg: PresenceTrainConfig,
                   copies: list[tuple[PhotoFeatures, float]] = ()) -> PresenceHead:
    """The head fitted on the main photos plus the extra ones, each extra row weighted
    `cfg.extra_weight`, and the main photos' copies (zoomed, turned), each with its weight."""
    parts = [(main, 1.0), *copies, (extra, cfg.extra_weight)]
    parts = [(p, w) for p, w in parts if p is not None and len(p.labels)]
    weights = np.concatenate([np.full(len(p.labels), w) for p, w in parts])
    return fit_head(concat([p for p, _ in parts]), cfg, weights)


def select(f: PhotoFeatures, mask: np.ndarray) -> PhotoFeatures:
    return PhotoFeatures(f.hist[mask], f.feats[mask], f.labels[mask], f.sources[mask])


def new_source_rates(main: PhotoFeatures, val: PhotoFeatures, extra: PhotoFeatures | None,
                     cfg: PresenceTrainConfig, copies: list[tuple[PhotoFeatures, float]] = ()) -> dict:
    """Each source of the main photos left out once: the head fitted without it, the threshold
    chosen by the same rule on the other sources' validation rows, then judged on all of the
    left-out source's rows (train + val): the share it gets right (cervix found on a cervix
    source, no_cervix called on a source of other organs). Validation pooled over the known
    sources cannot say how the head fares at a site unlike them; this can, and on the bundled
    weights it is what a new site should expect (weights/README.md). A source whose absence
    leaves either side with one class is skipped. Extra (synthetic) rows always stay in; the
    left-out source's copies go with it."""
    out: dict = {}
    for source in sorted({str(s) for s in main.sources}):
        keep_train, keep_val = main.sources != source, val.sources != source
        kept_train, kept_val = select(main, keep_train), select(val, keep_val)
        if len(set(kept_train.labels.tolist())) < 2 or len(set(kept_val.labels.tolist())) < 2:
            continue
        kept_copies = [(select(c, c.sources != source), w) for c, w in copies]
        head = fit_with_extra(kept_train, extra, cfg, kept_copies)
        threshold, _ = balanced_threshold(kept_val.labels, score(head, kept_val))
        held = concat([select(main, ~keep_train), select(val, ~keep_val)])
        right = (score(head, held) >= threshold) == (held.labels == 1)
        out[source] = {"n": int(len(right)), "n_cervix": int(held.labels.sum()), "correct": float(right.mean()),
                       "threshold": float(threshold)}
    for kind, whole in (("cervix_sources", lambda v: v["n_cervix"] == v["n"]),
                        ("other_sources", lambda v: v["n_cervix"] == 0)):
        rows = [v for k, v in out.items() if not k.startswith("pooled_") and whole(v)]
        n = sum(v["n"] for v in rows)
        if n:
            out[f"pooled_{kind}"] = {"n": n, "sources": len(rows),
                                     "correct": sum(v["correct"] * v["n"] for v in rows) / n}
    return out


@torch.no_grad()
def score(head: PresenceHead, f: PhotoFeatures) -> np.ndarray:
    return head(torch.as_tensor(f.hist), torch.as_tensor(f.feats)).numpy()


def presence_rates(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    pred = scores >= threshold
    return {"cervix_found": float(pred[y == 1].mean()), "n_cervix": int((y == 1).sum()),
            "no_cervix_called": float((~pred[y == 0]).mean()), "n_no_cervix": int((y == 0).sum()),
            "roc_auc": float(roc_auc_score(y, scores)), "threshold": threshold}


FEW_PHOTOS = 20  # per class in validation: below it, one photo moves the threshold's figures by 5 points


def check_counts(train_df: pd.DataFrame, val_df: pd.DataFrame, extra_df: pd.DataFrame | None) -> None:
    """Both classes in training (the extra photos count) and in validation, checked before a
    photo is read: a site without no-cervix photos learnt so only after every photo's features
    (21 s for 400), with no counts and no way on; one negative trained without a word (an audit)."""
    def counts(df: pd.DataFrame | None) -> tuple[int, int]:
        kinds = pd.Series(dtype=str) if df is None else df["kind"]
        return int(kinds.isin(_CERVIX).sum()), int((kinds == "no_cervix").sum())

    (tc, tn), (ec, en), (vc, vn) = counts(train_df), counts(extra_df), counts(val_df)
    for name, cervix, none in (("training", tc + ec, tn + en), ("validation", vc, vn)):
        if not cervix or not none:
            raise ValueError(
                f"presence {name} photos need some with and some without a cervix: {cervix} with, {none} without "
                f"(training {tc} + {ec} extra with, {tn} + {en} extra without; validation {vc} with, {vn} "
                "without). Add photos without a cervix (other organs, a covered lens, the room) with kind "
                "no_cervix: import them with `cervixqc import-labels`, `cervixqc merge-manifests` them in and split "
                "again; synthetic scenes (--extra-manifest) add training photos only. Without any, keep the "
                "bundled presence head")
    if min(vc, vn) < FEW_PHOTOS:
        log.warning("presence validation has %d photos with a cervix and %d without: the threshold and its "
                    "figures rest on few photos (%d or more of each are better)", vc, vn, FEW_PHOTOS)


def train_presence(cfg: PresenceTrainConfig, detector_card: Path, train_df: pd.DataFrame, val_df: pd.DataFrame,
                   device: torch.device, data_note: dict | None = None, extra_df: pd.DataFrame | None = None) -> Path:
    """`extra_df` (e.g. synthetic scenes) joins training only, each row weighted
    `cfg.extra_weight`; the threshold comes from `val_df` alone."""
    check_counts(train_df, val_df, extra_df)
    detector, det_card = load_detector(detector_card, device)  # a card that cannot load: named with it
    max_size = det_card.config["max_size"]
    main, val = (photo_features(detector, max_size, d, device, cfg.batch_size) for d in (train_df, val_df))
    extra = (photo_features(detector, max_size, extra_df, device, cfg.batch_size)
             if extra_df is not None and len(extra_df) else None)
    # Each copy pass decodes the training photos again: making all copies from one decode put
    # each photo and its smaller copies in one padded detector batch, which was slower (the
    # bundled data, two copies: 182 s against 135 s for the whole command).
    generator = torch.Generator().manual_seed(cfg.seed)
    def copies_by(augments: list[Callable[[torch.Tensor], torch.Tensor]]) -> PhotoFeatures | None:
        return concat([photo_features(detector, max_size, train_df, device, cfg.batch_size, a)
                       for a in augments]) if augments else None

    zooms = copies_by([lambda im: zoomed(im, cfg.zoom_min_area, generator)] * cfg.zoom_copies)
    turns = copies_by([lambda im, k=k: torch.rot90(im, k, dims=(1, 2)) for k in (1, 3)[: cfg.turn_copies]])
    copies = [(c, w) for c, w in ((zooms, cfg.zoom_weight), (turns, cfg.turn_weight)) if c is not None]
    train = main if extra is None else concat([main, extra])
    head = fit_with_extra(main, extra, cfg, copies)
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
                  "detector": str(detector_card), "fit": "sklearn LogisticRegression per feature set on standardised "
                  "inputs, classes balanced on weighted totals, extra photos weighted extra_weight, zoom_copies "
                  "zoomed copies of each main photo weighted zoom_weight, turn_copies quarter-turned copies "
                  "weighted turn_weight; logits "
                  "standardised on the training photos and summed",
                  "n_train": {"cervix": int(train.labels.sum()), "no_cervix": int((train.labels == 0).sum())},
                  "n_train_extra": 0 if extra is None else int(len(extra.labels)),
                  "n_train_zoomed": 0 if zooms is None else int(len(zooms.labels)),
                  "n_train_turned": 0 if turns is None else int(len(turns.labels)),
                  "train_sources": sorted({str(s) for s in train.sources}),
                  "threshold_rule": "max balanced accuracy (cervix found, no_cervix called) on the validation "
                                    "split pooled over sources; then the middle of the gap under that cut"},
        data=data_note or {},
        metrics={"val": presence_rates(val.labels, val_scores, threshold) | {"per_source": by_source},
                 "new_source": new_source_rates(main, val, extra, cfg, copies)},
    )
    return save_weights(head.state_dict(), Path(cfg.out_dir) / "presence", card)
