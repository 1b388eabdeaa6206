"""Cervix crops for stage 2: one batched roi_align per image gives every crop size at once.

roi_align with sampling_ratio=-1 averages ceil(box/out) x ceil(box/out) samples per output
pixel, i.e. an area-averaging resize, which matches PIL's BOX downscale instead of the
aliasing of a 2x2 sample. The box is widened by `margin` (a share of its width and height on
each side), clipped to the image, then resized to a square, as the paper resizes its crops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import roi_align


def expand_boxes(boxes: torch.Tensor, margin: float, width: int, height: int) -> torch.Tensor:
    w = (boxes[:, 2] - boxes[:, 0]).clamp_min(1.0)
    h = (boxes[:, 3] - boxes[:, 1]).clamp_min(1.0)
    grown = boxes + torch.stack([-w, -h, w, h], dim=1) * margin
    grown[:, 0::2] = grown[:, 0::2].clamp(0, width)
    grown[:, 1::2] = grown[:, 1::2].clamp(0, height)
    return grown


def crop_boxes(
    images: Sequence[torch.Tensor],
    boxes: torch.Tensor,
    sizes: Sequence[int] = (32, 224),
    margin: float = 0.0,
) -> dict[int, torch.Tensor]:
    """Crop box i from image i (CHW, uint8 or float, any size) to every size in `sizes`.

    Returns {size: float32 tensor [N, 3, size, size]} in the input's value range. `boxes`
    are xyxy in each image's own pixels.
    """
    out = {s: [] for s in sizes}
    for image, box in zip(images, boxes):
        img = image.float()[None]
        b = expand_boxes(box[None].float().to(img.device), margin, img.shape[-1], img.shape[-2])
        rois = torch.cat([torch.zeros(1, 1, device=img.device), b], dim=1)
        for s in sizes:
            out[s].append(roi_align(img, rois, output_size=(s, s), spatial_scale=1.0,
                                    sampling_ratio=-1, aligned=True))
    return {s: torch.cat(v) if v else torch.zeros(0, 3, s, s) for s, v in out.items()}
