"""Named augmentation recipes (the torchvision references' presets.py), box-aware via
transforms.v2. Hard on purpose: the models meet other devices and clinics than ours."""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from pipelines.data.marks import ClinicianMarks
from pipelines.data.transforms import GreenFilter, LugolIodine


class PhotometricDistortKeepingChannels(v2.RandomPhotometricDistort):
    """torchvision's RandomPhotometricDistort without its channel permutation, the same draws
    made (so a run's other augmentations draw as they did)."""

    def make_params(self, flat_inputs: list) -> dict:
        return super().make_params(flat_inputs) | {"channel_permutation": None}


class QuarterTurn(v2.RandomRotation):
    """A turn by exactly 90 degrees (torch.rot90's pixels, boxes moved exactly), through
    torchvision's RandomRotation with expand=True. torchvision 0.28 leaves an empty box list's
    canvas at the unturned size (`_affine_bounding_boxes_with_expand` returns early), and the
    next box-aware transform then refused a photo with no cervix ("Found multiple HxW
    dimensions"): the canvas is turned here too."""

    def __init__(self) -> None:
        super().__init__(degrees=(90, 90), expand=True)

    def transform(self, inpt, params: dict):
        out = super().transform(inpt, params)
        if isinstance(inpt, tv_tensors.BoundingBoxes) and inpt.numel() == 0:
            h, w = inpt.canvas_size
            out = tv_tensors.wrap(out, like=inpt, canvas_size=(w, h))
        return out


def detection_train(hard: bool = True, permute_channels: bool = True, quarter_turns: bool = False) -> v2.Compose:
    """Photometric jitter, flips, zoom-out + IoU crop (scale jitter), blur, JPEG, and our
    green/iodine looks (the box does not care about the kind).

    torchvision's RandomPhotometricDistort(p=0.8) also permutes the colour channels with
    probability p: about two thirds of the training photos (5 of 6 orders change something)
    show a green or blue cervix. Every shipped detector trained so; the presence head reads the
    detector's features, and colour is what tells a cervix from other pink tissue (weights/
    README, stage 0). `permute_channels=False` (`train-detector --no-permute-channels`) keeps
    the rest of the jitter. Measured against the shipped detector (weights/README, "A detector
    trained without channel permutation"): its presence head rejected more other organs of a
    left-out source and found fewer left-out cervixes, so the default stays torchvision's.

    The flips give four of a photo's eight right-angle poses; `quarter_turns` (`train-detector
    --quarter-turns`) turns half the photos by 90 degrees as well, so all eight come equally
    often. A photo stored turned without an EXIF tag is a real case (README, "Limitations":
    quarter-turned copies changed 6% of validation labels). Off by default: against the same
    fine-tune without it, the presence head on it found fewer cervixes and its turned photos
    changed as many labels (weights/README, "Quarter turns in the detector")."""
    ops: list = [
        v2.RandomPhotometricDistort(p=0.8) if permute_channels else PhotometricDistortKeepingChannels(p=0.8),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
    ]
    if quarter_turns:
        ops.append(v2.RandomApply([QuarterTurn()], p=0.5))
    ops += [
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


def classification_train(size: int, marks: float = 0.0) -> v2.Compose:
    """The paper's geometric recipe (RandomResizedCrop, RandomRotation, RandomHorizontalFlip)
    plus the photometric part the brief asks for (colour, blur, JPEG), on float crops in [0, 1].

    Hue moves at most 0.02 and saturation 20%: the green filter and Lugol's iodine *are*
    colour, and a stronger hue jitter turns a regular crop into a plausible green one. Blur
    and JPEG stand in for other cameras; their strength scales with the input size.
    `marks` is the share of crops that get a clinician's drawn marks first (pipelines.data.marks).
    """
    kernel = max(3, (size // 32) | 1)
    to_jpeg_and_back = v2.Compose([v2.ToDtype(torch.uint8, scale=True), v2.JPEG(quality=(40, 95)),
                                   v2.ToDtype(torch.float32, scale=True)])
    return v2.Compose([
        *_marks(marks),
        v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True),
        v2.RandomRotation(15),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.2, hue=0.02)], p=0.8),
        v2.RandomApply([v2.GaussianBlur(kernel_size=kernel, sigma=(0.1, max(0.3, size / 128)))], p=0.25),
        v2.RandomApply([to_jpeg_and_back], p=0.3),
    ])


def deep_sad_train(marks: float = 0.0) -> v2.Compose:
    """Flips only: the hypersphere is a model of what regular tissue looks like, so nothing
    that changes colour or texture (either could make a regular crop look anomalous). Drawn
    marks (`marks` > 0) are the one option: they are on regular photos too. On the bundled
    models they hardly moved the distances (weights/README.md, "Drawn marks"), hence off."""
    return v2.Compose([*_marks(marks), v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()])


def _marks(p: float) -> list:
    return [v2.RandomApply([ClinicianMarks()], p=p)] if p > 0 else []


def classification_eval(size: int) -> v2.Compose:
    """Crops are cut at 8/7 of the input size, so the centre crop has room (the paper's CenterCrop)."""
    return v2.Compose([v2.CenterCrop(size)])


def _labels(sample):
    return sample[1]["labels"]
