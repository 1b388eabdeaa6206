"""Cervix crops for stage 2: each box area-averaged to every crop size, two weight products.

The box is widened by `margin` (a share of its width and height on each side), clipped to
the image, then resized to a square, as the paper resizes its crops. Each output pixel is
the exact area average of its bin of the box, sub-pixel edges included (PIL's BOX filter):
a [size, h] weight matrix per axis, `wy @ region @ wx.T`, over the box's pixels only. So a
crop does not alias whatever resolution the photo was decoded at.

Why not roi_align (the first version): with sampling_ratio=-1 it also area-averages, but
through bilinear samples over the whole image tensor; on the 2-core CPU it took 8.8 ms per
photo for the 32 and 37 px crops of 30 real photos decoded at 640 px, and the batched
engine's crop stage was slower than a naive PIL loop. adaptive_avg_pool2d was as fast as
the matmuls but its whole-pixel bins overlap when the box is under twice the crop size (mean
error 9.6 grey levels against PIL's BOX on a 40 px box to 32).

On the CPU the row weights go through torch's sparse CSR product (`weigh_rows`); the
column weights act on the few rows left and stay dense.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF


def expand_boxes(boxes: torch.Tensor, margin: float, width: int, height: int) -> torch.Tensor:
    w = (boxes[:, 2] - boxes[:, 0]).clamp_min(1.0)
    h = (boxes[:, 3] - boxes[:, 1]).clamp_min(1.0)
    grown = boxes + torch.stack([-w, -h, w, h], dim=1) * margin
    grown[:, 0::2] = grown[:, 0::2].clamp(0, width)
    grown[:, 1::2] = grown[:, 1::2].clamp(0, height)
    return grown


def band_weights(start: float, end: float, first: int, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The weights of `size` equal bins of [start, end) over pixels first..first+count-1
    (pixel k covers [k, k+1)), rows summing to 1: each bin's share of each pixel when bins
    are wider than a pixel (area average), linear interpolation at the bin centres when they
    are narrower (a box smaller than the crop; roi_align's and PIL's BILINEAR upsample).

    Only a bin's own pixels carry weight (about step + 1 of them), so they come as a band:
    pixel indices from 0 at `first` and their weights, both [size, K], weight 0 where a row
    needs fewer than K. In numpy: a photo needs four of these, and torch's per-operation cost
    on such small arrays was a third of the crop stage (measured with torch's profiler on the
    engine's 298 crops of the 300 real-mix photos)."""
    step = (end - start) / size
    if step < 1.0:
        centres = np.clip(start + step * (np.arange(size)[:, None] + 0.5) - 0.5, first, first + count - 1)
        px = np.floor(centres) + np.arange(2)
        weights = np.clip(1 - np.abs(centres - px), 0, None)
    else:
        edges = start + step * np.arange(size + 1)
        px = np.floor(edges[:-1, None]) + np.arange(math.ceil(step) + 1)
        weights = np.clip(np.minimum(edges[1:, None], px + 1) - np.maximum(edges[:-1, None], px), 0, None)
    weights = np.where((px >= first) & (px < first + count), weights, 0.0)
    weights /= np.maximum(weights.sum(1, keepdims=True), 1e-12)
    return (px - first).clip(0, count - 1).astype(np.int64), weights.astype(np.float32)


def _dense(cols: np.ndarray, weights: np.ndarray, count: int) -> torch.Tensor:
    dense = np.zeros((len(cols), count), np.float32)
    np.add.at(dense, (np.arange(len(cols))[:, None], cols), weights)  # a row's unused slots add 0
    return torch.from_numpy(dense)


def box_weights(start: float, end: float, first: int, count: int, size: int) -> torch.Tensor:
    """`band_weights` as a dense [size, count] matrix."""
    return _dense(*band_weights(start, end, first, count, size), count)


def _rows_csr(bands: Sequence[tuple[np.ndarray, np.ndarray]], count: int) -> torch.Tensor:
    """Bands stacked row after row as one sparse CSR [sum of sizes, count] matrix; a row's
    unused slots are left out, so its columns are distinct and ascending."""
    keep = [w > 0 for _, w in bands]
    cols = np.concatenate([c[k] for (c, _), k in zip(bands, keep)])
    weights = np.concatenate([w[k] for (_, w), k in zip(bands, keep)])
    crow = np.concatenate([[0], np.cumsum(np.concatenate([k.sum(1) for k in keep]))])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is long stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(cols), torch.from_numpy(weights),
                                       size=(len(crow) - 1, count))


