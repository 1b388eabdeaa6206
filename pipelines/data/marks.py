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

import numpy as np
from PIL import Image

from pipelines.data.synth.anatomy import Ellipse
from pipelines.data.synth.camera import draw_annotations
from pipelines.data.transforms import SeededImageTransform

MARK_COLOURS = ((255, 230, 0), (0, 210, 60), (0, 220, 255), (110, 60, 210), (255, 255, 255))
_DRAW_SIDE = 160  # a crop's side in the photo it came from, roughly: marks are drawn at this size


class ClinicianMarks(SeededImageTransform):
    """An outline and/or arrows around the crop's centre; the label does not change."""

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = image.shape[:2]
        img = Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")
        img = img.resize((_DRAW_SIDE, _DRAW_SIDE), Image.Resampling.BILINEAR)
        # The crop is the cervix box plus a margin: the cervix fills it, give or take.
        half = _DRAW_SIDE / 2
        cervix = Ellipse(half * float(rng.uniform(0.9, 1.1)), half * float(rng.uniform(0.9, 1.1)),
                         half * float(rng.uniform(0.6, 0.95)), half * float(rng.uniform(0.6, 0.95)),
                         float(rng.uniform(0, math.pi)))
        draw_annotations(rng, img, cervix, float(rng.uniform(0.15, 0.65)), MARK_COLOURS)
        # PIL's BILINEAR widens its kernel when it shrinks: the lines blend as a resized photo's do
        return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), np.float32) / 255.0
