"""Boxes for a site's own photos: proposals, contact sheets to check them, the reviewer's
fixes, and matching the checked boxes back to a manifest by sha256 wherever the files went."""

import csv
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.ops import box_iou
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.data.box_match import boxes_for_manifest
from pipelines.data.box_proposals import apply_fixes, read_fixes, tissue_box
from pipelines.data.coco import CocoError, load_coco

runner = CliRunner()


def _scene(w: int, h: int, box) -> np.ndarray:
    """Dark speculum tunnel with grey blades and a pink cervix ellipse inside `box`."""
    im = Image.new("RGB", (w, h), (15, 10, 10))
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, w // 8, h], fill=(150, 150, 150))  # metal blade: lit but grey
    d.ellipse(box, fill=(205, 110, 120))
    d.ellipse([(box[0] + box[2]) / 2 - 5, (box[1] + box[3]) / 2 - 3, (box[0] + box[2]) / 2 + 5,
               (box[1] + box[3]) / 2 + 3], fill=(90, 20, 30))  # the os
    return np.asarray(im)


def test_tissue_proposal_finds_a_central_cervix_and_a_close_up_fills_the_frame():
    prop = tissue_box(_scene(400, 300, [120, 80, 300, 230]))
    assert prop.origin == "tissue"
    assert float(box_iou(torch.tensor([prop.box]), torch.tensor([[120.0, 80, 300, 230]]))) > 0.85
    close_up = np.full((240, 320, 3), (200, 120, 125), np.uint8)
    assert tissue_box(close_up).box == [0.0, 0.0, 320.0, 240.0]
    assert tissue_box(np.zeros((50, 60, 3), np.uint8)).box is None  # a black frame proposes nothing


@pytest.fixture()
def site(tmp_path):
    """Three photos (one without a cervix) and their manifest."""
    root = tmp_path / "site"
    root.mkdir()
    Image.fromarray(_scene(400, 300, [120, 80, 300, 230])).save(root / "a.jpg", quality=95)
    Image.fromarray(_scene(300, 300, [20, 30, 280, 290])).save(root / "b.jpg", quality=95)
    Image.new("RGB", (200, 150), (90, 60, 50)).save(root / "gauze.jpg")
    pd.DataFrame({"path": ["a.jpg", "b.jpg", "gauze.jpg"], "patient_id": ["p1", "p1", "p2"], "source": ["s"] * 3,
                  "device": [""] * 3, "kind": ["regular", "green", "no_cervix"]}).to_csv(root / "m.csv", index=False)
    return root