def _box_pixels(image: torch.Tensor, box: torch.Tensor, margin: float) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """The box widened by `margin` and clipped to the image (x1, y1, x2, y2, at least 1e-3
    wide), and the whole pixels it touches (left, top, right, bottom: at least one)."""
    height, width = image.shape[-2:]
    x1, y1, x2, y2 = expand_boxes(box[None].float().cpu(), margin, width, height)[0].tolist()
    x2, y2 = max(x2, x1 + 1e-3), max(y2, y1 + 1e-3)
    left, top = min(int(x1), width - 1), min(int(y1), height - 1)
    right, bottom = max(left + 1, min(width, math.ceil(x2))), max(top + 1, min(height, math.ceil(y2)))
    return (x1, y1, x2, y2), (left, top, right, bottom)


def weigh_rows(bands: Sequence[tuple[np.ndarray, np.ndarray]], planes: torch.Tensor) -> torch.Tensor:
    """The row bands (`band_weights`, stacked) applied to float [C, H, W] planes -> [C, S, W].

    A dense [S, H] product does S times the work the band needs, and on the 2-core CPU it
    already ran at the cores' peak (126 GFLOP/s). torch's sparse CSR product does only the
    band's multiply-adds: measured on the engine's 298 crops of the 300 real-mix photos
    replayed (boxes of ~300k pixels to 32 and 37 px), 0.33-0.36 s against 0.55-0.60 s for
    the whole crop, in alternating rounds on a quiet machine; values within 1e-3 grey levels. (One product over the planes
    laid out [H, C * W] instead of three was faster on a warm synthetic image and slower on
    the photos: the layout change is one more copy of cold pixels.) Other devices keep the
    dense product, which is what they are fast at."""
    count = planes.shape[-2]
    if planes.device.type != "cpu":
        return torch.cat([_dense(cols, weights, count) for cols, weights in bands]).to(planes.device) @ planes
    sparse = _rows_csr(bands, count)
    return torch.stack([sparse @ plane for plane in planes])


def crop_boxes(
    images: Sequence[torch.Tensor],
    boxes: torch.Tensor,
    sizes: Sequence[int] = (32, 224),
    margin: float = 0.0,
) -> dict[int, torch.Tensor]:
    """Crop box i from image i (CHW, uint8 or float, any size) to every size in `sizes`.

    Returns {size: float32 tensor [N, 3, size, size]} in the input's value range. `boxes`
    are xyxy in each image's own pixels. The row weights of all sizes go through one
    product, so the box's pixels are read once however many sizes are asked for.
    """
    out: dict[int, list[torch.Tensor]] = {s: [] for s in sizes}
    for image, box in zip(images, boxes):
        (x1, y1, x2, y2), (left, top, right, bottom) = _box_pixels(image, box, margin)
        region = image[:, top:bottom, left:right].float()  # only the box's pixels go to float
        rows = weigh_rows([band_weights(y1, y2, top, bottom - top, s) for s in sizes], region)
        for s, part in zip(sizes, rows.split(list(sizes), dim=1)):
            wx = box_weights(x1, x2, left, right - left, s).to(region.device)
            out[s].append((part @ wx.T)[None])
    return {s: torch.cat(v) if v else torch.zeros(0, 3, s, s) for s, v in out.items()}


def whole_frames(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """The box of each whole image, xyxy."""
    return torch.tensor([[0.0, 0.0, float(im.shape[-1]), float(im.shape[-2])] for im in images]).reshape(-1, 4)


def resized_crops(images: Sequence[torch.Tensor], boxes: torch.Tensor, size: int, margin: float = 0.0) -> torch.Tensor:
    """Box i of image i (whole pixels) resized to [size, size], bilinear with antialiasing
    (torchvision's resize). For the quality findings' crop, whose statistics do not need the
    exact bin edges; never for the stage-2 crops, whose models were trained on the exact area
    averages of `crop_boxes`. Measured on the 2-core CPU, the engine's findings crops of the
    300 real-mix photos replayed (boxes of the detector's 320 px input to 128 px): 0.52 ms a
    crop, adaptive_avg_pool2d (the first version) 0.66 ms, a 2x average pool first 0.52 ms;
    bilinear without antialiasing 0.30 ms, but it aliases."""
    out = []
    for image, box in zip(images, boxes):
        _, (left, top, right, bottom) = _box_pixels(image, box, margin)
        region = image[:, top:bottom, left:right].float()
        out.append(TF.resize(region, [size, size], antialias=True)[None])
    return torch.cat(out) if out else torch.zeros(0, 3, size, size)
