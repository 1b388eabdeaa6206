"""Render what is in front of the camera, in linear-ish float RGB on a small canvas.

Everything here is drawn at a canvas of a few hundred pixels and upsampled later: the
models look at 512 px (detector) and 224/32 px crops, and rendering at output resolution
would cost ~30x more for detail nobody sees. Fine detail that does matter at full
resolution (sensor noise, burned-in text) is added by `camera.py` after the upsample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageDraw

from pipelines.data.synth.anatomy import Anatomy, Ellipse
from pipelines.data.texture import blend, pixel_grid, smooth_noise


@dataclass
class Canvas:
    """An image being rendered plus the masks later stages need."""

    rgb: np.ndarray  # (H, W, 3) float32
    cervix: np.ndarray  # (H, W) float32 alpha of the cervix
    tz: np.ndarray  # (H, W) float32 transformation zone (iodine-negative) weight
    tissue: np.ndarray  # (H, W) float32: 1 where iodine can stain (not metal, not cotton)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]


def _draw_mask(height: int, width: int, draw_fn, blur: float = 0.0) -> np.ndarray:
    mask = Image.new("L", (width, height), 0)
    draw_fn(ImageDraw.Draw(mask))
    arr = np.asarray(mask)
    if blur > 0:
        arr = cv2.GaussianBlur(arr, (0, 0), blur)  # 4x faster than Pillow's on small masks
    return arr.astype(np.float32) * (1.0 / 255.0)


def render_walls(rng: np.random.Generator, height: int, width: int, wall, light) -> np.ndarray:
    """Vaginal walls: a red, folded, darkening tunnel around the light centre."""
    xs, ys = pixel_grid(height, width)
    d2 = ((xs / width - light[0]) ** 2 + (ys / height - light[1]) ** 2).astype(np.float32)
    tex = smooth_noise(rng, height, width, cells=9)
    folds = smooth_noise(rng, height, width, cells=22)
    shade = np.clip(1.0 - 1.5 * d2, 0.12, 1.0) * (0.6 + 0.3 * tex + 0.2 * folds)
    rgb = np.asarray(wall, np.float32) * shade[..., None]
    return rgb.astype(np.float32)


def render_cervix(
    rng: np.random.Generator,
    canvas: Canvas,
    anatomy: Anatomy,
    ellipse: Ellipse,
    acetowhite: float,
) -> None:
    """Draw the cervix (dome, transformation zone, os, acetowhite, vessels) in place."""
    h, w = canvas.shape
    xs, ys = pixel_grid(h, w)
    rho = ellipse.normalised_radius(xs, ys)
    tex_rng = np.random.default_rng(anatomy.texture_seed)

    # Fornix shadow: the walls darken where they fold under the cervix.
    ring = np.clip((rho - 1.0) / 0.35, 0.0, 1.0) ** 0.6
    canvas.rgb *= (0.3 + 0.7 * ring)[..., None]

    alpha = np.clip((1.0 - rho) * min(ellipse.rx, ellipse.ry) / 1.5, 0.0, 1.0)
    dome = 0.62 + 0.38 * np.sqrt(np.clip(1.0 - rho * rho, 0.0, 1.0))
    tex = smooth_noise(rng, h, w, cells=16)
    col = np.asarray(anatomy.tissue, np.float32) * (dome * (0.85 + 0.3 * tex))[..., None]

    # Transformation zone with a wobbly border (same wobble for the same patient).
    wobble = smooth_noise(tex_rng, h, w, cells=5)
    edge = anatomy.tz_size * (0.7 + 0.6 * wobble)
    tz = np.clip((edge - rho) / 0.07, 0.0, 1.0)
    grain = smooth_noise(rng, h, w, cells=60)
    tz_col = np.asarray(anatomy.ectropion, np.float32) * (dome * (0.65 + 0.6 * grain))[..., None]
    blend(col, tz_col, tz)

    if acetowhite > 0:
        patches = smooth_noise(rng, h, w, cells=7)
        region = np.clip((edge * 1.35 - rho) / 0.12, 0.0, 1.0)
        aw = np.clip((patches - (1.0 - acetowhite)) * 3.5, 0.0, 1.0) * region
        if anatomy.lesion:
            u = xs - ellipse.cx
            v = ys - ellipse.cy
            ang = np.arctan2(v, u) - anatomy.lesion_angle
            sector = np.clip(np.cos(ang) * 2.0 - 0.6, 0.0, 1.0) * region
            aw = np.maximum(aw, sector * min(1.0, 0.4 + acetowhite))
        aw_col = np.array([0.93, 0.88, 0.86], np.float32) * dome[..., None]
        blend(col, aw_col, aw * float(rng.uniform(0.5, 0.9)))

    _draw_vessels(rng, col, ellipse, anatomy, h, w)
    _draw_cysts(rng, col, ellipse, anatomy, h, w)

    # External os: a dark slit or dot at the centre.
    osr = anatomy.os_size
    os_e = Ellipse(
        *ellipse.to_local(float(rng.normal(0, 0.04)), float(rng.normal(0, 0.04))),
        rx=ellipse.rx * osr * (1.6 if anatomy.os_slit else 1.0),
        ry=ellipse.ry * osr * (0.35 if anatomy.os_slit else 0.9),
        angle=ellipse.angle,
    )
    os_rho = os_e.normalised_radius(xs, ys)
    blend(col, (0.22, 0.04, 0.05), np.clip((1.0 - os_rho) * 3.0, 0.0, 1.0))

    blend(canvas.rgb, col, alpha)
    canvas.cervix = alpha.astype(np.float32)
    canvas.tz = (tz * alpha).astype(np.float32)


def _draw_vessels(rng, col, ellipse: Ellipse, anatomy: Anatomy, h: int, w: int) -> None:
    n = int(rng.integers(4, 16))
    width = max(1, int(round(min(ellipse.rx, ellipse.ry) / 90)))

    def draw(d: ImageDraw.ImageDraw) -> None:
        for _ in range(n):
            r = anatomy.tz_size * float(rng.uniform(0.6, 1.5))
            a = float(rng.uniform(0, 2 * math.pi))
            u, v = r * math.cos(a), r * math.sin(a)
            pts = [ellipse.to_local(u, v)]
            heading = a + math.pi + float(rng.normal(0, 0.8))
            for _ in range(int(rng.integers(4, 12))):
                heading += float(rng.normal(0, 0.6))
                step = float(rng.uniform(0.03, 0.08))
                u, v = u + step * math.cos(heading), v + step * math.sin(heading)
                pts.append(ellipse.to_local(u, v))
            d.line(pts, fill=int(rng.integers(120, 255)), width=width)

    mask = _draw_mask(h, w, draw)
    blend(col, (0.45, 0.03, 0.06), mask * 0.8)


def _draw_cysts(rng, col, ellipse: Ellipse, anatomy: Anatomy, h: int, w: int) -> None:
    if anatomy.cysts == 0:
        return
    rad = max(1.0, min(ellipse.rx, ellipse.ry) * 0.05)

    def draw(d: ImageDraw.ImageDraw) -> None:
        for _ in range(anatomy.cysts):
            a = float(rng.uniform(0, 2 * math.pi))
            r = float(rng.uniform(0.4, 0.85))
            x, y = ellipse.to_local(r * math.cos(a), r * math.sin(a))
            rr = rad * float(rng.uniform(0.6, 1.4))
            d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=255)

    blend(col, (0.95, 0.85, 0.6), _draw_mask(h, w, draw, blur=rad * 0.4) * 0.6)


def draw_speculum(rng: np.random.Generator, canvas: Canvas, ellipse: Ellipse | None) -> None:
    """Two blades (top/bottom or left/right), metal or translucent plastic."""
    h, w = canvas.shape
    vertical = rng.random() < 0.75
    plastic = rng.random() < 0.3
    xs, ys = pixel_grid(h, w)
    for end in (0, 1):
        if ellipse is not None:
            reach = (ellipse.ry if vertical else ellipse.rx) * float(rng.uniform(-0.1, 0.35))
            centre = ellipse.cy if vertical else ellipse.cx
            inner = centre - (ellipse.ry if vertical else ellipse.rx) + reach if end == 0 else (
                centre + (ellipse.ry if vertical else ellipse.rx) - reach
            )
        else:
            span = h if vertical else w
            inner = span * (float(rng.uniform(0.15, 0.4)) if end == 0 else float(rng.uniform(0.6, 0.85)))
        bulge = float(rng.uniform(0.02, 0.08)) * (h if vertical else w)

        def draw(d: ImageDraw.ImageDraw, end=end, inner=inner, bulge=bulge) -> None:
            if vertical:
                edge = 0 if end == 0 else h
                sign = 1 if end == 0 else -1
                pts = [(0, edge), (w, edge), (w, inner - sign * bulge), (w * 0.5, inner), (0, inner - sign * bulge)]
            else:
                edge = 0 if end == 0 else w
                sign = 1 if end == 0 else -1
                pts = [(edge, 0), (edge, h), (inner - sign * bulge, h), (inner, h * 0.5), (inner - sign * bulge, 0)]
            d.polygon(pts, fill=255)

        mask = _draw_mask(h, w, draw, blur=1.0)
        coord = (ys / h) if vertical else (xs / w)
        sheen = 0.55 + 0.3 * np.cos(coord * float(rng.uniform(8, 20)) + float(rng.uniform(0, 6)))
        base = np.array([0.62, 0.76, 0.9] if plastic else [0.7, 0.7, 0.72], np.float32)
        metal = base * np.broadcast_to(sheen, (h, w))[..., None]
        blend(canvas.rgb, metal, mask * (0.75 if plastic else 1.0))
        canvas.tissue *= 1.0 - mask


def draw_swab(rng: np.random.Generator, canvas: Canvas, target: tuple[float, float]) -> None:
    h, w = canvas.shape
    side = int(rng.integers(0, 3))
    start = [(float(rng.uniform(0, w)), h + 5), (-5, float(rng.uniform(h * 0.4, h))), (w + 5, float(rng.uniform(h * 0.4, h)))][side]
    tip = (target[0] + float(rng.normal(0, w * 0.05)), target[1] + float(rng.normal(0, h * 0.05)))
    stick_w = max(2, int(min(h, w) * 0.02))
    r = min(h, w) * float(rng.uniform(0.03, 0.06))
    stick = _draw_mask(h, w, lambda d: d.line([start, tip], fill=255, width=stick_w))
    cotton = _draw_mask(h, w, lambda d: d.ellipse([tip[0] - r, tip[1] - r * 1.4, tip[0] + r, tip[1] + r * 1.4], fill=255), blur=1.0)
    blend(canvas.rgb, (0.86, 0.76, 0.55), stick)
    fluff = 0.85 + 0.15 * smooth_noise(rng, h, w, cells=50)
    blend(canvas.rgb, np.array([0.97, 0.96, 0.93], np.float32) * fluff[..., None], cotton)
    canvas.tissue *= 1.0 - np.maximum(stick, cotton)


def draw_fluid(rng: np.random.Generator, canvas: Canvas, centre: tuple[float, float], size: float, blood: bool) -> None:
    """Blood (opaque dark red) or mucus (translucent, yellow-white) near the os."""
    h, w = canvas.shape
    xs, ys = pixel_grid(h, w)
    d = np.sqrt(((xs - centre[0]) / size) ** 2 + ((ys - centre[1]) / (size * float(rng.uniform(0.6, 2.0)))) ** 2)
    n = smooth_noise(rng, h, w, cells=12)
    mask = np.clip((1.0 - d + 0.5 * (n - 0.5)) * 4.0, 0.0, 1.0)
    if blood:
        blend(canvas.rgb, (0.42, 0.02, 0.04), mask * 0.9)
    else:
        blend(canvas.rgb, (0.92, 0.9, 0.78), mask * 0.35)


def specular_mask(rng: np.random.Generator, h: int, w: int, ellipse: Ellipse | None) -> np.ndarray:
    """Small saturated reflections of the light on wet tissue."""
    n = int(rng.integers(2, 14))
    base = min(h, w) * 0.006

    def draw(d: ImageDraw.ImageDraw) -> None:
        for _ in range(n):
            if ellipse is not None and rng.random() < 0.8:
                a, r = float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0, 0.95))
                x, y = ellipse.to_local(r * math.cos(a), r * math.sin(a))
            else:
                x, y = float(rng.uniform(0, w)), float(rng.uniform(0, h))
            rx, ry = base * float(rng.uniform(0.3, 2.5)), base * float(rng.uniform(0.3, 1.2))
            d.ellipse([x - rx, y - ry, x + rx, y + ry], fill=255)

    return _draw_mask(h, w, draw, blur=max(0.6, base * 0.3))


def render_gauze(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A wad of gauze filling the frame: woven, folded, sometimes blood-stained."""
    xs, ys = pixel_grid(height, width)
    period = float(rng.uniform(3.0, 7.0))
    ang = float(rng.uniform(0, math.pi))
    u = xs * math.cos(ang) + ys * math.sin(ang)
    v = -xs * math.sin(ang) + ys * math.cos(ang)
    weave = 0.8 + 0.1 * np.sin(u * 2 * math.pi / period) + 0.1 * np.sin(v * 2 * math.pi / period)
    folds = 0.55 + 0.45 * smooth_noise(rng, height, width, cells=5)
    rgb = np.array([0.95, 0.93, 0.88], np.float32) * (weave * folds)[..., None]
    if rng.random() < 0.5:
        stain = np.clip((smooth_noise(rng, height, width, cells=4) - 0.6) * 4, 0, 1)
        blend(rgb, (0.55, 0.05, 0.06), stain * 0.8)
    return rgb.astype(np.float32)