def test_propose_then_fix_then_match_by_sha256_after_the_folder_moved(site, tmp_path):
    r = runner.invoke(app, ["propose-boxes", str(site / "m.csv"), "-o", str(site / "proposals.json"),
                            "--sheets", str(tmp_path / "sheets")])
    assert r.exit_code == 0, r.output
    proposals = load_coco(site / "proposals.json")
    assert [im.file_name for im in proposals.images] == ["a.jpg", "b.jpg"]  # no_cervix rows get no proposal
    assert all(len(getattr(im, "sha256")) == 64 for im in proposals.images)
    with Image.open(tmp_path / "sheets" / "sheet_000.png") as sheet:
        assert sheet.format == "PNG" and sheet.size[0] > 200
    index = list(csv.DictReader(open(tmp_path / "sheets" / "index.csv")))
    assert [row["file"] for row in index] == ["a.jpg", "b.jpg"]

    (site / "fixes.csv").write_text("file,action,x1,y1,x2,y2,note\nb.jpg,box,0.05,0.1,0.95,0.95,too small\n")
    (tmp_path / "work").mkdir()  # proposals kept beside the photos' folder, as the README's steps keep them
    shutil.move(site / "proposals.json", tmp_path / "work" / "proposals.json")
    r = runner.invoke(app, ["fix-boxes", str(tmp_path / "work" / "proposals.json"), str(site / "fixes.csv"),
                            "-o", str(site / "boxes.json"), "--note", "checked by eye", "--sheets", str(tmp_path / "c")])
    assert r.exit_code == 0 and "'fixed': 1" in r.output and "sheets to" in r.output, r.output
    r = runner.invoke(app, ["fix-boxes", str(tmp_path / "work" / "proposals.json"), str(site / "fixes.csv"),
                            "-o", str(tmp_path / "x.json"), "--sheets", str(tmp_path / "c2"), "--images", str(tmp_path)])
    assert r.exit_code == 2 and "pass --images" in r.output and not (tmp_path / "x.json").exists(), r.output
    checked = load_coco(site / "boxes.json")
    origin = {a.image_id: a.origin for a in checked.annotations}
    assert origin == {1: "tissue, checked", 2: "fixed"} and checked.info["description"] == "checked by eye"
    assert checked.boxes_by_file()["b.jpg"] == [[15.0, 30.0, 285.0, 285.0]]

    moved = tmp_path / "elsewhere"  # the site extracts its photos somewhere else later
    shutil.copytree(site, moved)
    runner.invoke(app, ["import-labels", str(moved / "m.csv"), "--images", str(moved), "-o",
                        str(moved / "imported.csv"), "--path-col", "path", "--patient-col", "patient_id",
                        "--source", "s"])
    r = runner.invoke(app, ["match-boxes", str(moved / "imported.csv"), "--boxes", str(site / "boxes.json"),
                            "-o", str(moved / "matched.json")])
    assert r.exit_code == 0, r.output
    matched = load_coco(moved / "matched.json").boxes_by_file()
    assert matched == {"a.jpg": checked.boxes_by_file()["a.jpg"], "b.jpg": [[15.0, 30.0, 285.0, 285.0]],
                       "gauze.jpg": []}


