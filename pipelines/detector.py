"""Running a trained detector: load it from its card, predict on batches, map boxes back to
the COCO file's (full-resolution) pixels and category ids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from models.detector import DetectorConfig, build_detector
from models.io import ModelCard, load_weights
from pipelines.data.detection import CocoDetection, collate


def load_detector(card_path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    state, card = load_weights(card_path)
    model = build_detector(DetectorConfig(**card.config))
    model.load_state_dict(state)
    return model.to(device).eval(), card


@torch.inference_mode()
def predict(model: nn.Module, images: Sequence[torch.Tensor], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Float CHW images in [0, 1] -> torchvision detections (boxes in the images' pixels)."""
    model.eval()
    outs = model([im.to(device, non_blocking=True) for im in images])
    return [{k: v.cpu() for k, v in o.items()} for o in outs]


def predict_dataset(model: nn.Module, dataset: CocoDetection, device: torch.device, batch_size: int = 8,
                    workers: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """Image id -> detections in the COCO file's pixels with COCO category ids."""
    cat_of = {label: cid for cid, label in dataset.label_of.items()}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)
    result = {}
    for images, targets in loader:
        for det, tgt in zip(predict(model, images, device), targets):
            sx, sy = tgt["scale"].tolist()
            boxes = det["boxes"] / torch.tensor([sx, sy, sx, sy])
            labels = torch.tensor([cat_of[int(v)] for v in det["labels"]], dtype=torch.int64)
            result[int(tgt["image_id"])] = {"boxes": boxes, "scores": det["scores"], "labels": labels}
    return result
