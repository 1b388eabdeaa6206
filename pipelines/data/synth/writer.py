"""Render a planned dataset to disk: JPEGs, a manifest (CSV) and COCO boxes.

Layout under OUT: images/<source>/<patient>/<image>.jpg, manifest.csv, coco.json and
synth_config.json (what produced it). Rendering fans out over processes; results come back
in plan order, so the files are byte-identical for a given config whatever the worker count.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from pipelines.data.coco import CERVIX, CocoCategory, CocoDataset, CocoImage, make_annotation, save_coco
from pipelines.data.manifest import write_manifest
from pipelines.outputs import write_atomically
from pipelines.data.synth.planning import SynthConfig, plan
from pipelines.data.synth.profiles import SOURCES
from pipelines.data.synth.render import ImageSpec, RenderedImage, image_path, render_to_file, worker_init


@dataclass(frozen=True)
class SynthResult:
    out_dir: Path
    manifest: Path
    coco: Path
    n_images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.n_images / max(self.seconds, 1e-9)


def _rendered(jobs, workers: int) -> Iterator[tuple[ImageSpec, RenderedImage]]:
    if workers <= 1 or len(jobs) < 100:  # starting processes costs ~2 s
        yield from map(render_to_file, jobs)
        return
    # spawn: the parent may hold torch/OpenMP threads, which fork does not copy safely.
    with mp.get_context("spawn").Pool(workers, initializer=worker_init) as pool:
        yield from pool.imap(render_to_file, jobs, chunksize=4)


def generate(
    config: SynthConfig,
    out_dir: str | Path,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SynthResult:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    specs = plan(config)
    jobs = [(s, config.size, str(out)) for s in specs]
    rows, images, annotations = [], [], []
    start = time.perf_counter()
    for i, (spec, img) in enumerate(_rendered(jobs, workers), start=1):
        rel = image_path(spec)
        rows.append({
            "path": rel, "patient_id": spec.patient_id, "source": spec.source,
            "device": SOURCES[spec.source].device.name, "kind": spec.kind.value,
            "stage": spec.stage, "detail": img.detail, "width": img.width, "height": img.height,
            "known_findings": img.known_findings,
        })
        images.append(CocoImage(id=i, file_name=rel, width=img.width, height=img.height))
        if img.box is not None:
            annotations.append(make_annotation(len(annotations) + 1, i, 1, img.box))
        if progress:
            progress(i, len(jobs))
    seconds = time.perf_counter() - start
    manifest = write_manifest(pd.DataFrame(rows), out / "manifest.csv")
    coco = save_coco(
        CocoDataset(
            info={"description": "cervixqc synthetic multi-source set", "seed": config.seed,
                  "generator": "cervixqc synth"},
            images=images, annotations=annotations,
            categories=[CocoCategory(id=1, name=CERVIX, supercategory="anatomy")],
        ),
        out / "coco.json",
    )
    meta = asdict(config) | {"n_written": len(rows)}
    text = json.dumps(meta, indent=2, default=str)
    write_atomically(out / "synth_config.json", lambda tmp: tmp.write_text(text))
    return SynthResult(out, manifest, coco, len(rows), seconds)
