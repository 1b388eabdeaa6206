"""A box file and the photos it describes: the frame its boxes are drawn in, the spelling of
its paths, and the per-split files `split --coco` writes. Tiny generated photos only."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.data.coco import CocoCategory, CocoDataset, CocoError, CocoImage, make_annotation, save_coco


def _photo(path: Path, size=(64, 48), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=95)
    return path


def _boxes(root: Path, recorded: dict[str, tuple[int, int]]) -> Path:
    ds = CocoDataset(images=[CocoImage(id=i, file_name=name, width=w, height=h)
                             for i, (name, (w, h)) in enumerate(recorded.items(), 1)],
                     annotations=[make_annotation(i, i, 1, (4, 4, 30, 30)) for i in range(1, len(recorded) + 1)],
                     categories=[CocoCategory(id=1, name="cervix")])
    return save_coco(ds, root / "boxes.json")


def _manifest(root: Path, paths: list[str], splits: list[str] | None = None) -> Path:
    df = pd.DataFrame({"path": paths, "patient_id": [f"p{i}" for i in range(len(paths))], "source": "s",
                       "device": "d", "kind": "regular"})
    if splits is not None:
        df["split"] = splits
    df.to_csv(root / "m.csv", index=False)
    return root / "m.csv"


def test_a_box_file_recording_another_size_than_the_photos_is_refused_by_training_and_crops(tmp_path):
    """The detector scaled such boxes to the photo and the stage-2 crops did not: a photo
    resized after boxing trained the two on different regions, unsaid."""
    from pipelines.data.crop_set import split_crops
    from pipelines.data.detection import CocoDetection
    from pipelines.data.coco import load_coco

    _photo(tmp_path / "a.jpg", (64, 48))
    _photo(tmp_path / "b.jpg", (64, 48), seed=1)
    coco = _boxes(tmp_path, {"a.jpg": (64, 48), "b.jpg": (128, 96)})  # b was boxed at twice its size
    with pytest.raises(CocoError, match="b.jpg: recorded 128x96, the photo is 64x48"):
        CocoDetection(load_coco(coco), tmp_path)
    manifest = _manifest(tmp_path, ["a.jpg", "b.jpg"], ["train", "train"])
    with pytest.raises(ValueError, match="b.jpg: recorded 128x96"):
        split_crops(manifest, coco, 32, splits=("train",))
    _boxes(tmp_path, {"a.jpg": (64, 48), "b.jpg": (64, 48)})
    assert len(CocoDetection(load_coco(coco), tmp_path)) == 2
    assert len(split_crops(manifest, coco, 32, splits=("train",))["train"]) == 2


def test_paths_spelt_with_dot_slash_find_their_boxes_in_every_split_and_a_stale_split_file_goes(tmp_path):
    """`./a.jpg` in the manifest and `a.jpg` in the box file: the per-split box files were not
    written and every crop set came out empty, exit 0. A second split left the first one's
    test file, whose photos were now in train."""
    from pipelines.data.crop_set import split_crops

    names = [f"p{i}.jpg" for i in range(12)]
    for i, n in enumerate(names):
        _photo(tmp_path / n, seed=i)
    coco = _boxes(tmp_path, {n: (64, 48) for n in names})
    manifest = _manifest(tmp_path, [f"./{n}" for n in names])
    r = CliRunner().invoke(app, ["split", str(manifest), "-o", str(tmp_path / "s.csv"), "--coco", str(coco),
                                 "--fractions", "0.5,0.25,0.25"])
    assert r.exit_code == 0, r.output
    parts = {s: json.loads((tmp_path / f"s_{s}.json").read_text()) for s in ("train", "val", "test")}
    assert sum(len(p["images"]) for p in parts.values()) == 12
    crops = split_crops(tmp_path / "s.csv", coco, 32)
    assert sum(len(c) for c in crops.values()) == 12
    r = CliRunner().invoke(app, ["split", str(manifest), "-o", str(tmp_path / "s.csv"), "--coco", str(coco),
                                 "--fractions", "0.75,0.25,0"])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "s_test.json").exists() and "removed" in r.output


def _split_with_boxes(tmp_path, manifest, out, coco, seed=0):
    r = CliRunner().invoke(app, ["split", str(manifest), "-o", str(out), "--coco", str(coco),
                                 "--fractions", "0.5,0.25,0.25", "--seed", str(seed)])
    assert r.exit_code == 0, r.output
    rows = pd.read_csv(out)
    for name in ("train", "val", "test"):
        part = json.loads((out.parent / f"{out.stem}_{name}.json").read_text())
        named = {(out.parent / im["file_name"]).resolve() for im in part["images"]}
        assert named == {(out.parent / p).resolve() for p in rows.loc[rows["split"] == name, "path"]}, name
    return rows


def test_split_coco_with_absolute_manifest_paths_writes_every_split_box_file(tmp_path):
    """The manifest's paths and the box file's names were compared as spelt: absolute paths
    matched no box, no split file was written and the split said exit 0."""
    names = [f"p{i}.jpg" for i in range(12)]
    for i, n in enumerate(names):
        _photo(tmp_path / n, seed=i)
    coco = _boxes(tmp_path, {n: (64, 48) for n in names})
    manifest = _manifest(tmp_path, [str(tmp_path / n) for n in names])
    _split_with_boxes(tmp_path, manifest, tmp_path / "s.csv", coco)


def test_split_into_another_folder_writes_its_box_files_beside_it_not_over_another_splits(tmp_path):
    """`-o other/s.csv` wrote its box files beside the boxes under `s_*.json`, replacing those
    of the split there: that split's training boxes then held its own test patients."""
    names = [f"p{i}.jpg" for i in range(16)]
    for i, n in enumerate(names):
        _photo(tmp_path / n, seed=i)
    coco = _boxes(tmp_path, {n: (64, 48) for n in names})
    manifest = _manifest(tmp_path, names)
    _split_with_boxes(tmp_path, manifest, tmp_path / "s.csv", coco, seed=0)
    before = {n: (tmp_path / f"s_{n}.json").read_bytes() for n in ("train", "val", "test")}
    (tmp_path / "other").mkdir()
    _split_with_boxes(tmp_path, manifest, tmp_path / "other" / "s.csv", coco, seed=1)
    assert {n: (tmp_path / f"s_{n}.json").read_bytes() for n in ("train", "val", "test")} == before


