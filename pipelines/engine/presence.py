"""Stage 0 at run time: colour histograms and the detector's pooled FPN features for a batch
of decoded photos, and the presence head that turns them into a score.

The features are the detector's own FPN maps from the same pass that finds the boxes
(`pipelines.engine.detector.detect`, torch or exported convolutions alike), pooled over each
photo's own region of the padded batch, in training and in the engine alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.image_list import ImageList

from models.io import ModelCard, load_weights
from models.presence import PresenceConfig, PresenceHead
from pipelines.engine.detector import Convolutions, detect, shape_chunks


def colour_histograms(images: Sequence[torch.Tensor], bins: int = 8, side: int = 128) -> torch.Tensor:
    """uint8 CHW photos (any sizes, any device) -> sqrt-normalised joint RGB histograms [N, bins^3]
    of each photo resized to `side` on its long edge."""
    out = []
    for im in images:
        h, w = im.shape[-2:]
        f = side / max(h, w)
        small = F.interpolate(im.float()[None], size=(max(1, round(h * f)), max(1, round(w * f))), mode="bilinear",
                              antialias=True, align_corners=False)
        out.append(joint_histograms(small, bins)[0])
    return torch.stack(out) if out else torch.zeros(0, bins**3)


def joint_histograms(images: torch.Tensor, bins: int = 8) -> torch.Tensor:
    """A batch of same-size images [N, 3, H, W] valued 0..255 -> their sqrt-normalised joint RGB
    histograms [N, bins^3], on the CPU. Batched for the stage-2 crops, which need no resize: one
    image at a time through `colour_histograms`, 300 crops of 32 px took 0.29 s, batched 0.05 s,
    with identical histograms (2-core CPU)."""
    q = images.round().clamp(0, 255).long() * bins // 256
    idx = ((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]).flatten(1)
    ones = torch.ones(idx.shape, device=images.device)
    hist = torch.zeros(len(images), bins**3, device=images.device).scatter_add_(1, idx, ones)
    return (hist / hist.sum(1, keepdim=True)).sqrt().cpu()


def pool_features(maps: Sequence[torch.Tensor], batch: ImageList) -> torch.Tensor:
    """Mean- and max-pooled FPN maps per photo [N, D], each over the photo's own part of the
    padded batch. That part alone is not enough for features a photo keeps whatever its
    batch: the convolutions near its edge see the padding (a negative's stage-0 score read
    -0.87 alone, -0.23 padded for a larger neighbour), so batches hold one input shape
    (`detect_with_features`, the engine's `shape_chunks`)."""
    padded_h, padded_w = batch.tensors.shape[-2:]
    feats = []
    for k, (h, w) in enumerate(batch.image_sizes):
        parts = []
        for fmap in maps:
            fh, fw = fmap.shape[-2:]
            own = fmap[k, :, : math.ceil(h * fh / padded_h), : math.ceil(w * fw / padded_w)].float()
            parts += [own.mean((1, 2)), own.amax((1, 2))]
        feats.append(torch.cat(parts).cpu())
    return torch.stack(feats) if feats else torch.zeros(0, 0)


def detect_with_features(detector: nn.Module, images: Sequence[torch.Tensor], device: torch.device,
                         convolutions: Convolutions | None = None) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """The detector's detections plus the pooled FPN features stage 0 reads [N, D], run per
    input shape as the engine runs them, so that training features are the engine's."""
    dets: list = [None] * len(images)
    feats: list = [None] * len(images)
    for chunk in shape_chunks(detector.transform, [im.shape[-2:] for im in images], max(1, len(images))):
        out, maps, batch = detect(detector, [images[k] for k in chunk], device, convolutions)
        for k, d, f in zip(chunk, out, pool_features(maps, batch)):
            dets[k], feats[k] = d, f
    return dets, torch.stack(feats) if feats else torch.zeros(0, 0)


def other_detector(card_path: str | Path, card: ModelCard, detector_card: ModelCard) -> str | None:
    """What is wrong where a presence head was trained on another detector's features."""
    if card.config.get("detector_sha256") == detector_card.sha256:
        return None
    return (f"{card_path} was trained on the features of another detector "
            f"({str(card.config.get('detector_sha256'))[:12]}...); retrain it with this one")


def load_presence(card_path: str | Path, detector_card: ModelCard,
                  device: str | torch.device = "cpu") -> tuple[PresenceHead, ModelCard]:
    """The presence head, refused unless it was trained on this very detector's features."""
    state, card = load_weights(card_path, names=("presence",))
    mismatch = other_detector(card_path, card, detector_card)
    if mismatch:
        raise ValueError(mismatch)
    head = PresenceHead(PresenceConfig(**{k: v for k, v in card.config.items() if k != "detector_sha256"}))
    head.load_state_dict(state)
    return head.to(device).eval(), card
