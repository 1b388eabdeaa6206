"""Clinicians' marks drawn onto stage-2 training crops, as a transforms.v2 transform.

Why: in the real training photos only the `atlas` teaching collection carries drawn marks
(arrows, lesion outlines), and `atlas` is also where every green and iodine photo comes from.
A model can then learn "marks, so atlas, so more likely non-regular". Drawing the same kind of
marks on any crop, whatever its label and source, makes marks carry no label information.
The marks are the generator's own (`synth.camera.draw_annotations`), in the colours the atlas
photos use (yellow, green and cyan arrows, violet outlines), drawn at a photo-like resolution
and scaled back down, so that a 32 px crop gets the thin blended lines a resized photo has
rather than a crisp one-pixel stroke.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import Transform
from torchvision.transforms.v2 import functional as F

from pipelines.data.synth.anatomy import Ellipse
from pipelines.data.synth.camera import draw_annotations

MARK_COLOURS = ((255, 230, 0), (0, 210, 60), (0, 220, 255), (110, 60, 210), (255, 255, 255))
_DRAW_SIDE = 160  # a crop's side in the photo it came from, roughly: marks are drawn at this size


class ClinicianMarks(Transform):
    """An outline and/or arrows around the crop's centre; the label does not change."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        # Drawn from torch's generator so torch.manual_seed and DataLoader worker seeds apply.
        return {"seed": int(torch.randint(0, 2**31 - 1, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor) or inpt.ndim != 3:
            return inpt
        rng = np.random.default_rng(params["seed"])
        size = list(inpt.shape[-2:])
        big = F.resize(F.to_dtype(inpt, torch.float32, scale=True), [_DRAW_SIDE, _DRAW_SIDE], antialias=True)
        img = Image.fromarray((big.clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).numpy(), "RGB")
        # The crop is the cervix box plus a margin: the cervix fills it, give or take.
        half = _DRAW_SIDE / 2
        cervix = Ellipse(half * float(rng.uniform(0.9, 1.1)), half * float(rng.uniform(0.9, 1.1)),
                         half * float(rng.uniform(0.6, 0.95)), half * float(rng.uniform(0.6, 0.95)),
                         float(rng.uniform(0, math.pi)))
        draw_annotations(rng, img, cervix, float(rng.uniform(0.15, 0.65)), MARK_COLOURS)
        drawn = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
        out = F.resize(F.to_dtype(drawn, torch.float32, scale=True), size, antialias=True).clamp(0, 1)
        return out if inpt.is_floating_point() else F.to_dtype(out, inpt.dtype, scale=True)