def test_sheets_drawn_again_replace_the_earlier_set_and_a_folder_of_other_files_is_refused(site, tmp_path):
    """A second, smaller run left the first run's extra sheets beside its own (a reviewer who
    looked at every sheet looked at photos of another run), and a site's own index.csv in the
    folder was overwritten (an audit)."""
    sheets = tmp_path / "sheets"
    sheets.mkdir()
    for k in range(3):  # an earlier run's set: three sheets and its index
        (sheets / f"sheet_{k:03d}.png").write_bytes(b"an earlier sheet")
    (sheets / "index.csv").write_text("tile,sheet,file,boxes\n0,0,old.jpg,1\n")
    r = runner.invoke(app, ["propose-boxes", str(site / "m.csv"), "-o", str(tmp_path / "p.json"),
                            "--sheets", str(sheets)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in sheets.iterdir()) == ["index.csv", "sheet_000.png"]
    assert [row["file"] for row in csv.DictReader(open(sheets / "index.csv"))] == ["a.jpg", "b.jpg"]
    for theirs, content in (("notes.txt", "my notes"), ("index.csv", "photo,comment\na.jpg,blurred\n")):
        folder = tmp_path / f"theirs-{theirs}"
        folder.mkdir()
        (folder / theirs).write_text(content)
        (tmp_path / "none.csv").write_text("file,action,x1,y1,x2,y2,note\n")
        for command in (["propose-boxes", str(site / "m.csv"), "-o", str(tmp_path / "q.json")],
                        ["fix-boxes", str(tmp_path / "p.json"), str(tmp_path / "none.csv"), "-o",
                         str(tmp_path / "f.json")]):
            r = runner.invoke(app, [*command, "--sheets", str(folder)])
            assert r.exit_code == 2 and "holds files that are not contact sheets" in r.output, (command, r.output)
            assert [p.name for p in folder.iterdir()] == [theirs] and (folder / theirs).read_text() == content


def test_a_cervix_photo_without_any_box_is_refused_by_name(site):
    from pipelines.data.manifest import load_manifest

    df = load_manifest(site / "m.csv")
    with pytest.raises(CocoError, match=r"row 2 \(a.jpg\): a regular photo with no box"):
        boxes_for_manifest(df, [])


def test_boxes_of_another_photo_at_the_same_path_or_against_the_label_are_refused(site):
    """A file replaced since its boxes were drawn took the old photo's boxes by path although
    both sides named their sha256; a no_cervix row dropped the boxes the file gave it, and a
    cervix row with an entry of no box passed as a cervix without one (an audit)."""
    from pipelines.data.coco import CocoCategory, CocoDataset, CocoImage, make_annotation
    from pipelines.data.manifest import load_manifest

    df = load_manifest(site / "m.csv")
    df["sha256"] = ["a" * 64, "b" * 64, "c" * 64]

    def box_file(shas, boxes):
        images = [CocoImage(id=i + 1, file_name=f, width=w, height=h, sha256=d)
                  for i, (f, w, h, d) in enumerate(zip(["a.jpg", "b.jpg", "gauze.jpg"], [400, 300, 200],
                                                       [300, 300, 150], shas))]
        anns = [make_annotation(k + 1, i, 1, b) for k, (i, b) in enumerate(boxes)]
        return [(CocoDataset(images=images, annotations=anns, categories=[CocoCategory(id=1, name="cervix")]), site)]

    ok = [(1, [120, 80, 300, 230]), (2, [20, 30, 280, 290])]
    matched, _ = boxes_for_manifest(df, box_file(["a" * 64, "b" * 64, "c" * 64], ok))
    assert len(matched.annotations) == 2
    with pytest.raises(CocoError, match=r"row 2 \(a.jpg\): the box file's photo at this path has another sha256"):
        boxes_for_manifest(df, box_file(["0" * 64, "b" * 64, "c" * 64], ok))
    with pytest.raises(CocoError, match=r"row 4 \(gauze.jpg\): labelled no_cervix, but the box file gives it 1"):
        boxes_for_manifest(df, box_file(["a" * 64, "b" * 64, "c" * 64], ok + [(3, [10, 10, 50, 50])]))
    with pytest.raises(CocoError, match=r"row 3 \(b.jpg\): a green photo whose box-file entry has no box"):
        boxes_for_manifest(df, box_file(["a" * 64, "b" * 64, "c" * 64], ok[:1]))
    # a site's sheet with its sha256 in upper case and padded: the same photos (refused as replaced before)
    sheet = pd.read_csv(site / "m.csv", dtype=str, keep_default_na=False).assign(
        sha256=[" " + "A" * 64, "B" * 64, "c" * 64])
    sheet.to_csv(site / "upper.csv", index=False)
    matched, _ = boxes_for_manifest(load_manifest(site / "upper.csv"), box_file(["a" * 64, "b" * 64, "c" * 64], ok))
    assert len(matched.annotations) == 2


def test_a_photo_that_cannot_be_read_gets_no_proposal_and_the_others_theirs(site, tmp_path):
    cut = (site / "a.jpg").read_bytes()[:300]
    (site / "cut.jpg").write_bytes(cut)
    df = pd.read_csv(site / "m.csv", dtype=str, keep_default_na=False)
    df.loc[len(df)] = ["cut.jpg", "p3", "s", "", "regular"]
    df.to_csv(site / "m.csv", index=False)
    r = runner.invoke(app, ["propose-boxes", str(site / "m.csv"), "-o", str(site / "p.json")])
    assert r.exit_code == 0 and "unreadable: cut.jpg" in r.output and "1 unreadable photos left out" in r.output, r.output
    assert "tissue heuristic alone; `--detector weights/detector.json` proposes with the bundled" in r.output
    assert [im.file_name for im in load_coco(site / "p.json").images] == ["a.jpg", "b.jpg"]


def test_fixes_with_bad_coordinates_or_unknown_files_are_refused(site, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,action,x1,y1,x2,y2\na.jpg,box,0.5,0.1,0.4,0.9\nb.jpg,grow,0,0,1,1\nc.jpg,box,,,,\n")
    with pytest.raises(ValueError) as err:
        read_fixes(bad)
    assert "line 2" in str(err.value) and "line 3" in str(err.value) and "line 4" in str(err.value)
    runner.invoke(app, ["propose-boxes", str(site / "m.csv"), "-o", str(site / "p.json")])
    with pytest.raises(ValueError, match="not in the proposals"):
        apply_fixes(load_coco(site / "p.json"), [*read_fixes_text(tmp_path, "nope.jpg,none,,,,\n")], "x")
    ds, counts = apply_fixes(load_coco(site / "p.json"), read_fixes_text(tmp_path, "a.jpg,none,,,,\n"), "x")
    assert counts == {"kept": 1, "fixed": 0, "removed": 1} and ds.boxes_by_file()["a.jpg"] == []


def read_fixes_text(tmp_path, body: str):
    p = tmp_path / "f.csv"
    p.write_text("file,action,x1,y1,x2,y2\n" + body)
    return read_fixes(p)


def test_a_fixes_sheet_saved_with_a_bom_reads_and_two_decisions_for_one_photo_are_refused(tmp_path):
    p = tmp_path / "fixes.csv"
    p.write_bytes("\ufefffile,action,x1,y1,x2,y2\na.jpg,none,,,,\nb.jpg,box,0,0,1,1\na.jpg,box,0,0,1,1\n".encode())
    with pytest.raises(ValueError, match="line 4: 'a.jpg' already fixed on line 2"):
        read_fixes(p)
    p.write_bytes("\ufefffile,action,x1,y1,x2,y2\na.jpg,none,,,,\n".encode())
    assert [(f.file, f.box) for f in read_fixes(p)] == [("a.jpg", None)]


def test_a_bad_fix_after_a_blank_line_is_named_by_its_line_in_the_file(tmp_path):
    p = tmp_path / "fixes.csv"
    p.write_text("file,action,x1,y1,x2,y2\na.jpg,none,,,,\n\nb.jpg,grow,0,0,1,1\n")
    with pytest.raises(ValueError, match="line 4: unknown action 'grow'"):
        read_fixes(p)


def test_fixes_match_dot_slash_names_and_name_an_unknown_action_and_file_in_one_pass(site, tmp_path):
    """`./a.jpg` was "not in the proposals"; `Box` read as bad coordinates, `delete` as missing
    numbers, and an unknown name came only in a second round."""
    runner.invoke(app, ["propose-boxes", str(site / "m.csv"), "-o", str(site / "p.json")])
    ds, counts = apply_fixes(load_coco(site / "p.json"), read_fixes_text(tmp_path, "./a.jpg,Box,0.1,0.1,0.5,0.5\n"),
                             "x")
    assert counts["fixed"] == 1 and len(ds.boxes_by_file()["a.jpg"]) == 1
    p = tmp_path / "f.csv"
    p.write_text("file,action,x1,y1,x2,y2\na.jpg,delete,,,,\nnope.jpg,none,,,,\n")
    with pytest.raises(ValueError) as err:
        read_fixes(p, {"a.jpg", "b.jpg"})
    assert "line 2: unknown action 'delete': box or none" in str(err.value)
    assert "line 3: 'nope.jpg' is not in the proposals" in str(err.value)
    # a spreadsheet's `;` file, and a name without its subfolder (the sheets' tiles show the
    # name alone): refused as one column 'file;action;...', and with no hint (an audit)
    p.write_text("file;action;x1;y1;x2;y2\nIMG_7.jpg;none;;;;\na.jpg;none;;;;\n")
    with pytest.raises(ValueError) as err:
        read_fixes(p, {"a.jpg", "PT_7/IMG_7.jpg"})
    assert str(err.value).endswith("line 2: 'IMG_7.jpg' is not in the proposals (the proposals' 'PT_7/IMG_7.jpg'?)")
    assert [f.file for f in read_fixes(p, {"a.jpg", "IMG_7.jpg"})] == ["IMG_7.jpg", "a.jpg"]


def test_a_fixes_sheet_from_a_decimal_comma_spreadsheet_reads_as_its_reviewer_wrote_it(tmp_path):
    """Excel set to a decimal comma saves `;`, `0,1` for 0.1, the header as typed and empty rows
    below the table; a Windows user writes the subfolder with `\\`. Every box row was refused as
    'needs numbers', the empty rows as 'no file named', the header as missing columns (an audit)."""
    p = tmp_path / "fixes.csv"
    p.write_text("File;Action;X1;Y1;X2;Y2;Note\r\nPT_7\\IMG_7.jpg;box;0,1;0,2;0,8;0,9;\r\nb.jpg;none;;;;;\r\n;;;;;;\r\n"
                 ";;;;;;\r\n", newline="")
    fixes = read_fixes(p, {"PT_7/IMG_7.jpg", "b.jpg"})
    assert [(f.file, f.box) for f in fixes] == [("PT_7/IMG_7.jpg", [0.1, 0.2, 0.8, 0.9]), ("b.jpg", None)]
    p.write_text("File;Action;X1;Y1;X2;Y2\nPT_7/IMG_7.jpg;none;;;;\nPT_7\\IMG_7.jpg;none;;;;\n")
    with pytest.raises(ValueError, match="line 3: 'PT_7/IMG_7.jpg' already fixed on line 2"):
        read_fixes(p, {"PT_7/IMG_7.jpg"})


def test_the_detectors_proposals_and_boxes_refuse_a_card_without_its_threshold_not_run_at_half(tmp_path):
    """`propose-boxes`, `detect` and `eval-detector` read a missing `score` threshold as 0.5 and
    wrote boxes at it, unsaid, where the engine refused the card (an audit)."""
    from models.io import WeightsIntegrityError, load_weights, save_weights
    from pipelines.engine.detector import detect_to_coco, load_detector, top_box_fn
    from tests.qc_fixtures import tiny_weights

    folder = tiny_weights(tmp_path / "w", 0.0)
    state, card = load_weights(folder / "detector.json")
    save_weights(state, folder / "detector", card.model_copy(update={"thresholds": {"scor": 0.3}}))
    with pytest.raises(WeightsIntegrityError, match="has no 'score' threshold \\(it has: scor\\)"):
        top_box_fn(folder / "detector.json")
    model, card = load_detector(folder / "detector.json")
    with pytest.raises(WeightsIntegrityError, match="no 'score' threshold"):
        detect_to_coco(model, card, [], [])
    assert top_box_fn(folder / "detector.json", min_score=0.3) is not None  # a threshold given: taken


def test_a_box_command_replaces_only_a_box_file_it_wrote_itself(site, tmp_path):
    """`-o` onto a set's checked boxes replaced them with new proposals, a CVAT import or a
    detector's boxes, exit 0 (an audit). Each box command stamps its file (`info.written_by`)
    and replaces only its own; a rerun replaces its earlier output."""
    checked = site / "boxes.json"
    for _ in range(2):  # a rerun replaces its own
        r = runner.invoke(app, ["propose-boxes", str(site / "m.csv"), "-o", str(site / "proposals.json")])
        assert r.exit_code == 0, r.output
    (site / "fixes.csv").write_text("file,action,x1,y1,x2,y2,note\n")
    r = runner.invoke(app, ["fix-boxes", str(site / "proposals.json"), str(site / "fixes.csv"), "-o", str(checked)])
    assert r.exit_code == 0 and load_coco(checked).info["written_by"] == "cervixqc fix-boxes", r.output
    before = checked.read_bytes()
    for command in (["propose-boxes", str(site / "m.csv"), "-o", str(checked)],
                    ["match-boxes", str(site / "m.csv"), "--boxes", str(site / "proposals.json"), "-o", str(checked)],
                    ["import-cvat", str(site / "proposals.json"), "-o", str(checked)]):
        r = runner.invoke(app, command)
        assert r.exit_code == 2 and "did not write (written by cervixqc fix-boxes" in r.output, (command, r.output)
    assert checked.read_bytes() == before
    r = runner.invoke(app, ["fix-boxes", str(site / "proposals.json"), str(site / "fixes.csv"), "-o", str(checked)])
    assert r.exit_code == 0, r.output
    (site / "ground_truth.json").write_bytes(before.replace(b'"written_by"', b'"made_by"'))  # a file of no command
    r = runner.invoke(app, ["fix-boxes", str(site / "proposals.json"), str(site / "fixes.csv"), "-o",
                            str(site / "ground_truth.json")])
    assert r.exit_code == 2 and "described as 'proposals from proposals.json" in r.output, r.output
