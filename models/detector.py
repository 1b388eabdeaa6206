"""Stage 1: torchvision detectors (RetinaNet by default, Faster R-CNN and FCOS as hSDB
compared several) on ResNet or MobileNetV3 FPN backbones, built from one typed config.

Nothing can be downloaded here, so backbones start random unless the caller passes a
backbone state dict (an ImageNet file they have). Random backbones train with ordinary
BatchNorm: torchvision's default FrozenBatchNorm would freeze random statistics, i.e. no
normalisation at all. Pretrained ones keep FrozenBatchNorm, as torchvision's references do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

Arch = Literal["retinanet", "fasterrcnn", "fcos"]
Backbone = Literal["resnet50", "resnet34", "resnet18", "mobilenet_v3_large"]
ARCHS: tuple[str, ...] = ("retinanet", "fasterrcnn", "fcos")
BACKBONES: tuple[str, ...] = ("resnet50", "resnet34", "resnet18", "mobilenet_v3_large")


@dataclass(frozen=True)
class DetectorConfig:
    """Everything needed to rebuild the network; stored in the model card."""

    arch: Arch = "retinanet"
    backbone: Backbone = "resnet50"
    num_classes: int = 2  # counts the background: one-class cervix is 2, with label 1
    min_size: int = 512  # torchvision would upscale to 800 by default; the cervix is large
    max_size: int = 512
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 10
    pretrained_backbone: bool = False  # True: FrozenBatchNorm + partial training, as torchvision
    # Width of the FPN and so of RetinaNet's head (torchvision: 256). The head's eight 3x3
    # convolutions scale with its square: on the 2-core CPU, OpenVINO ran the mobilenet_v3
    # RetinaNet at 320 px in 37.7 ms per 4 images at 256 and 20.5 ms at 128 (backbone and FPN
    # alone: 16.3 and 14.4 ms).
    fpn_channels: int = 256

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown detector {self.arch!r}; choose from {ARCHS}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose from {BACKBONES}")
        if self.num_classes < 2:
            raise ValueError("num_classes counts the background and must be >= 2")
        if self.fpn_channels < 8:
            raise ValueError("fpn_channels must be >= 8")

    def as_dict(self) -> dict:
        return asdict(self)


def _fpn_backbone(cfg: DetectorConfig) -> nn.Module:
    norm = FrozenBatchNorm2d if cfg.pretrained_backbone else nn.BatchNorm2d
    trainable = 3 if cfg.pretrained_backbone else 5
    # RetinaNet and FCOS predict on P3-P7; Faster R-CNN on P2-P6 (its RPN's anchors).
    two_stage = cfg.arch == "fasterrcnn"
    ch = cfg.fpn_channels

    def extra() -> nn.Module:
        return LastLevelMaxPool() if two_stage else LastLevelP6P7(ch, ch)

    if cfg.backbone.startswith("resnet"):
        backbone = resnet_fpn_backbone(
            backbone_name=cfg.backbone, weights=None, norm_layer=norm, trainable_layers=trainable,
            returned_layers=[1, 2, 3, 4] if two_stage else [2, 3, 4], extra_blocks=extra(),
        )
    else:
        backbone = mobilenet_backbone(
            backbone_name=cfg.backbone, weights=None, fpn=True, norm_layer=norm,
            trainable_layers=3 if cfg.pretrained_backbone else 6, extra_blocks=extra(),
        )
    if ch != backbone.out_channels:
        # torchvision's builders fix the width at 256; the same FPN class at another width,
        # on the same backbone levels and with the same norm layer as theirs
        ins = [block[0].in_channels for block in backbone.fpn.inner_blocks]
        backbone.fpn = FeaturePyramidNetwork(ins, ch, extra_blocks=extra(), norm_layer=norm)
        backbone.out_channels = ch
    return backbone


def _anchor_generator(n_levels: int) -> AnchorGenerator:
    """RetinaNet's 3 scales x 3 ratios per level, for however many levels the FPN has."""
    bases = [32 * 2**i for i in range(n_levels)]
    sizes = tuple((b, int(b * 2 ** (1 / 3)), int(b * 2 ** (2 / 3))) for b in bases)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * n_levels)


def _count_levels(backbone: nn.Module, size: int = 64) -> int:
    with torch.no_grad():
        was = backbone.training
        backbone.eval()
        n = len(backbone(torch.zeros(1, 3, size, size)))
        backbone.train(was)
    return n


def build_detector(cfg: DetectorConfig, backbone_state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A torchvision detector: in training it returns its loss dict, in eval its boxes,
    so one training loop serves every architecture (the torchvision references' contract)."""
    backbone = _fpn_backbone(cfg)
    if backbone_state is not None:
        # a classification network's file holds its head too (torchvision's resnet: fc.*), which
        # the detector's body has no place for: it was refused as "unexpected" (an audit)
        parts = {k.split(".")[0] for k in backbone.body.state_dict()}
        heads = sorted({k.split(".")[0] for k in backbone_state} - parts)
        missing, unexpected = backbone.body.load_state_dict(
            {k: v for k, v in backbone_state.items() if k.split(".")[0] in parts}, strict=False)
        if unexpected or len(missing) == len(backbone.body.state_dict()):
            raise ValueError(f"backbone weights do not fit {cfg.backbone}: unexpected {(unexpected or heads)[:5]}")
    common = dict(min_size=cfg.min_size, max_size=cfg.max_size)
    if cfg.arch == "retinanet":
        levels = _count_levels(backbone)
        return RetinaNet(backbone, cfg.num_classes, anchor_generator=_anchor_generator(levels),
                         score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh,
                         detections_per_img=cfg.detections_per_img, **common)
    if cfg.arch == "fcos":
        levels = _count_levels(backbone)  # one anchor point per location and level
        points = AnchorGenerator(tuple((8 * 2**i,) for i in range(levels)), ((1.0,),) * levels)
        return FCOS(backbone, cfg.num_classes, anchor_generator=points,
                    score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh,
                    detections_per_img=cfg.detections_per_img, **common)
    levels = _count_levels(backbone)
    rpn_anchors = AnchorGenerator(tuple((32 * 2**i,) for i in range(levels)), ((0.5, 1.0, 2.0),) * levels)
    return FasterRCNN(backbone, cfg.num_classes, rpn_anchor_generator=rpn_anchors,
                      box_score_thresh=cfg.score_thresh, box_nms_thresh=cfg.nms_thresh,
                      box_detections_per_img=cfg.detections_per_img, **common)
