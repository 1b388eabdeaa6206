"""Named augmentation recipes (the torchvision references' presets.py), box-aware via
transforms.v2. Hard on purpose: the models meet other devices and clinics than ours."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from pipelines.data.transforms import GreenFilter, LugolIodine


def detection_train(hard: bool = True) -> v2.Compose:
    """Photometric jitter, flips, zoom-out + IoU crop (scale jitter), blur, JPEG, and our
    green/iodine looks (the box does not care about the kind)."""
    ops: list = [
        v2.RandomPhotometricDistort(p=0.8),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomApply([v2.RandomZoomOut(fill=0, side_range=(1.0, 2.0))], p=0.3),
        v2.RandomIoUCrop(min_scale=0.4, sampler_options=[0.5, 0.7, 0.9, 2.0]),
    ]
    if hard:
        ops += [
            v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(0.3, 3.0))], p=0.2),
            v2.RandomApply([v2.JPEG(quality=(30, 95))], p=0.3),
            v2.RandomApply([GreenFilter()], p=0.05),
            v2.RandomApply([LugolIodine()], p=0.05),
        ]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes(labels_getter=_labels)]
    return v2.Compose(ops)


def detection_eval() -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])


def _labels(sample):
    return sample[1]["labels"]
