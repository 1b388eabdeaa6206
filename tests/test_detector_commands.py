"""`detect` and `eval-detector` on the inputs people give them: box files and manifests from
other folders, damaged files, cards of other models. Untrained tiny weights, generated photos."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.data.coco import CocoCategory, CocoDataset, CocoImage, load_coco, make_annotation, save_coco
from tests.qc_fixtures import tiny_weights

runner = CliRunner()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights(tmp_path_factory.mktemp("w"), detector_threshold=0.0)


def _collection(root: Path, n: int = 4) -> tuple[Path, Path]:
    """n photos under root/images, their boxes (root/boxes.json) and manifest (root/m.csv)."""
    g = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    images, anns, rows = [], [], []
    for k in range(1, n + 1):
        name = f"images/{k}.png"
        Image.fromarray(g.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(root / name)
        images.append(CocoImage(id=k, file_name=name, width=120, height=90))
        anns.append(make_annotation(k, k, 1, [20, 15, 60, 50]))
        rows.append({"path": name, "patient_id": f"p{k}", "source": "site" if k % 2 else "bank", "device": "d",
                     "kind": "regular"})
    coco = save_coco(CocoDataset(images=images, annotations=anns, categories=[CocoCategory(id=1, name="cervix")]),
                     root / "boxes.json")
    pd.DataFrame(rows).to_csv(root / "m.csv", index=False)
    return coco, root / "m.csv"


def _refused(r, *words: str) -> None:
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output  # one line, not a traceback
    for w in words:
        assert w in r.output, r.output


def test_eval_detector_refuses_a_damaged_box_file_before_the_model_runs(weights, tmp_path):
    coco, _ = _collection(tmp_path)
    card = str(weights / "detector.json")
    (tmp_path / "broken.json").write_text("{")
    _refused(runner.invoke(app, ["eval-detector", card, str(tmp_path / "broken.json"), "-o", str(tmp_path / "o")]),
             "broken.json", "not a COCO detection file")
    _refused(runner.invoke(app, ["eval-detector", card, str(tmp_path / "none.json"), "-o", str(tmp_path / "o")]),
             "none.json", "cannot read it")
    wrong = json.loads(coco.read_text())
    wrong["images"][1]["width"] = 999
    (tmp_path / "size.json").write_text(json.dumps(wrong))
    _refused(runner.invoke(app, ["eval-detector", card, str(tmp_path / "size.json"), "-o", str(tmp_path / "o")]),
             "recorded 999x90, the photo is 120x90")
    # `{}` (or another tool's JSON) read as an empty box file; one listing no images said "cannot write
    # empty image", exit 1, after a report of nulls (an audit)
    (tmp_path / "empty.json").write_text("{}")
    _refused(runner.invoke(app, ["eval-detector", card, str(tmp_path / "empty.json"), "-o", str(tmp_path / "o")]),
             "empty.json", 'no "images" list')
    (tmp_path / "no-images.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    _refused(runner.invoke(app, ["eval-detector", card, str(tmp_path / "no-images.json"), "-o", str(tmp_path / "o")]),
             "the box file lists no images")
    (tmp_path / "images" / "2.png").unlink()
    _refused(runner.invoke(app, ["eval-detector", card, str(coco), "-o", str(tmp_path / "o")]),
             "1 of its images are no file", "images/2.png")
    assert not (tmp_path / "o").exists()


def test_eval_detector_takes_a_manifest_from_another_folder_with_a_bom_and_capitalised_header(weights, tmp_path):
    """Names compared as spelt: a split written elsewhere (`../images/1.png`) matched no image
    and the per-source lines vanished, exit 0; a BOM or `Path` was a KeyError after inference."""
    coco, manifest = _collection(tmp_path)
    df = pd.read_csv(manifest)
    df["path"] = "../" + df["path"]
    (tmp_path / "other").mkdir()
    text = df.rename(columns={"path": "Path"}).to_csv(index=False)
    (tmp_path / "other" / "m.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    r = runner.invoke(app, ["eval-detector", str(weights / "detector.json"), str(coco), "-o", str(tmp_path / "o"),
                            "--manifest", str(tmp_path / "other" / "m.csv")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "o" / "detector_metrics.json").read_text())
    assert set(report) == {"overall", "site", "bank"}
    assert report["site"]["n_cervix"] + report["bank"]["n_cervix"] == report["overall"]["n_cervix"] == 4


def test_eval_detector_refuses_a_manifest_that_lacks_some_of_the_box_files_images(weights, tmp_path):
    """A manifest of another collection matched some images by name (other files) and left the
    rest out of every per-source figure, unsaid."""
    coco, manifest = _collection(tmp_path)
    pd.read_csv(manifest).iloc[:3].to_csv(tmp_path / "three.csv", index=False)
    _refused(runner.invoke(app, ["eval-detector", str(weights / "detector.json"), str(coco), "-o",
                                 str(tmp_path / "o"), "--manifest", str(tmp_path / "three.csv")]),
             "1 of the box file's 4 images are not its rows", "images/4.png")
    assert not (tmp_path / "o").exists()


def test_detect_lists_an_unreadable_photo_and_boxes_the_others(weights, tmp_path):
    """One corrupt photo was a traceback that lost the boxes of every other."""
    _, manifest = _collection(tmp_path)
    (tmp_path / "images" / "3.png").write_bytes(b"junk")
    r = runner.invoke(app, ["detect", str(weights / "detector.json"), str(manifest), "-o", str(tmp_path / "d.json")])
    assert r.exit_code == 0, r.output
    assert "1 photos could not be read" in r.output and "images/3.png" in r.output
    ds = load_coco(tmp_path / "d.json")
    assert sorted(im.file_name for im in ds.images) == ["images/1.png", "images/2.png", "images/4.png"]
    assert ds.info["unreadable"] == 1
    for k in (1, 2, 4):
        (tmp_path / "images" / f"{k}.png").write_bytes(b"junk")
    r = runner.invoke(app, ["detect", str(weights / "detector.json"), str(manifest), "-o", str(tmp_path / "e.json")])
    assert r.exit_code == 1 and "error: not one of the 4 photos could be read" in r.output, r.output
    assert not (tmp_path / "e.json").exists()


def test_detect_into_another_folder_names_photos_from_there(weights, tmp_path):
    """`-o det/boxes.json` wrote the manifest's own relative names, which name no file from
    det/, where eval-detector and training look them up."""
    _, manifest = _collection(tmp_path)
    out = tmp_path / "det" / "boxes.json"
    r = runner.invoke(app, ["detect", str(weights / "detector.json"), str(manifest), "-o", str(out)])
    assert r.exit_code == 0, r.output
    names = [im.file_name for im in load_coco(out).images]
    assert names[0] == "../images/1.png" and all((out.parent / n).is_file() for n in names)


def test_detect_refuses_a_card_that_is_not_a_detectors(weights, tmp_path):
    coco, manifest = _collection(tmp_path)
    for card, words in ((coco, "boxes.json"), (weights / "deep_sad.json", "not of a detector")):
        _refused(runner.invoke(app, ["detect", str(card), str(manifest), "-o", str(tmp_path / "d.json")]), *words)
    assert not (tmp_path / "d.json").exists()


def test_a_card_whose_config_its_builder_refuses_is_named_in_one_line_by_every_command_that_loads_one(
        weights, tmp_path):
    """`eval-detector`, `propose-boxes` and `eval` loaded one model outside the weights
    folder's check, and a config key the builder does not take was a TypeError traceback (an
    audit): the loaders name their card themselves now."""
    from models.io import load_weights, save_weights

    coco, manifest = _collection(tmp_path)
    folder = tmp_path / "w"
    for name in ("detector", "classifier"):
        state, card = load_weights(weights / f"{name}.json")
        save_weights(state, folder / name, card.model_copy(update={"config": {**card.config, "bogus_key": 1}}))
    said = "cannot load it (TypeError: ", "bogus_key"
    _refused(runner.invoke(app, ["eval-detector", str(folder / "detector.json"), str(coco), "-o",
                                 str(tmp_path / "o")]), "detector.json: ", *said)
    _refused(runner.invoke(app, ["propose-boxes", str(manifest), "-o", str(tmp_path / "p.json"), "--detector",
                                 str(folder / "detector.json")]), "detector.json: ", *said)
    pd.read_csv(manifest).assign(split="test").to_csv(tmp_path / "split.csv", index=False)
    _refused(runner.invoke(app, ["eval", str(folder / "classifier.json"), str(tmp_path / "split.csv"),
                                 "--coco", str(coco), "-o", str(tmp_path / "s")]), "classifier.json: ", *said)
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "o").exists()


def test_train_detector_refuses_an_extra_box_file_without_images(tmp_path):
    """`--extra-coco` of `{}` or of a file listing no images trained on the real photos alone,
    exit 0, and the card said `extra_ratio: 1.0` (an audit)."""
    coco, _ = _collection(tmp_path)
    (tmp_path / "empty.json").write_text("{}")
    (tmp_path / "no-images.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    for extra, said in (("empty.json", 'no "images" list'), ("no-images.json", "the extra boxes hold no image")):
        _refused(runner.invoke(app, ["train-detector", str(coco), str(coco), "-o", str(tmp_path / "run"),
                                     "--backbone", "resnet18", "--size", "64", "--workers", "0",
                                     "--extra-coco", str(tmp_path / extra), "--extra-ratio", "1"]), extra, said)


def test_train_detector_names_a_backbone_file_that_is_no_weights(tmp_path):
    """A photo or a cut .safetensors given as --backbone-weights was a 50-line UnpicklingError or
    SafetensorError traceback (an audit)."""
    coco, _ = _collection(tmp_path)
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00")
    for bad in (tmp_path / "images" / "1.png", tmp_path / "cut.safetensors"):
        _refused(runner.invoke(app, ["train-detector", str(coco), str(coco), "-o", str(tmp_path / "run"),
                                     "--backbone", "resnet18", "--size", "64", "--workers", "0",
                                     "--backbone-weights", str(bad)]), bad.name, "cannot load it as this network's")


def test_eval_detector_records_what_it_measured_and_replaces_only_the_same_figures(weights, tmp_path):
    """Its figures named no weights, box file or manifest, and a validation run into a test
    run's folder replaced it, exit 0 (an audit)."""
    from models.io import load_card, sha256_file

    coco, manifest = _collection(tmp_path)
    card, out = str(weights / "detector.json"), tmp_path / "o"
    assert runner.invoke(app, ["eval-detector", card, str(coco), "-o", str(out), "--manifest", str(manifest)]
                         ).exit_code == 0
    record = json.loads((out / "detector_eval.json").read_text())
    assert record["detector_sha256"] == load_card(weights / "detector.json").sha256
    assert record["boxes_sha256"] == sha256_file(coco) and record["manifest_sha256"] == sha256_file(manifest)
    assert runner.invoke(app, ["eval-detector", card, str(coco), "-o", str(out)]).exit_code == 0  # a rerun
    figures = (out / "detector_metrics.json").read_bytes()
    other = json.loads(coco.read_text())
    other["images"], other["annotations"] = other["images"][:2], other["annotations"][:2]
    (tmp_path / "val.json").write_text(json.dumps(other))
    _refused(runner.invoke(app, ["eval-detector", card, str(tmp_path / "val.json"), "-o", str(out)]),
             "holds the figures of another boxes")
    assert (out / "detector_metrics.json").read_bytes() == figures


