"""How the synthetic sources differ: one device profile each, as real clinics' cameras do.

Every range is sampled per image (domain randomisation); the profiles only move the
centre of mass. Ranges deliberately overlap between sources so that no single cue (size,
cast, vignette) identifies a source, yet each source keeps a signature a test can measure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Range = tuple[float, float]


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    resolutions: tuple[tuple[int, int], ...]  # (width, height) choices, landscape
    portrait_prob: float = 0.0
    cast_gains: tuple[float, float, float] = (1.0, 1.0, 1.0)  # mean white-balance error
    cast_jitter: float = 0.06
    saturation: Range = (0.9, 1.1)
    noise_sigma: Range = (1.0, 3.0)  # in 8-bit levels, at output resolution
    jpeg_quality: tuple[int, int] = (85, 95)
    subsampling: int = 2  # Pillow: 0 = 4:4:4, 2 = 4:2:0
    vignette_prob: float = 0.0  # circular colposcope aperture with black border
    vignette_radius: Range = (0.3, 0.45)  # relative to the image diagonal
    specular: bool = True  # False for cross-polarised light (MobileODT EVA)
    falloff: Range = (0.1, 0.35)  # illumination drop towards the corners
    blur_prob: float = 0.1
    text_prob: float = 0.3  # burned-in timestamp / device text
    magnification_prob: float = 0.0
    annotation_prob: float = 0.0  # arrows, lesion outlines drawn by a clinician
    zoom: Range = (0.15, 0.9)  # fraction of the frame's short side the cervix spans, squared-ish
    off_centre: float = 0.12  # std of the cervix centre offset, fraction of the frame
    cutoff_prob: float = 0.05  # cervix partly outside the frame
    speculum_prob: float = 0.8
    swab_prob: float = 0.1
    green_modes: tuple[str, ...] = ("physical", "digital")


@dataclass(frozen=True)
class SourceProfile:
    """A site: one device, its population and its protocol."""

    name: str
    device: DeviceProfile
    weight: float  # share of patients
    nonregular_weight: float  # relative chance that a patient has green/iodine images
    images_per_patient: Range = (2, 5)
    lesion_prob: float = 0.3
    blood_prob: float = 0.15
    text_style: str = "timestamp"  # which burned-in text this site's software writes
    extra: dict[str, float] = field(default_factory=dict)


DSLR_COLPOSCOPE = DeviceProfile(
    name="dslr-colposcope",
    resolutions=((3000, 2000), (3456, 2304), (2592, 1728)),
    cast_gains=(1.10, 0.98, 0.82),  # halogen: warm
    saturation=(0.95, 1.2),
    noise_sigma=(0.5, 2.0),
    jpeg_quality=(90, 97),
    subsampling=0,
    vignette_prob=0.85,
    specular=True,
    falloff=(0.25, 0.5),
    text_prob=0.6,
    magnification_prob=0.5,
    annotation_prob=0.15,
    zoom=(0.35, 0.9),
    off_centre=0.06,
    cutoff_prob=0.0,
    speculum_prob=0.7,
)

SMARTPHONE = DeviceProfile(
    name="smartphone",
    resolutions=((4032, 3024), (4000, 3000), (1920, 1080), (3264, 2448)),
    portrait_prob=0.3,
    cast_gains=(1.02, 1.0, 0.98),
    cast_jitter=0.10,  # auto white balance wanders
    saturation=(0.9, 1.35),
    noise_sigma=(2.0, 6.0),
    jpeg_quality=(72, 92),
    vignette_prob=0.0,
    specular=True,
    falloff=(0.2, 0.6),  # flash
    blur_prob=0.2,
    text_prob=0.15,
    zoom=(0.15, 0.6),
    off_centre=0.18,
    cutoff_prob=0.15,
    speculum_prob=0.95,
    swab_prob=0.2,
    green_modes=("digital",),
)

EVA = DeviceProfile(
    name="eva",
    resolutions=((2048, 1536), (1600, 1200)),
    cast_gains=(0.94, 1.0, 1.08),  # LED: cool
    saturation=(0.8, 1.05),
    noise_sigma=(1.5, 4.0),
    jpeg_quality=(80, 92),
    vignette_prob=0.0,
    specular=False,  # cross-polarised
    falloff=(0.15, 0.4),
    text_prob=0.35,
    zoom=(0.3, 0.85),
    off_centre=0.1,
    cutoff_prob=0.08,
    speculum_prob=0.9,
    green_modes=("digital",),
)

VIDEO_COLPOSCOPE = DeviceProfile(
    name="video-colposcope",
    resolutions=((640, 480), (720, 576), (768, 576)),
    cast_gains=(1.0, 1.04, 0.96),
    cast_jitter=0.08,
    saturation=(0.6, 0.9),  # washed out
    noise_sigma=(3.0, 8.0),
    jpeg_quality=(45, 75),
    vignette_prob=0.5,
    vignette_radius=(0.33, 0.5),
    specular=True,
    falloff=(0.1, 0.3),
    blur_prob=0.3,
    text_prob=0.8,
    magnification_prob=0.7,
    annotation_prob=0.05,
    zoom=(0.3, 0.9),
    off_centre=0.08,
    cutoff_prob=0.05,
    speculum_prob=0.6,
    green_modes=("physical", "digital"),
)

DIGITAL_COLPOSCOPE = DeviceProfile(
    name="digital-colposcope",
    resolutions=((1280, 960), (1920, 1080), (1600, 1200)),
    cast_gains=(1.04, 0.97, 0.97),
    cast_jitter=0.07,
    saturation=(1.0, 1.3),
    noise_sigma=(1.0, 3.5),
    jpeg_quality=(80, 95),
    vignette_prob=0.3,
    specular=True,
    falloff=(0.15, 0.45),
    text_prob=0.7,
    magnification_prob=0.4,
    annotation_prob=0.35,  # teaching images: arrows and outlines
    zoom=(0.25, 0.9),
    off_centre=0.12,
    cutoff_prob=0.1,
    speculum_prob=0.75,
    swab_prob=0.15,
)

SOURCES: dict[str, SourceProfile] = {
    s.name: s
    for s in (
        SourceProfile("hospital", DSLR_COLPOSCOPE, weight=0.2, nonregular_weight=3.0,
                      images_per_patient=(3, 6), lesion_prob=0.35, text_style="id_timestamp"),
        SourceProfile("field", SMARTPHONE, weight=0.3, nonregular_weight=0.6,
                      images_per_patient=(1, 4), lesion_prob=0.2, blood_prob=0.2),
        SourceProfile("evanet", EVA, weight=0.25, nonregular_weight=0.6,
                      images_per_patient=(1, 3), lesion_prob=0.25, text_style="device"),
        SourceProfile("archive", VIDEO_COLPOSCOPE, weight=0.1, nonregular_weight=2.0,
                      images_per_patient=(2, 5), lesion_prob=0.3, text_style="timestamp"),
        SourceProfile("teaching", DIGITAL_COLPOSCOPE, weight=0.15, nonregular_weight=2.5,
                      images_per_patient=(2, 6), lesion_prob=0.7, text_style="teaching"),
    )
}
