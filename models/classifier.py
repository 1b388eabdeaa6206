"""ResNeSt (timm `resnest50d`) with two heads: regular vs non-regular (one logit, the paper's
binary task) and regular / green / iodine (so a result can say which kind).

Works at 32x32 and 224x224 input alike (global pooling). ImageNet weights come only from a
local file (nothing can be downloaded); tests use `resnest14d`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

KINDS = ("regular", "green", "iodine")


@dataclass(frozen=True)
class ClassifierConfig:
    arch: str = "resnest50d"
    input_size: int = 224
    drop_rate: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class RegularityClassifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig, pretrained_file: str | None = None) -> None:
        import timm  # here, not at the top: an engine running the exported classifier never imports timm (40 MB RSS)

        super().__init__()
        self.cfg = cfg
        kwargs = {}
        if pretrained_file is not None:
            kwargs = {"pretrained": True, "pretrained_cfg_overlay": {"file": pretrained_file}}
        self.backbone = timm.create_model(cfg.arch, num_classes=0, drop_rate=cfg.drop_rate, **kwargs)
        self.head_binary = nn.Linear(self.backbone.num_features, 1)
        self.head_kind = nn.Linear(self.backbone.num_features, len(KINDS))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled features (what the paper's t-SNE plots)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.forward_features(x)
        return {"logit": self.head_binary(f).squeeze(1), "kind_logits": self.head_kind(f), "features": f}


def class_weights(labels: torch.Tensor, n_classes: int = 2) -> torch.Tensor:
    """The paper's weights: N / (n_classes * n_c) per class (0 for an absent class)."""
    return balanced_weights(torch.bincount(labels.long(), minlength=n_classes).float())


def balanced_weights(counts: torch.Tensor) -> torch.Tensor:
    """`class_weights` from each class's count, which may be an expected one (crops relabelled
    at random while training: `CropDataset.label_counts`)."""
    counts = counts.float()
    return torch.where(counts > 0, counts.sum() / (len(counts) * counts.clamp_min(1e-12)), torch.zeros_like(counts))
