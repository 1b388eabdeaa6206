"""Graph-exporter views of the models: one tensor in, a flat tuple of tensors out.

Exporters (OpenVINO's convert_model, ONNX) trace a module; dict outputs, Python-side
anchors and NMS do not survive that well, and they are not where the time goes. So the
detector's view is only its convolutions (backbone, FPN, head: 97% of its CPU time at 320
px on the 2-core machine, measured with the bundled detector: transform 1.3 ms, anchors
0.2 ms and box decoding + NMS 2.1 ms of 98 ms per batch of 4). Resizing, anchors, decoding
and NMS stay in torchvision at run time, so the exported and the torch detector share every
step after the convolutions, and `pipelines.engine.detector.detect` runs either.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection import RetinaNet

from models.classifier import RegularityClassifier
from models.deep_sad import DeepSAD

DETECTOR_OUTPUTS = ("cls_logits", "bbox_regression")  # followed by one feature map per FPN level
CLASSIFIER_OUTPUTS = ("logit", "kind_logits", "features")


class DetectorConvolutions(nn.Module):
    """Normalised, padded batch [N, 3, H, W] -> (cls_logits, bbox_regression, *FPN maps)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        if not isinstance(detector, RetinaNet):
            raise TypeError(f"only RetinaNet detectors run exported, not {type(detector).__name__}")
        self.backbone, self.head = detector.backbone, detector.head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = list(self.backbone(images).values())
        out = self.head(maps)
        return (out["cls_logits"], out["bbox_regression"], *maps)


class DeepSADDistance(nn.Module):
    """Crops [N, 3, 32, 32] in [0, 1] -> (distance to the centre,)."""

    def __init__(self, model: DeepSAD) -> None:
        super().__init__()
        self.model = model

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model.score(crops),)


class ClassifierOutputs(nn.Module):
    """Crops [N, 3, S, S] in [0, 1] -> (logit, kind_logits, features)."""

    def __init__(self, model: RegularityClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(crops)
        return tuple(out[k] for k in CLASSIFIER_OUTPUTS)


def exportable(model: nn.Module) -> nn.Module:
    """The exporter view of a loaded detector, Deep SAD or classifier."""
    if isinstance(model, DeepSAD):
        return DeepSADDistance(model)
    if isinstance(model, RegularityClassifier):
        return ClassifierOutputs(model)
    return DetectorConvolutions(model)
