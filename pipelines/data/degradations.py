"""Seeded photo degradations that make labelled sets for the quality findings: blur (Gaussian
or motion), under- and over-exposure, specular glare on the cervix, and the nuisances a
collection carries without being wrong (JPEG re-encoding, sensor noise, a mild exposure
change). Strengths are relative to the photo's size, so a 384 px atlas image and a 12 MP
phone photo get the same visible blur. uint8 HxWx3 arrays in and out.

The ranges are the degradations a reviewer would reject by eye at screen size (checked on
contact sheets of real photos); milder versions are not the findings' business.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

BLUR_SIGMA = (0.006, 0.015)  # Gaussian sigma, share of the long side
MOTION_LENGTH = (0.02, 0.05)  # motion streak length, share of the long side
DARK_EXPOSURE, DARK_GAMMA = (0.3, 0.55), (1.2, 2.0)
BRIGHT_EXPOSURE = (1.8, 3.0)
GLARE_COVER = (0.08, 0.25)  # share of the cervix box under highlights
NUISANCE_QUALITY, NUISANCE_NOISE, NUISANCE_EXPOSURE = (50, 95), (2.0, 6.0), (0.8, 1.2)


def _u(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(*lo_hi))


def blur(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    long_side = max(rgb.shape[:2])
    if rng.random() < 0.5:
        sigma = _u(rng, BLUR_SIGMA) * long_side
        return cv2.GaussianBlur(rgb, (0, 0), sigma)
    length = max(3, int(round(_u(rng, MOTION_LENGTH) * long_side)))
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), _u(rng, (0, 180)), 1.0)
    kernel = cv2.warpAffine(kernel, rot, (length, length))
    return cv2.filter2D(rgb, -1, kernel / kernel.sum(), borderType=cv2.BORDER_REFLECT)


def _exposure(rgb: np.ndarray, gain: float, gamma: float = 1.0) -> np.ndarray:
    x = (rgb.astype(np.float32) / 255) ** gamma * gain
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def dark(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _exposure(rgb, _u(rng, DARK_EXPOSURE), _u(rng, DARK_GAMMA))


def overexposed(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _exposure(rgb, _u(rng, BRIGHT_EXPOSURE))


def glare(rgb: np.ndarray, rng: np.random.Generator, box: Sequence[float] | None = None) -> np.ndarray:
    """White, soft-edged highlights (2-5 ellipses) over a share of the cervix box (the whole
    photo without one), as wet tissue reflects a ring light."""
    h, w = rgb.shape[:2]
    x1, y1, x2, y2 = box if box is not None else (0, 0, w, h)
    bw, bh = max(x2 - x1, 8), max(y2 - y1, 8)
    cover = _u(rng, GLARE_COVER)
    n = int(rng.integers(2, 6))
    mask = np.zeros((h, w), np.float32)
    area_each = cover * bw * bh / n
    for _ in range(n):
        aspect = _u(rng, (0.3, 1.0))
        a = np.sqrt(area_each / (np.pi * aspect))
        cx = x1 + bw * _u(rng, (0.2, 0.8))
        cy = y1 + bh * _u(rng, (0.2, 0.8))
        cv2.ellipse(mask, (int(cx), int(cy)), (max(1, int(a)), max(1, int(a * aspect))), _u(rng, (0, 180)),
                    0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), max(1.0, 0.01 * max(bw, bh)))[..., None]
    white = np.full_like(rgb, 250, dtype=np.float32)
    return (rgb * (1 - mask) + white * mask + 0.5).astype(np.uint8)


def jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def nuisance(rgb: np.ndarray, rng: np.random.Generator) -> bytes:
    """What an ordinary copy goes through: exposure within +-20%, a little noise, JPEG 50-95."""
    x = _exposure(rgb, _u(rng, NUISANCE_EXPOSURE))
    noisy = x.astype(np.float32) + rng.normal(0, _u(rng, NUISANCE_NOISE), x.shape)
    return jpeg(np.clip(noisy, 0, 255).astype(np.uint8), int(rng.integers(*NUISANCE_QUALITY, endpoint=True)))


DEGRADE = {"blur": blur, "dark": dark, "overexposed": overexposed, "glare": glare}
