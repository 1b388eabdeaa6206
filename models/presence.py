"""Stage 0: is there a cervix in the photo at all?

Two linear heads on what the engine computes anyway, their logits standardised and summed:
one on the photo's colour histogram, one on the detector's own FPN features (mean and max
pooled over each level). Why not a network of its own: trained from scratch on the few
hundred real photos there are, a ResNet-18 presence classifier (128 px, 30 epochs) reached
validation ROC-AUC 0.97 but called only 46% of the held-out repositories' non-cervix photos
no_cervix, against 92% for these two heads together (validation-chosen thresholds, fold-0
test split; README). Small linear models on features learnt from more data generalise to
unseen collections; the big one learnt its training repositories. The detector's box score
alone separates worse still: a cervix close-up is a frame full of pink tissue, and so are a
wound bed or a throat.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PresenceConfig:
    hist_bins: int = 8  # per channel: 512 joint RGB bins
    feature_dim: int = 2048  # the detector's pooled FPN features
    hist_side: int = 128  # the photo is resized to this long side before its histogram
    # the colour head's share of the sum (the feature head's is 1); cards before it read 1.0.
    # What other shares did with each training source left out: PresenceTrainConfig.
    colour_weight: float = 1.0

    def as_dict(self) -> dict:
        return asdict(self)


class PresenceHead(nn.Module):
    """(sqrt-normalised colour histograms [N, bins^3], pooled detector features [N, D]) ->
    a presence score per photo (larger: a cervix; the card's threshold decides)."""

    def __init__(self, cfg: PresenceConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hist_bins**3, cfg.feature_dim
        for name, n in (("hist", h), ("feat", d)):
            self.register_buffer(f"{name}_mean", torch.zeros(n))
            self.register_buffer(f"{name}_scale", torch.ones(n))
            self.register_buffer(f"{name}_weight", torch.zeros(n))
            self.register_buffer(f"{name}_bias", torch.zeros(()))
            # each head's logit is standardised by its spread on the training photos before the sum
            self.register_buffer(f"{name}_logit_mean", torch.zeros(()))
            self.register_buffer(f"{name}_logit_scale", torch.ones(()))

    def head_logit(self, name: str, x: torch.Tensor) -> torch.Tensor:
        z = (x - getattr(self, f"{name}_mean")) / getattr(self, f"{name}_scale")
        return z @ getattr(self, f"{name}_weight") + getattr(self, f"{name}_bias")

    def forward(self, hist: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        out = 0
        for name, x, share in (("hist", hist, self.cfg.colour_weight), ("feat", feats, 1.0)):
            logit = self.head_logit(name, x.float())
            out = out + share * (logit - getattr(self, f"{name}_logit_mean")) / getattr(self, f"{name}_logit_scale")
        return out