def test_split_coco_that_names_no_row_is_refused_before_anything_is_written(tmp_path):
    names = [f"p{i}.jpg" for i in range(4)]
    for i, n in enumerate(names):
        _photo(tmp_path / "a" / n, seed=i)
    coco = _boxes(tmp_path, {n: (64, 48) for n in names})  # names one folder too high
    manifest = _manifest(tmp_path, [f"a/{n}" for n in names])
    r = CliRunner().invoke(app, ["split", str(manifest), "-o", str(tmp_path / "s.csv"), "--coco", str(coco)])
    assert r.exit_code == 2 and "none of its 4 images is a row of the manifest" in r.output
    assert not (tmp_path / "s.csv").exists() and not list(tmp_path.glob("s_*.json"))


def test_training_decodes_a_16_bit_png_as_the_engine_does(tmp_path):
    """PIL's own conversion turned it white in training while the engine read its greys."""
    from pipelines.data.images import load_rgb
    from pipelines.engine.decode import decode

    grey = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 20)
    Image.fromarray(grey).save(tmp_path / "deep.png")  # a 16-bit greyscale PNG
    trained, _, _ = load_rgb(tmp_path / "deep.png")
    served = decode((tmp_path / "deep.png").read_bytes()).image
    assert trained.shape == served.shape and int((trained.int() - served.int()).abs().max()) == 0
    assert 50 < float(trained.float().mean()) < 200


def test_a_training_photo_that_does_not_decode_is_named(tmp_path):
    """A truncated photo in a training set was a 200-line traceback naming no file, hours into
    a run where it came from the extra collection (drawn anew each epoch)."""
    from pipelines.data.images import load_rgb
    from tests.qc_fixtures import jpeg_bytes, textured_scene

    cut = tmp_path / "cut.jpg"
    cut.write_bytes(jpeg_bytes(textured_scene(1))[:600])
    for path in (cut, tmp_path / "gone.jpg"):
        with pytest.raises(ValueError, match=f"{path.name}: cannot read it as an image"):
            load_rgb(path)


def test_a_training_file_that_is_no_image_at_all_is_named_with_what_to_do(tmp_path):
    """A crop set's file that PIL cannot identify was exit 1 with PIL's words alone, where a
    truncated JPEG was named with what to do (an audit)."""
    import pandas as pd

    from pipelines.data.crop_set import extract_crops

    (tmp_path / "notes.jpg").write_text("not a photo")
    rows = pd.DataFrame({"path": ["notes.jpg"], "patient_id": ["p"], "source": ["s"], "kind": ["regular"]})
    with pytest.raises(ValueError, match="notes.jpg: cannot read it as an image .*take it out of the manifest"):
        extract_crops(rows, {"notes.jpg": [[0, 0, 10, 10]]}, 32, root=tmp_path)


def test_crops_of_a_split_written_into_another_folder_find_the_boxes_of_the_original_box_file(tmp_path):
    """`split -o other/s.csv` names photos `../p0.jpg`, the box file beside them `p0.jpg`: every
    cervix photo read as unboxed, and training refused (or, with --allow-unboxed, had no crop)."""
    from pipelines.data.crop_set import split_crops

    names = [f"p{i}.jpg" for i in range(8)]
    for i, n in enumerate(names):
        _photo(tmp_path / n, seed=i)
    coco = _boxes(tmp_path, {n: (64, 48) for n in names})
    manifest = _manifest(tmp_path, names)
    (tmp_path / "other").mkdir()
    rows = _split_with_boxes(tmp_path, manifest, tmp_path / "other" / "s.csv", coco)
    assert rows["path"].str.startswith("../").all()
    crops = split_crops(tmp_path / "other" / "s.csv", coco, 32)
    assert sum(len(c) for c in crops.values()) == 8 and not any(c.unboxed for c in crops.values())


def test_a_box_file_naming_one_photo_twice_in_two_spellings_is_refused(tmp_path):
    """`./a.jpg` beside `a.jpg`: every reader looks names up as `path_key` spells them, so one
    of the two images' boxes was lost."""
    from pipelines.data.coco import validate_coco

    twice = CocoDataset(images=[CocoImage(id=1, file_name="a.jpg", width=64, height=48),
                                CocoImage(id=2, file_name="./a.jpg", width=64, height=48)],
                        categories=[CocoCategory(id=1, name="cervix")])
    assert validate_coco(twice) == ["1 file_name(s) used by several images (e.g. 'a.jpg' and './a.jpg')"]
    with pytest.raises(CocoError, match="used by several images"):
        save_coco(twice, tmp_path / "twice.json")
