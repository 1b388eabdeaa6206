"""A patient's cervix (fixed across her images) and how one photo frames it.

Geometry lives in canvas pixels; the cervix outline is an exact ellipse so that its
bounding box is analytic, and a test can check the box against the shape at the output
resolution instead of trusting the renderer's own mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Anatomy:
    tissue: tuple[float, float, float]  # squamous epithelium colour
    wall: tuple[float, float, float]  # vaginal wall colour
    ectropion: tuple[float, float, float]  # columnar epithelium colour
    aspect: float  # minor / major axis
    tilt: float  # radians
    tz_size: float  # transformation zone radius, fraction of the cervix radius
    os_slit: bool  # parous (slit) or nulliparous (round) external os
    os_size: float
    lesion: bool
    lesion_angle: float
    cysts: int
    texture_seed: int


def sample_anatomy(rng: np.random.Generator, lesion_prob: float) -> Anatomy:
    pale = rng.uniform(0, 1)  # pale (post-menopausal) .. deep pink
    tissue = np.array([0.90, 0.52, 0.52]) * (1 - pale * 0.3) + np.array([0.9, 0.72, 0.70]) * pale * 0.3
    tissue = tissue + rng.normal(0, 0.04, 3)
    wall = np.array([0.72, 0.30, 0.30]) + rng.normal(0, 0.05, 3)
    ectropion = np.array([0.74, 0.16, 0.17]) + rng.normal(0, 0.04, 3)
    return Anatomy(
        tissue=tuple(np.clip(tissue, 0.2, 1.0).tolist()),
        wall=tuple(np.clip(wall, 0.1, 0.95).tolist()),
        ectropion=tuple(np.clip(ectropion, 0.05, 0.95).tolist()),
        aspect=float(rng.uniform(0.72, 1.0)),
        tilt=float(rng.uniform(-0.5, 0.5)),
        tz_size=float(rng.uniform(0.15, 0.65)),
        os_slit=bool(rng.random() < 0.6),
        os_size=float(rng.uniform(0.05, 0.13)),
        lesion=bool(rng.random() < lesion_prob),
        lesion_angle=float(rng.uniform(0, 2 * math.pi)),
        cysts=int(rng.integers(0, 5)),
        texture_seed=int(rng.integers(0, 2**31)),
    )


@dataclass(frozen=True)
class Ellipse:
    """A rotated ellipse in continuous pixel coordinates (pixel i spans [i, i+1))."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float

    def normalised_radius(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """rho: < 1 inside, 1 on the outline. Broadcasts over pixel grids."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = xs - self.cx, ys - self.cy
        u = (dx * c + dy * s) / self.rx
        v = (-dx * s + dy * c) / self.ry
        return np.sqrt(u * u + v * v)

    def contains(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return self.normalised_radius(xs, ys) <= 1.0

    def bbox(self) -> tuple[float, float, float, float]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        hw = math.sqrt((self.rx * c) ** 2 + (self.ry * s) ** 2)
        hh = math.sqrt((self.rx * s) ** 2 + (self.ry * c) ** 2)
        return (self.cx - hw, self.cy - hh, self.cx + hw, self.cy + hh)

    def scaled(self, sx: float, sy: float) -> Ellipse:
        """The same shape after an axis-aligned resize; exact only when sx == sy."""
        return Ellipse(self.cx * sx, self.cy * sy, self.rx * sx, self.ry * sy, self.angle)

    def to_local(self, u: float, v: float) -> tuple[float, float]:
        """Ellipse-normalised coordinates (u, v) back to pixels."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        x, y = u * self.rx, v * self.ry
        return (self.cx + x * c - y * s, self.cy + x * s + y * c)


@dataclass(frozen=True)
class Framing:
    cervix: Ellipse
    light: tuple[float, float]  # where the illumination is centred, fraction of the frame
    aperture: tuple[float, float, float] | None  # (cx, cy, r) of a circular vignette, pixels


def sample_framing(
    rng: np.random.Generator,
    anatomy: Anatomy,
    width: int,
    height: int,
    zoom: tuple[float, float],
    off_centre: float,
    cutoff_prob: float,
    aperture_radius: float | None,
) -> Framing:
    """Place the cervix: zoom is the cervix diameter over the frame's short side."""
    short = min(width, height)
    z = float(rng.uniform(*zoom))
    rx = 0.5 * z * short
    ry = rx * anatomy.aspect
    angle = anatomy.tilt + float(rng.normal(0, 0.15))
    cx = width * (0.5 + float(np.clip(rng.normal(0, off_centre), -0.3, 0.3)))
    cy = height * (0.5 + float(np.clip(rng.normal(0, off_centre), -0.3, 0.3)))
    aperture = None
    if aperture_radius is not None:
        r = aperture_radius * math.hypot(width, height)
        acx = width * (0.5 + float(rng.normal(0, 0.02)))
        acy = height * (0.5 + float(rng.normal(0, 0.02)))
        aperture = (acx, acy, r)
        # A colposcope never shows the cervix outside its aperture: pull it inside.
        limit = 0.95 * r
        scale = min(1.0, limit / max(rx, 1e-6))
        rx, ry = rx * scale * 0.9, ry * scale * 0.9
        d = math.hypot(cx - acx, cy - acy)
        room = limit - max(rx, ry)
        if d > room and d > 0:
            cx = acx + (cx - acx) * room / d
            cy = acy + (cy - acy) * room / d
    elif rng.random() < cutoff_prob:
        # Push the centre towards an edge so that 10-40% of the cervix leaves the frame.
        side = int(rng.integers(0, 4))
        out = float(rng.uniform(0.1, 0.4)) * 2 * rx
        if side == 0:
            cx = rx - out
        elif side == 1:
            cx = width - rx + out
        elif side == 2:
            cy = ry - out
        else:
            cy = height - ry + out
    light = (0.5 + float(rng.normal(0, 0.08)), 0.5 + float(rng.normal(0, 0.08)))
    return Framing(Ellipse(cx, cy, rx, ry, angle), light, aperture)


def clipped_box(
    ellipse: Ellipse, width: int, height: int
) -> tuple[float, float, float, float] | None:
    """The visible part of the ellipse's bounding box, or None if it is off the frame."""
    x1, y1, x2, y2 = ellipse.bbox()
    x1, y1 = max(0.0, x1), max(0.0, y1)
    x2, y2 = min(float(width), x2), min(float(height), y2)
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None
    return (x1, y1, x2, y2)
