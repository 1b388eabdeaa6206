"""What the device does to the scene: light, white balance, optics, sensor, software, JPEG."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipelines.data.synth.anatomy import Ellipse
from pipelines.data.synth.profiles import DeviceProfile
from pipelines.data.texture import pixel_grid

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class CameraLook:
    """One photo's camera settings, drawn from the device profile."""

    gains: tuple[float, float, float]
    exposure: float
    gamma: float
    saturation: float
    falloff: float
    blur: float  # Gaussian radius on the canvas, 0 = sharp
    noise_sigma: float
    jpeg_quality: int


def sample_look(rng: np.random.Generator, device: DeviceProfile) -> CameraLook:
    gains = np.asarray(device.cast_gains) * (1.0 + rng.normal(0, device.cast_jitter, 3))
    # Domain randomisation: now and then a cast far outside the device's habits.
    if rng.random() < 0.1:
        gains = gains * (1.0 + rng.normal(0, 0.15, 3))
    return CameraLook(
        gains=tuple(float(g) for g in np.clip(gains, 0.5, 1.6)),
        exposure=float(rng.uniform(0.75, 1.25)),
        gamma=float(rng.uniform(0.85, 1.15)),
        saturation=float(rng.uniform(*device.saturation)),
        falloff=float(rng.uniform(*device.falloff)),
        blur=float(rng.uniform(0.6, 2.5)) if rng.random() < device.blur_prob else 0.0,
        noise_sigma=float(rng.uniform(*device.noise_sigma)),
        jpeg_quality=int(rng.integers(device.jpeg_quality[0], device.jpeg_quality[1] + 1)),
    )


def develop(rgb: np.ndarray, look: CameraLook, light: tuple[float, float]) -> np.ndarray:
    """Illumination fall-off, white balance, exposure, tone curve and saturation, in place."""
    h, w = rgb.shape[:2]
    xs, ys = pixel_grid(h, w)
    d2 = (xs / w - light[0]) ** 2 + (ys / h - light[1]) ** 2
    rgb *= np.clip(1.0 - look.falloff * 2.0 * d2, 0.05, 1.0)[..., None]
    rgb *= np.asarray(look.gains, np.float32) * look.exposure
    np.clip(rgb, 0.0, 1.0, out=rgb)
    rgb **= look.gamma
    luma = (rgb @ _LUMA)[..., None]
    rgb[:] = luma + (rgb - luma) * look.saturation
    np.clip(rgb, 0.0, 1.0, out=rgb)
    return rgb


def apply_aperture(rgb: np.ndarray, aperture: tuple[float, float, float], sx: float, sy: float) -> None:
    """Black out everything outside the colposcope's circular field of view."""
    h, w = rgb.shape[:2]
    xs, ys = pixel_grid(h, w)
    acx, acy, r = aperture[0] / sx, aperture[1] / sy, aperture[2] / sx
    d = np.sqrt((xs - acx) ** 2 + (ys - acy) ** 2)
    rgb *= np.clip((r - d) / max(1.0, r * 0.02), 0.0, 1.0)[..., None]


def to_output(rgb: np.ndarray, size: tuple[int, int], blur: float) -> Image.Image:
    """Quantise the canvas and upsample it to the device's resolution.

    OpenCV's bilinear resize is used here, not Pillow's: upsampling a 320 px canvas to one
    megapixel took 15.4 ms in Pillow 13 and 2.2 ms in OpenCV (measured side by side), and
    the upsample was the largest single cost of a synthetic image.
    """
    u8 = (np.clip(rgb, 0, 1) * 255.0 + 0.5).astype(np.uint8)
    if blur > 0:
        u8 = cv2.GaussianBlur(u8, (0, 0), blur)
    return Image.fromarray(cv2.resize(u8, size, interpolation=cv2.INTER_LINEAR), "RGB")


_NOISE_TILE = 509  # prime-sized so the repeat never lines up with 8x8 JPEG blocks
_NOISE_UNIT = 16.0  # the field stores 128 + 16 * N(0, 1)
_field_cache: dict[str, np.ndarray] = {}


