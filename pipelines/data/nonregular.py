"""The two "non-regular" looks of the paper, as image transforms on float RGB in [0, 1].

Used twice: by the synthetic generator (which knows where the iodine-negative tissue is)
and as training augmentations that turn regular crops into minority-class images, the
hSDB answer to class imbalance (see `pipelines.data.transforms`).

Green filter. A green light source or lens filter lets the camera see only the tissue's
green-band reflectance, so the picture is nearly monochrome and red vessels (which absorb
green) turn dark. Camera white balance and digital "green filter" post-processing pull the
tint anywhere from saturated green to a barely-there cyan or grey-blue: the subtle end is
what the paper's models missed, and it is deliberately inside the range of cool colour
casts that regular images from LED devices have.

Lugol's iodine. Glycogen-rich squamous epithelium stains mahogany brown to nearly black;
columnar epithelium and many lesions stay iodine-negative, mustard-yellow to saffron.
Staining is uneven, so its strength is modulated by a smooth random field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.data.texture import blend, smooth_noise

# Green-band weights: what a sensor sees through a green filter.
_GREEN_BAND = np.array([0.12, 0.78, 0.10], np.float32)


@dataclass(frozen=True)
class GreenFilterParams:
    tint: tuple[float, float, float]  # colour of a white surface under the filter, max 1
    strength: float  # 0 = untouched, 1 = fully monochrome through the tint
    contrast: float  # gamma on the green-band luminance (>1 darkens vessels further)


@dataclass(frozen=True)
class IodineParams:
    stained: tuple[float, float, float]  # mahogany .. near-black
    negative: tuple[float, float, float]  # mustard yellow .. saffron
    strength: float  # overall uptake
    patchiness: float  # 0 = even, 1 = very uneven


# Named tints from strong green to barely-there. Weighted towards the hard end on purpose.
GREEN_TINTS: dict[str, tuple[float, float, float]] = {
    "green": (0.30, 1.00, 0.42),
    "emerald": (0.20, 0.95, 0.60),
    "teal": (0.42, 0.95, 0.85),
    "cyan": (0.62, 0.92, 0.95),
    "grey_blue": (0.78, 0.86, 0.96),
    "grey_green": (0.80, 0.92, 0.82),
}


def sample_green_params(rng: np.random.Generator, subtle_bias: float = 0.5) -> GreenFilterParams:
    """Draw a green-filter look; `subtle_bias` in [0, 1] shifts mass towards faint tints."""
    names = list(GREEN_TINTS)
    weights = np.array([1.0, 0.8, 1.0, 1.0 + subtle_bias, 1.0 + 2 * subtle_bias, 1.0 + subtle_bias])
    name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    base = np.array(GREEN_TINTS[name], np.float32)
    tint = np.clip(base + rng.normal(0, 0.04, 3), 0.05, 1.0)
    tint = tint / tint.max()
    faint = name in ("cyan", "grey_blue", "grey_green")
    lo = 0.55 if faint else 0.7
    strength = float(rng.uniform(lo, 1.0))
    return GreenFilterParams(tuple(float(t) for t in tint), strength, float(rng.uniform(0.9, 1.6)))


def green_filter(image: np.ndarray, params: GreenFilterParams) -> np.ndarray:
    """Return a copy of `image` (H, W, 3 float32 in [0, 1]) as seen through a green filter."""
    band = image @ _GREEN_BAND
    band = np.clip(band, 0.0, 1.0) ** params.contrast
    # Rescale so that the brightest tissue keeps its brightness after the band pass.
    band *= min(2.5, 0.9 / max(float(np.percentile(band, 99)), 1e-3))
    filtered = np.clip(band[..., None] * np.asarray(params.tint, np.float32), 0.0, 1.0)
    return blend(image.copy(), filtered, params.strength)


def sample_iodine_params(rng: np.random.Generator) -> IodineParams:
    darkness = rng.uniform(0.0, 1.0)
    stained = np.array([0.42, 0.19, 0.08]) * (1 - 0.6 * darkness) + rng.normal(0, 0.02, 3)
    negative = np.array([0.86, 0.66, 0.22]) + rng.normal(0, 0.05, 3)
    return IodineParams(
        stained=tuple(float(v) for v in np.clip(stained, 0.02, 1)),
        negative=tuple(float(v) for v in np.clip(negative, 0.05, 1)),
        strength=float(rng.uniform(0.55, 1.0)),
        patchiness=float(rng.uniform(0.0, 0.8)),
    )


def redness_mask(image: np.ndarray) -> np.ndarray:
    """Where the tissue is redder than its surroundings: columnar epithelium, ectropion.

    Used as the iodine-negative region when the caller has no anatomy to go by.
    """
    red = image[..., 0] - 0.5 * (image[..., 1] + image[..., 2])
    lo, hi = np.percentile(red, [50, 97])
    return np.clip((red - lo) / max(hi - lo, 1e-3), 0.0, 1.0).astype(np.float32)


def lugol_iodine(
    image: np.ndarray,
    negative_mask: np.ndarray,
    params: IodineParams,
    rng: np.random.Generator,
    uptake_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Stain `image`: brown where glycogen takes iodine, yellow where `negative_mask` is 1.

    `uptake_mask` (default everywhere) limits staining to tissue (not metal or gauze).
    """
    h, w = image.shape[:2]
    lum = np.clip(image @ np.array([0.3, 0.5, 0.2], np.float32), 0.0, 1.0)
    shade = (0.35 + 0.9 * lum)[..., None]
    uneven = 1.0 - params.patchiness * smooth_noise(rng, h, w, cells=6)
    strength = params.strength * uneven
    neg2 = np.clip(negative_mask, 0.0, 1.0)
    neg = neg2[..., None]
    stain = (1 - neg) * np.asarray(params.stained, np.float32) + neg * np.asarray(
        params.negative, np.float32
    )
    # Iodine-negative tissue shows the solution's own mustard colour however thin the
    # uptake elsewhere, so it is always strongly tinted.
    strength = strength * (1 - neg2) + np.maximum(strength, 0.85) * neg2
    if uptake_mask is not None:
        strength = strength * uptake_mask
    return blend(image.copy(), np.clip(stain * shade, 0.0, 1.0), strength)
