"""Decoding image files for training and evaluation: EXIF orientation, RGB, and JPEG DCT
scaling (Pillow's draft mode) so a 12 MP photo is never fully decoded to feed a 512 px model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps


def load_rgb(path: str | Path, min_long_side: int | None = None) -> tuple[torch.Tensor, float, float]:
    """(uint8 CHW tensor, sx, sy): scale factors from the displayed full-size image to it.

    With `min_long_side`, JPEGs decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
    the long side at least that big.
    """
    with Image.open(path) as im:
        full_w, full_h = ImageOps.exif_transpose(im).size if _rotates(im) else im.size
        if min_long_side is not None and im.format in ("JPEG", "MPO"):  # MPO: phones' JPEGs with a second image
            f = min_long_side / max(im.size)
            if f < 1:
                im.draft("RGB", (max(1, int(im.size[0] * f)), max(1, int(im.size[1] * f))))
        im = ImageOps.exif_transpose(im).convert("RGB")
        arr = np.asarray(im)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    return t, t.shape[2] / full_w, t.shape[1] / full_h


def _rotates(im: Image.Image) -> bool:
    return im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
