import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipelines.data.coco import load_coco
from pipelines.data.manifest import load_manifest
from pipelines.data.synth import PRESETS, SizePolicy, SynthConfig, generate, plan, render_image
from pipelines.data.synth.planning import counts
from pipelines.data.synth.profiles import SOURCES


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "synth_config.json"}


def test_same_seed_writes_identical_files_and_another_seed_does_not(tmp_path, tiny_dataset):
    again = generate(PRESETS["tiny"], tmp_path / "again", workers=1)
    other = generate(replace(PRESETS["tiny"], seed=1), tmp_path / "other", workers=1)
    first = _digests(tiny_dataset.out_dir)
    assert _digests(again.out_dir) == first
    differing = set(_digests(other.out_dir).items()) - set(first.items())
    assert len(differing) > len(first) // 2


def test_parallel_workers_write_the_same_bytes_as_one_process(tmp_path):
    cfg = SynthConfig(n_images=100, seed=4, size=SizePolicy(max_side=96))
    serial = generate(cfg, tmp_path / "serial", workers=1)
    parallel = generate(cfg, tmp_path / "parallel", workers=2)
    assert _digests(serial.out_dir) == _digests(parallel.out_dir)


def test_tiny_preset_has_every_source_and_kind_and_valid_manifest_and_coco(tiny_dataset):
    df = load_manifest(tiny_dataset.manifest)  # validates every row, files included
    assert set(df["source"]) == set(SOURCES)
    assert set(df["kind"]) == {"regular", "green", "iodine", "no_cervix"}
    coco = COCO(str(tiny_dataset.coco))
    assert len(coco.getImgIds()) == len(df)
    by_file = load_coco(tiny_dataset.coco).boxes_by_file("cervix")
    for path, kind in zip(df["path"], df["kind"]):
        assert len(by_file[path]) == (0 if kind == "no_cervix" else 1), path
        with Image.open(tiny_dataset.out_dir / path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"


def test_photos_the_camera_model_blurred_are_marked_known_blurred_in_the_manifest(tiny_dataset):
    """A findings calibration on the generator's photos must not count them as sharp (the
    manifest's `known_findings`); the mark is the camera's own blur, so marked photos read
    blurrier than the rest by the engine's blur score."""
    import torch

    from pipelines.engine.findings import finding_scores

    df = load_manifest(tiny_dataset.manifest)
    assert set(df["known_findings"]) == {"", "blur"}
    cervix = df[df["kind"] != "no_cervix"]
    marked = cervix["known_findings"] == "blur"
    assert 0.05 < marked.mean() < 0.4  # the profiles blur 10-30% of photos
    crops = torch.stack([torch.from_numpy(np.array(Image.open(tiny_dataset.out_dir / p).convert("RGB")
                                                   .resize((128, 128), Image.BOX))).permute(2, 0, 1)
                         for p in cervix["path"]]).float() / 255
    blur = finding_scores(crops)["blur"].numpy()
    assert np.median(blur[marked.to_numpy()]) > np.percentile(blur[~marked.to_numpy()], 90)


def test_patients_have_several_images_with_pre_and_post_acetic_acid(tiny_dataset):
    df = pd.read_csv(tiny_dataset.manifest)
    assert df.groupby("patient_id").size().max() >= 3
    regular = df[df["kind"] == "regular"]
    assert set(regular["stage"]) == {"pre", "post"}
    # A patient keeps one source across all her images.
    assert (df.groupby("patient_id")["source"].nunique() == 1).all()


def test_counts_follow_the_requested_ratio_and_no_cervix_share():
    cfg = SynthConfig(n_images=2800, ratio=27.0, no_cervix_fraction=0.04)
    reg, nonreg, nc = counts(cfg)
    assert (reg, nonreg, nc) == (2592, 96, 112)
    kinds = pd.Series([s.kind.value for s in plan(cfg)]).value_counts()
    assert kinds["regular"] == reg and kinds["green"] + kinds["iodine"] == nonreg and kinds["no_cervix"] == nc


def test_every_box_contains_its_cervix_exactly_even_when_cut_off_by_the_frame():
    cfg = SynthConfig(n_images=150, seed=7, ratio=4.0, size=SizePolicy(max_side=96))
    touching = 0
    for spec in plan(cfg)[:150]:
        img = render_image(spec, cfg.size)
        if img.cervix is None:
            assert img.box is None
            continue
        xs = (np.arange(img.width) + 0.5)[None, :]
        ys = (np.arange(img.height) + 0.5)[:, None]
        inside = img.cervix.contains(xs, ys)
        rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
        x1, y1, x2, y2 = img.box
        # Every pixel whose centre is on the cervix lies in the box, and the box is tight.
        assert x1 <= cols[0] + 0.5 and cols[-1] + 0.5 <= x2 and y1 <= rows[0] + 0.5 and rows[-1] + 0.5 <= y2
        assert cols[0] - x1 <= 1 and x2 - cols[-1] - 1 <= 1 and rows[0] - y1 <= 1 and y2 - rows[-1] - 1 <= 1
        assert 0 <= x1 < x2 <= img.width and 0 <= y1 < y2 <= img.height
        touching += x1 == 0 or y1 == 0 or x2 == img.width or y2 == img.height
    assert touching >= 3  # partly cut-off cervixes are in the set


def test_generator_refuses_nonsense_configs():
    with pytest.raises(ValueError, match="unknown source"):
        SynthConfig(sources=("nowhere",))
    with pytest.raises(ValueError, match="ratio"):
        SynthConfig(ratio=0)
