"""A third stage-2 scorer: a linear model on the cervix crop's colour histogram.

Why next to the two networks: green filter and Lugol's iodine are colours, and a whole-photo
colour-histogram regression beat the pipeline on the held-out real photos (issue 13). Alone it
carries badly to another rendering (trained on real + synthesised crops + synthetic scenes:
real validation F1 1.000, the never-trained synthetic source 0.84, where the networks'
`both` reads 0.941), so it is meant as the third vote of `two_of_three`, where its errors and
the networks' rarely fall on the same crop (weights/README.md, "Crop colour as a third vote").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CropColourConfig:
    hist_bins: int = 8  # per channel: 512 joint RGB bins
    crop_side: int = 32  # the engine's Deep SAD crop, read as it is

    def as_dict(self) -> dict:
        return asdict(self)


class CropColour(nn.Module):
    """sqrt-normalised colour histograms of crops [N, bins^3] -> P(non-regular) [N]: standardise,
    then a logistic regression fitted by scikit-learn (the buffers hold its coefficients)."""

    def __init__(self, cfg: CropColourConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = cfg.hist_bins**3
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("weight", torch.zeros(n))
        self.register_buffer("bias", torch.zeros(()))

    def forward(self, hist: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(((hist.float() - self.mean) / self.scale) @ self.weight + self.bias)
