"""The label-stability benchmark (tests/benchmarks/label_stability.py): every variant of every
photo is run and counted against its original, turned photos as displayed."""

import io

import numpy as np
import pandas as pd
from PIL import Image

from pipelines.engine.qc import QCPipeline
from tests.benchmarks.label_stability import JPEG_QUALITIES, PNG_VARIANTS, label_flips, summary, variants
from tests.qc_fixtures import textured_scene, tiny_weights


def test_variants_are_made_from_the_photo_as_displayed_and_only_the_named_change_differs():
    stored = textured_scene(3, (300, 200))  # as a phone turned 90° stores it
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "PNG", exif=exif)
    made = variants(buf.getvalue())
    assert set(made) == {f"jpeg{q}" for q in JPEG_QUALITIES} | set(PNG_VARIANTS)
    control = Image.open(io.BytesIO(made["png"]))
    assert control.size == (200, 300) and control.format == "PNG"  # upright, lossless
    assert np.array_equal(np.asarray(control), np.asarray(stored.transpose(Image.Transpose.ROTATE_270)))
    assert Image.open(io.BytesIO(made["rot90"])).size == (300, 200)
    assert Image.open(io.BytesIO(made["half"])).size == (100, 150)
    assert Image.open(io.BytesIO(made["jpeg50"])).format == "JPEG"


def test_each_photo_gets_a_row_per_variant_and_the_summary_counts_the_flips(tmp_path):
    for k in range(2):
        textured_scene(k, (320, 240)).save(tmp_path / f"{k}.jpg", quality=90)
    rows = pd.DataFrame({"path": ["0.jpg", "1.jpg"], "abspath": [str(tmp_path / "0.jpg"), str(tmp_path / "1.jpg")],
                         "source": "s", "kind": ["regular", "no_cervix"]})
    qc = QCPipeline(tiny_weights(tmp_path / "w", detector_threshold=0.0))
    try:
        flips = label_flips(qc, rows, batch=4)
    finally:
        qc.close()
    assert len(flips) == 2 * (len(JPEG_QUALITIES) + len(PNG_VARIANTS))
    assert set(flips["before"]) <= {"regular", "non_regular", "no_cervix"}
    flips["before"] = flips["after"] = np.where(flips["path"] == "1.jpg", "no_cervix", "regular")
    flips.loc[(flips["path"] == "1.jpg") & (flips["variant"] == "rot90"), "after"] = "unreadable"  # one flip
    said = summary(flips)
    assert "| rot90 | 1 (50.0%) | X>U 1 |" in said and "| png | 0 (0.0%) |  |" in said
    assert "no_cervix 7.1%, regular 0.0%" in said  # 1 of its 14 variants
    assert "photos flipped by at least one variant: 1 of 2" in said
