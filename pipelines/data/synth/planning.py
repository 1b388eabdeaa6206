"""Which images a synthetic dataset holds: patients, sources, kinds and acetic-acid stages.

Planning is separate from rendering so that the image list (and so the manifest) is known
before a single pixel is drawn, and each image can be rendered alone, in any process, from
its spec: that is what makes the output deterministic under parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipelines.data.schema import Kind
from pipelines.data.synth.profiles import SOURCES
from pipelines.data.synth.render import ImageSpec, SizePolicy


@dataclass(frozen=True)
class SynthConfig:
    n_images: int = 2000
    seed: int = 0
    ratio: float = 27.0  # regular : non-regular, the paper's training set is ~27.3
    no_cervix_fraction: float = 0.04
    iodine_share: float = 0.5  # of the non-regular images
    sources: tuple[str, ...] = tuple(SOURCES)
    size: SizePolicy = field(default_factory=SizePolicy)

    def __post_init__(self) -> None:
        if self.n_images < 1:
            raise ValueError("n_images must be at least 1")
        if not 0 < self.ratio < float("inf"):  # nan passed `<= 0` and failed in int(), a traceback (an audit)
            raise ValueError("ratio (regular : non-regular) must be a positive number")
        if not 0 <= self.no_cervix_fraction < 1:
            raise ValueError("no_cervix_fraction must be in [0, 1)")
        unknown = set(self.sources) - set(SOURCES)
        if unknown or not self.sources:
            raise ValueError(f"unknown source(s) {sorted(unknown)}; available: {list(SOURCES)}")


PRESETS: dict[str, SynthConfig] = {
    # Tests: every source and kind present, small images, a few seconds on 2 cores.
    "tiny": SynthConfig(n_images=60, ratio=3.0, no_cervix_fraction=0.1, size=SizePolicy(max_side=256)),
    # Demos and CPU training recipes.
    "small": SynthConfig(n_images=1200, ratio=27.0, size=SizePolicy(max_side=1024)),
    # The paper's imbalance at a size that trains the default weights.
    "default": SynthConfig(n_images=6000, ratio=27.0, size=SizePolicy(max_side=1600)),
    # Clinic-sized photos (1-12 MP) for benchmarks.
    "clinic": SynthConfig(n_images=200, ratio=27.0),
}


def counts(config: SynthConfig) -> tuple[int, int, int]:
    """(regular, non-regular, no_cervix) image counts."""
    n_nc = int(round(config.n_images * config.no_cervix_fraction))
    n_cervix = config.n_images - n_nc
    n_nonreg = int(round(n_cervix / (config.ratio + 1.0)))
    return n_cervix - n_nonreg, n_nonreg, n_nc


def plan(config: SynthConfig) -> list[ImageSpec]:
    rng = np.random.default_rng([config.seed, 0xC0FFEE])
    profiles = [SOURCES[s] for s in config.sources]
    weights = np.array([p.weight for p in profiles])
    n_reg, n_nonreg, n_nc = counts(config)

    # Patients with their regular (pre/post acetic acid) images.
    patients: list[dict] = []
    left = n_reg
    while left > 0 or not patients:
        src = profiles[int(rng.choice(len(profiles), p=weights / weights.sum()))]
        lo, hi = src.images_per_patient
        k = min(int(rng.integers(lo, hi + 1)), max(left, 0))
        patients.append({"source": src.name, "kinds": [Kind.REGULAR] * k})
        left -= k

    # Non-regular images go to patients of sources that use green filters and iodine more.
    pw = np.array([SOURCES[p["source"]].nonregular_weight for p in patients], float)
    pw /= pw.sum()
    replace = n_nonreg > len(patients)
    chosen = rng.choice(len(patients), size=n_nonreg, replace=replace, p=pw) if n_nonreg else []
    for i in chosen:
        kind = Kind.IODINE if rng.random() < config.iodine_share else Kind.GREEN
        patients[int(i)]["kinds"].append(kind)
    for i in rng.choice(len(patients), size=n_nc, replace=True) if n_nc else []:
        patients[int(i)]["kinds"].append(Kind.NO_CERVIX)

    specs: list[ImageSpec] = []
    for pi, p in enumerate(patients):
        pid = f"{p['source']}-{pi:05d}"
        regular_seen = 0
        for j, kind in enumerate(p["kinds"]):
            if kind == Kind.REGULAR:
                stage = "pre" if regular_seen == 0 and rng.random() < 0.5 else "post"
                regular_seen += 1
            else:
                stage = kind.value
            specs.append(ImageSpec(f"{pid}-{j:02d}", pid, pi, j, p["source"], kind, stage, config.seed))
    return specs
