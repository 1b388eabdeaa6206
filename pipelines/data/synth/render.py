"""One synthetic photo, from its plan entry to JPEG bytes and its ground truth."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipelines.data.nonregular import green_filter, lugol_iodine, sample_green_params, sample_iodine_params
from pipelines.data.schema import Kind
from pipelines.data.synth import camera, scene
from pipelines.data.synth.anatomy import Ellipse, clipped_box, sample_anatomy, sample_framing
from pipelines.data.synth.profiles import SOURCES, DeviceProfile

CANVAS_LONG_SIDE = 320
NO_CERVIX_SCENES = ("speculum_only", "gauze", "blurred", "black")


MAX_MEGAPIXELS = 64.0  # past the largest phone photos; 1e9 would render one 3 GB frame per image


@dataclass(frozen=True)
class SizePolicy:
    """How output sizes relate to the device's native ones (tests and benches shrink them)."""

    scale: float = 1.0
    max_side: int | None = None
    megapixels: float | None = None

    def __post_init__(self) -> None:
        # -1 was a math-domain traceback after the output folder was made; 0 made 32x32 photos
        if self.megapixels is not None and not 0.01 <= self.megapixels <= MAX_MEGAPIXELS:
            raise ValueError(f"--megapixels must be at least 0.01 (a 100x100 photo) and at most {MAX_MEGAPIXELS:g}, "
                             f"got {self.megapixels}")
        if not self.scale > 0:
            raise ValueError(f"size scale must be positive, got {self.scale}")

    def apply(self, width: int, height: int) -> tuple[int, int]:
        f = self.scale
        if self.megapixels is not None:
            f = math.sqrt(self.megapixels * 1e6 / (width * height))
        if self.max_side is not None:
            f = min(f, self.max_side / max(width, height))
        return max(32, int(round(width * f))), max(32, int(round(height * f)))


@dataclass(frozen=True)
class ImageSpec:
    """A planned image: everything needed to render it, and nothing random left."""

    image_id: str
    patient_id: str
    patient_index: int
    image_index: int
    source: str
    kind: Kind
    stage: str  # pre | post (acetic acid) for regular images; the kind otherwise
    seed: int


@dataclass(frozen=True)
class RenderedImage:
    jpeg: bytes
    width: int
    height: int
    box: tuple[float, float, float, float] | None  # x1, y1, x2, y2 in output pixels
    cervix: Ellipse | None  # exact outline in output pixels
    detail: str  # what makes it this kind: tint name, stain strength, no-cervix scene
    # the quality findings it has by construction (manifest `known_findings`): "blur" where the
    # camera model blurred it, which a blur calibration must not count as a sharp photo
    known_findings: str = ""


def _output_size(rng: np.random.Generator, device: DeviceProfile, policy: SizePolicy) -> tuple[int, int]:
    w, h = device.resolutions[int(rng.integers(0, len(device.resolutions)))]
    if rng.random() < device.portrait_prob:
        w, h = h, w
    return policy.apply(w, h)


def render_image(spec: ImageSpec, policy: SizePolicy = SizePolicy()) -> RenderedImage:
    source = SOURCES[spec.source]
    device = source.device
    anatomy = sample_anatomy(np.random.default_rng([spec.seed, spec.patient_index]), source.lesion_prob)
    rng = np.random.default_rng([spec.seed, spec.patient_index, spec.image_index])

    width, height = _output_size(rng, device, policy)
    f = min(1.0, CANVAS_LONG_SIDE / max(width, height))
    cw, ch = max(16, int(round(width * f))), max(16, int(round(height * f)))
    sx, sy = width / cw, height / ch
    aperture_r = float(rng.uniform(*device.vignette_radius)) if rng.random() < device.vignette_prob else None
    look = camera.sample_look(rng, device)
    light = (0.5 + float(rng.normal(0, 0.08)), 0.5 + float(rng.normal(0, 0.08)))

    ellipse: Ellipse | None = None
    aperture = None
    detail = spec.stage
    if spec.kind == Kind.NO_CERVIX:
        detail = NO_CERVIX_SCENES[int(rng.choice(4, p=[0.35, 0.25, 0.25, 0.15]))]
        rgb, extra_blur = _no_cervix_scene(rng, detail, ch, cw, anatomy, source)
        if aperture_r is not None:
            aperture = (width / 2, height / 2, aperture_r * math.hypot(width, height))
        look = _replace_blur(look, max(look.blur, extra_blur))
    else:
        framing = sample_framing(rng, anatomy, width, height, device.zoom, device.off_centre,
                                 device.cutoff_prob, aperture_r)
        ellipse, aperture, light = framing.cervix, framing.aperture, framing.light
        rgb, detail = _cervix_scene(rng, spec, anatomy, ellipse.scaled(1 / sx, 1 / sy), ch, cw, device, source)

    green_mode = None
    if spec.kind == Kind.GREEN:
        green_mode = device.green_modes[int(rng.integers(0, len(device.green_modes)))]
        gparams = sample_green_params(rng)
        detail = f"{green_mode}:{gparams.strength:.2f}:{'/'.join(f'{t:.2f}' for t in gparams.tint)}"
        if green_mode == "physical":
            rgb = green_filter(rgb, gparams)
    camera.develop(rgb, look, light)
    if aperture is not None:
        camera.apply_aperture(rgb, aperture, sx, sy)
    if green_mode == "digital":
        rgb = green_filter(rgb, gparams)

    img = camera.to_output(rgb, (width, height), look.blur)
    img = camera.add_sensor_noise(rng, img, look.noise_sigma)
    if rng.random() < device.text_prob:
        camera.burn_in_text(rng, img, source.text_style, rng.random() < device.magnification_prob)
    if ellipse is not None and rng.random() < device.annotation_prob:
        camera.draw_annotations(rng, img, ellipse, anatomy.tz_size)
    jpeg = camera.encode_jpeg(img, look.jpeg_quality, device.subsampling)
    box = clipped_box(ellipse, width, height) if ellipse is not None else None
    return RenderedImage(jpeg, width, height, box, ellipse, detail, "blur" if look.blur > 0 else "")


