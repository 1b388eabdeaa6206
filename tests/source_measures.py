"""Measurements taken from generated JPEG files, to compare sources as a reader of the
files would: nothing here looks at the generator's parameters."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def measure(jpeg: bytes, box) -> dict[str, float]:
    im = Image.open(io.BytesIO(jpeg))
    q = sum(im.quantization[0])  # luminance table: larger for lower JPEG quality
    rgb = np.asarray(im.convert("RGB"), np.float32)
    h, w = rgb.shape[:2]
    k = max(2, min(h, w) // 16)
    corners = np.concatenate([rgb[:k, :k], rgb[:k, -k:], rgb[-k:, :k], rgb[-k:, -k:]]).reshape(-1, 3)
    x1, y1, x2, y2 = (int(v) for v in box)
    crop = rgb[y1:y2, x1:x2]
    # Sensor noise: spread of the difference between neighbouring pixels in the darkest flat area.
    g = rgb[..., 1]
    resid = np.abs(np.diff(g, axis=1))
    return {
        "pixels": float(h * w),
        "portrait": float(h > w),
        "jpeg_qtable": float(q),
        "dark_corners": float((corners.max(axis=1) < 20).mean()),
        "warmth": float(crop[..., 0].mean() / max(crop[..., 2].mean(), 1.0)),
        "highlights": float((crop.min(axis=2) >= 245).mean()),
        "noise": float(np.median(resid)),
    }