def _noise_field(width: int, height: int) -> np.ndarray:
    """A fixed Gaussian tile repeated to at least (width, height), grown on demand."""
    field = _field_cache.get("field")
    if field is None or field.shape[1] < width or field.shape[0] < height:
        rng = np.random.default_rng(12345)
        tile = np.clip(128 + _NOISE_UNIT * rng.standard_normal((_NOISE_TILE, _NOISE_TILE, 3)), 0, 255)
        reps = (-(-height // _NOISE_TILE), -(-width // _NOISE_TILE), 1)
        field = np.ascontiguousarray(np.tile(tile.astype(np.uint8), reps))
        _field_cache["field"] = field
    return field


def add_sensor_noise(rng: np.random.Generator, img: Image.Image, sigma: float) -> Image.Image:
    """Per-channel Gaussian noise at full resolution.

    A cached noise field cropped at a random offset and added with one saturating OpenCV
    pass costs ~2 ms per megapixel; Pillow's `effect_noise` took ~75 ms per channel and
    megapixel (measured in the generator's profile), which alone broke the 30 images/s budget.
    """
    if sigma <= 0:
        return img
    w, h = img.size
    field = _noise_field(w + _NOISE_TILE, h + _NOISE_TILE)
    ox, oy = int(rng.integers(0, _NOISE_TILE)), int(rng.integers(0, _NOISE_TILE))
    noise = field[oy : oy + h, ox : ox + w]
    k = sigma / _NOISE_UNIT
    out = cv2.addWeighted(np.asarray(img), 1.0, noise, k, -128.0 * k)
    return Image.fromarray(out, "RGB")


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


_TEXT_COLOURS = ((255, 255, 255), (255, 255, 0), (0, 255, 0), (255, 200, 0), (200, 200, 255))


def burn_in_text(rng: np.random.Generator, img: Image.Image, style: str, magnification: bool) -> None:
    """Timestamps, IDs, device names and magnification, as capture software writes them."""
    w, h = img.size
    size = max(8, int(h * float(rng.uniform(0.025, 0.05))))
    font = _font(size)
    draw = ImageDraw.Draw(img)
    colour = _TEXT_COLOURS[int(rng.integers(0, len(_TEXT_COLOURS)))]
    y, mo, d = int(rng.integers(2005, 2024)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    hh, mm, ss = int(rng.integers(7, 19)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    stamp = f"{y}-{mo:02d}-{d:02d} {hh:02d}:{mm:02d}:{ss:02d}"
    lines = {
        "timestamp": [stamp],
        "id_timestamp": [f"ID {int(rng.integers(1000, 9999))}-{int(rng.integers(10, 99))}", stamp],
        "device": ["EVA", f"{d:02d}/{mo:02d}/{y}"],
        "teaching": [stamp, str(rng.choice(["TZ 2", "SCJ", "AW+", "CIN?", "post 60s"]))],
    }[style]
    corner = int(rng.integers(0, 4))
    x = int(w * 0.02) if corner in (0, 2) else int(w * 0.62)
    y0 = int(h * 0.02) if corner in (0, 1) else int(h * 0.98) - size * len(lines) - 4
    for i, line in enumerate(lines):
        draw.text((x, y0 + i * (size + 2)), line, fill=colour, font=font)
    if magnification:
        mag = str(rng.choice(["x7.5", "15X", "Mag 10x", "x4", "25x"]))
        draw.text((int(w * 0.85), int(h * 0.9)), mag, fill=colour, font=font)


def draw_annotations(rng: np.random.Generator, img: Image.Image, cervix: Ellipse, tz_size: float,
                     colours: tuple[tuple[int, int, int], ...] = _TEXT_COLOURS) -> None:
    """A clinician's marks: a lesion outline around the transformation zone and arrows."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    colour = colours[int(rng.integers(0, len(colours)))]
    lw = max(1, int(min(w, h) * 0.004))
    if rng.random() < 0.7:
        pts = []
        r0 = min(0.95, tz_size * float(rng.uniform(1.0, 1.4)))
        for k in range(24):
            a = 2 * math.pi * k / 24
            r = r0 * float(rng.uniform(0.85, 1.15))
            pts.append(cervix.to_local(r * math.cos(a), r * math.sin(a)))
        draw.line(pts + [pts[0]], fill=colour, width=lw)
    for _ in range(int(rng.integers(0, 3))):
        a = float(rng.uniform(0, 2 * math.pi))
        tip = cervix.to_local(0.5 * math.cos(a), 0.5 * math.sin(a))
        tail = cervix.to_local(1.4 * math.cos(a), 1.4 * math.sin(a))
        draw.line([tail, tip], fill=colour, width=lw * 2)
        back = math.atan2(tail[1] - tip[1], tail[0] - tip[0])
        head = min(w, h) * 0.03
        wing = [(tip[0] + head * math.cos(back + s), tip[1] + head * math.sin(back + s)) for s in (0.4, -0.4)]
        draw.polygon([tip, *wing], fill=colour)


def encode_jpeg(img: Image.Image, quality: int, subsampling: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()
