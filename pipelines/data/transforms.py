"""Minority-class synthesis as torchvision transforms.v2: turn a regular image into a
green-filter or Lugol's-iodine one (hSDB's answer to class imbalance, with our generator's
own physics). They change the class, so the caller relabels the sample; boxes, masks and
other non-image inputs pass through unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pipelines.data.nonregular import (
    green_filter,
    lugol_iodine,
    redness_mask,
    sample_green_params,
    sample_iodine_params,
)
from pipelines.data.texture import smooth_noise


def _to_float_hwc(inpt: Any) -> tuple[np.ndarray, Any]:
    if isinstance(inpt, Image.Image):
        return np.asarray(inpt.convert("RGB"), np.float32) / 255.0, inpt
    t = inpt if inpt.is_floating_point() else F.to_dtype(inpt, torch.float32, scale=True)
    return t.detach().cpu().permute(1, 2, 0).numpy().astype(np.float32), inpt


def _back(arr: np.ndarray, like: Any) -> Any:
    arr = np.clip(arr, 0.0, 1.0)
    if isinstance(like, Image.Image):
        return Image.fromarray((arr * 255 + 0.5).astype(np.uint8), "RGB")
    out = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    out = out.to(like.device) if like.is_floating_point() else F.to_dtype(out, like.dtype, scale=True).to(like.device)
    return tv_tensors.wrap(out, like=like) if isinstance(like, tv_tensors.TVTensor) else out


# KeyPoints only exists in newer torchvision; pass through whatever this version has.
_PASS_THROUGH = tuple(getattr(tv_tensors, n) for n in ("BoundingBoxes", "Mask", "KeyPoints") if hasattr(tv_tensors, n))


class SeededImageTransform(v2.Transform):
    """A seeded function of the image alone (float HWC in [0, 1] -> the same), any image type
    in and the same type out; boxes, masks and other inputs pass through unchanged."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        # Drawn from torch's generator so torch.manual_seed and DataLoader worker seeds apply.
        return {"seed": int(torch.randint(0, 2**31 - 1, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, _PASS_THROUGH) or not isinstance(inpt, (torch.Tensor, Image.Image)):
            return inpt
        arr, like = _to_float_hwc(inpt)
        return _back(self.apply(arr, np.random.default_rng(params["seed"])), like)

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


class GreenFilter(SeededImageTransform):
    """Make a regular image look green-filtered, from strong green to a faint grey-blue."""

    def __init__(self, subtle_bias: float = 0.5) -> None:
        super().__init__()
        self.subtle_bias = subtle_bias

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return green_filter(image, sample_green_params(rng, self.subtle_bias))


class LugolIodine(SeededImageTransform):
    """Stain a regular image as after Lugol's iodine; the reddest tissue (columnar
    epithelium) plus random patches (lesions) stay iodine-negative, mustard-yellow."""

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = image.shape[:2]
        patches = np.clip((smooth_noise(rng, h, w, cells=5) - 0.75) * 5.0, 0.0, 1.0)
        negative = np.maximum(redness_mask(image), patches)
        return lugol_iodine(image, negative, sample_iodine_params(rng), rng)