def image_path(spec: ImageSpec) -> str:
    return f"images/{spec.source}/{spec.patient_id}/{spec.image_id}.jpg"


def render_to_file(job: tuple[ImageSpec, SizePolicy, str]) -> tuple[ImageSpec, RenderedImage]:
    """Worker entry point: render, write the JPEG, return the ground truth without the bytes."""
    spec, policy, out_dir = job
    img = render_image(spec, policy)
    path = Path(out_dir) / image_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(img.jpeg)
    return spec, RenderedImage(b"", img.width, img.height, img.box, img.cervix, img.detail, img.known_findings)


def worker_init() -> None:
    cv2.setNumThreads(1)  # one process per core already; threads would only contend


def _replace_blur(look: camera.CameraLook, blur: float) -> camera.CameraLook:
    from dataclasses import replace

    return replace(look, blur=blur)


def _cervix_scene(rng, spec: ImageSpec, anatomy, ell: Ellipse, ch: int, cw: int, device, source):
    light = (0.5, 0.5)
    walls = scene.render_walls(rng, ch, cw, anatomy.wall, light)
    canvas = scene.Canvas(walls, np.zeros((ch, cw), np.float32), np.zeros((ch, cw), np.float32),
                          np.ones((ch, cw), np.float32))
    if spec.kind == Kind.REGULAR:
        acetowhite = 0.0 if spec.stage == "pre" else float(rng.uniform(0.1, 0.95))
    else:
        acetowhite = float(rng.uniform(0.0, 0.4))
    scene.render_cervix(rng, canvas, anatomy, ell, acetowhite)
    os_xy = ell.to_local(0.0, 0.0)
    if rng.random() < 0.3:
        scene.draw_fluid(rng, canvas, os_xy, min(ell.rx, ell.ry) * float(rng.uniform(0.1, 0.3)), blood=False)
    if rng.random() < source.blood_prob:
        at = ell.to_local(float(rng.uniform(-0.3, 0.3)), float(rng.uniform(0.0, 0.9)))
        scene.draw_fluid(rng, canvas, at, min(ell.rx, ell.ry) * float(rng.uniform(0.08, 0.3)), blood=True)
    if rng.random() < device.speculum_prob:
        scene.draw_speculum(rng, canvas, ell)
    if rng.random() < device.swab_prob:
        scene.draw_swab(rng, canvas, os_xy)
    detail = spec.stage if spec.kind == Kind.REGULAR else ""
    if spec.kind == Kind.IODINE:
        params = sample_iodine_params(rng)
        negative = np.clip(canvas.tz * 1.3, 0, 1)
        canvas.rgb = lugol_iodine(canvas.rgb, negative, params, rng, uptake_mask=canvas.tissue)
        detail = f"iodine:{params.strength:.2f}"
    if device.specular:
        glare = scene.specular_mask(rng, ch, cw, ell)
        canvas.rgb += glare[..., None] * 1.3
    return canvas.rgb, detail


def _no_cervix_scene(rng, name: str, ch: int, cw: int, anatomy, source):
    if name == "gauze":
        return scene.render_gauze(rng, ch, cw), 0.0
    if name == "black":
        rgb = np.full((ch, cw, 3), float(rng.uniform(0.0, 0.05)), np.float32)
        rgb[..., 0] *= float(rng.uniform(1.0, 2.0))
        return rgb, 0.0
    light = (float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7)))
    walls = scene.render_walls(rng, ch, cw, anatomy.wall, light)
    canvas = scene.Canvas(walls, np.zeros((ch, cw), np.float32), np.zeros((ch, cw), np.float32),
                          np.ones((ch, cw), np.float32))
    scene.draw_speculum(rng, canvas, None)
    if name == "blurred":
        return canvas.rgb, float(rng.uniform(6.0, 14.0)) * min(ch, cw) / 256
    return canvas.rgb, 0.0