def test_detect_replaces_only_a_box_file_an_earlier_detect_wrote(weights, tmp_path):
    """`-o` on a set's checked boxes (its coco.json, beside the manifest) replaced them with
    the detector's, exit 0, and `validate` then called the file ok (an audit)."""
    coco, manifest = _collection(tmp_path)
    checked = coco.read_text()
    _refused(runner.invoke(app, ["detect", str(weights / "detector.json"), str(manifest), "-o", str(coco)]),
             "did not write", "move that one away")
    assert coco.read_text() == checked
    out = tmp_path / "d.json"
    for _ in range(2):  # a rerun replaces its own
        r = runner.invoke(app, ["detect", str(weights / "detector.json"), str(manifest), "-o", str(out)])
        assert r.exit_code == 0, r.output
    out.write_text("not json")
    _refused(runner.invoke(app, ["detect", str(weights / "detector.json"), str(manifest), "-o", str(out)]),
             "did not write")


def test_eval_detector_says_when_the_box_file_is_one_the_detector_trained_or_chose_on(weights, tmp_path):
    """Figures on the training's own box files were printed as plainly as a test file's, and
    `-o` into a weights folder wrote the figures there (an audit)."""
    import shutil

    from models.io import sha256_file

    coco, _ = _collection(tmp_path)
    folder = tmp_path / "w"
    shutil.copytree(weights, folder)
    card = json.loads((folder / "detector.json").read_text())
    for key, words in (("train_coco_sha256", "this detector trained on"),
                       ("val_coco_sha256", "this detector chose its epoch and score threshold on")):
        (folder / "detector.json").write_text(json.dumps(card | {"data": {key: sha256_file(coco)}}))
        r = runner.invoke(app, ["eval-detector", str(folder / "detector.json"), str(coco), "-o", str(tmp_path / key)])
        assert r.exit_code == 0 and f"warning: {coco} is the box file {words}" in r.output, r.output
    (folder / "detector.json").write_text(json.dumps(card | {"data": {"train_coco_sha256": "0" * 64}}))
    r = runner.invoke(app, ["eval-detector", str(folder / "detector.json"), str(coco), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    _refused(runner.invoke(app, ["eval-detector", str(folder / "detector.json"), str(coco), "-o", str(folder)]),
             "a weights folder")
    assert not (folder / "detector_metrics.json").exists()
