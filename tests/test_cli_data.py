"""The data commands end to end, as a user runs them: synth -> validate -> split -> stats."""

import json
import math

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.data.stats import compute_stats

runner = CliRunner()


def test_synth_split_and_stats_commands_work_together(tmp_path):
    out = tmp_path / "ds"
    r = runner.invoke(app, ["synth", str(out), "--preset", "tiny", "-n", "40", "--seed", "3", "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "wrote 40 images" in r.output
    r = runner.invoke(app, ["validate", str(out / "manifest.csv"), "--coco", str(out / "coco.json")])
    assert r.exit_code == 0 and ": ok" in r.output, r.output

    split = tmp_path / "split.csv"
    r = runner.invoke(app, ["split", str(out / "manifest.csv"), "-o", str(split), "--train-sources",
                            "hospital,field,evanet", "--val-sources", "archive", "--test-sources", "teaching"])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(split, keep_default_na=False)
    assert set(df.loc[df.source == "teaching", "split"]) == {"test"}
    assert set(df.loc[df.source == "archive", "split"]) == {"val"}
    # one source listed for train and val, too few patients to divide: val came out empty, unsaid (an audit)
    r = runner.invoke(app, ["split", str(out / "manifest.csv"), "-o", str(tmp_path / "one.csv"), "--train-sources",
                            "hospital", "--val-sources", "hospital", "--fractions", "0.98,0.01,0.01"])
    assert r.exit_code == 0 and "warning: no photo in val, though sources were listed for it" in r.output, r.output
    # written into another folder than the manifest's, its paths still name the photos
    r = runner.invoke(app, ["validate", str(split)])
    assert r.exit_code == 0 and ": ok" in r.output, r.output
    (tmp_path / "cut.json").write_text('{"images": [')
    r = runner.invoke(app, ["split", str(out / "manifest.csv"), "-o", str(tmp_path / "never.csv"),
                            "--coco", str(tmp_path / "cut.json")])
    assert r.exit_code == 2 and "not a COCO detection file" in r.output and not (tmp_path / "never.csv").exists()

    chart = tmp_path / "stats.png"
    r = runner.invoke(app, ["stats", str(split), "--chart", str(chart), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["n_images"] == 40
    counted = {(c["source"], c["kind"]): c["total"] for c in report["counts"]}
    assert counted == df.groupby(["source", "kind"]).size().to_dict()
    with Image.open(chart) as im:
        assert im.format == "PNG" and im.size[0] > 600


def test_stats_table_and_imbalance_ratio_match_the_manifest():
    df = pd.DataFrame({
        "patient_id": ["a", "a", "b", "c", "d", "d"], "source": ["s", "s", "s", "t", "t", "t"],
        "kind": ["regular", "green", "regular", "regular", "iodine", "no_cervix"],
        "split": ["train", "train", "val", "train", "test", "test"],
    })
    st = compute_stats(df)
    assert st.table.loc[("s", "regular"), "train"] == 1 and st.table.loc[("s", "regular"), "total"] == 2
    assert st.imbalance_ratio == 1.5  # 3 regular : 2 non-regular
    assert st.split_imbalance["val"] == math.inf and st.split_imbalance["train"] == 2.0
    assert st.n_patients == 4 and st.by_kind["no_cervix"] == 1
    strict = json.loads(json.dumps(st.as_dict()), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert strict["split_imbalance"]["val"] is None  # no non-regular image in val: no ratio


def test_stats_and_split_refuse_a_chart_that_is_no_png_and_two_shares(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "m.csv").write_text("path,patient_id,source,device,kind\na.jpg,p,s,d,regular\n")
    r = runner.invoke(app, ["stats", str(tmp_path / "m.csv"), "--chart", str(tmp_path / "chart")])
    assert r.exit_code == 2 and "name it *.png" in r.output
    r = runner.invoke(app, ["split", str(tmp_path / "m.csv"), "-o", str(tmp_path / "s.csv"), "--fractions", "0.5,0.5"])
    assert r.exit_code == 2 and "needs three shares" in r.output and not (tmp_path / "s.csv").exists()


def test_validate_lists_every_bad_row_and_exits_non_zero(tmp_path):
    (tmp_path / "m.csv").write_text("path,patient_id,source,device,kind\nx.jpg,,s,d,blue\n")
    r = runner.invoke(app, ["validate", str(tmp_path / "m.csv")])
    assert r.exit_code == 2
    assert "missing file 'x.jpg'" in r.output and "empty patient_id" in r.output and "unknown kind 'blue'" in r.output


def test_one_patient_number_written_several_ways_is_warned_about_before_a_split(tmp_path):
    """Sheets merged from Excel: `007` lost its zeros in one and became `7.0` in another, and a
    split by patient could put one patient's photos on both sides."""
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "m.csv").write_text("path,patient_id,source,device,kind\na.jpg,007,s,d,regular\n"
                                    "b.jpg,7.0,s,d,regular\nc.jpg,7,t,d,regular\nd.jpg,PT-7,s,d,regular\n")
    m = str(tmp_path / "m.csv")
    for command in (["validate", m], ["split", m, "-o", str(tmp_path / "s.csv")]):
        r = runner.invoke(app, command)
        assert r.exit_code == 0, r.output
        assert "warning: 1 number(s) written as several patient ids of one source (007 7.0)" in r.output, r.output


def test_one_patient_id_in_two_letter_cases_or_unicode_forms_is_warned_about_before_a_split(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg", "g.jpg", "h.jpg", "i.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "m.csv").write_text("path,patient_id,source,device,kind\na.jpg,AB12,s,d,regular\n"
                                    "b.jpg,ab12,s,d,regular\nc.jpg,ab12,t,d,regular\nd.jpg,Jos\u00e9,s,d,regular\n"
                                    "e.jpg,Jose\u0301,s,d,regular\nf.jpg,7_0,s,d,regular\n"
                                    # spaces and hyphens inside: PT 003 went to train and test (an audit)
                                    "g.jpg,PT 003,s,d,regular\nh.jpg,PT003,s,d,regular\ni.jpg,PT-003,s,d,regular\n",
                                    encoding="utf-8")
    (tmp_path / "n.csv").write_text("path,patient_id,source,device,kind\na.jpg,70,s,d,regular\n"
                                    "b.jpg,7_0,s,d,regular\n")
    r = runner.invoke(app, ["split", str(tmp_path / "m.csv"), "-o", str(tmp_path / "s.csv")])
    assert r.exit_code == 0, r.output
    assert "warning: 3 patient id(s) of one source differing only in letter case, spaces, hyphens or Unicode " \
           "form (AB12 ab12; Jose\u0301 Jos\u00e9; PT 003 PT-003 PT003)" in r.output, r.output
    r = runner.invoke(app, ["validate", str(tmp_path / "n.csv")])
    assert r.exit_code == 0 and "warning" not in r.output, r.output  # 7_0 is no spelling of 70


def test_unknown_preset_and_bad_fractions_are_clear_errors(tmp_path):
    r = runner.invoke(app, ["synth", str(tmp_path), "--preset", "huge"])
    assert r.exit_code == 2 and "unknown preset 'huge'" in r.output
    (tmp_path / "m.csv").write_text("path,patient_id,source,device,kind\nx.jpg,p,s,d,regular\n")
    r = runner.invoke(app, ["split", str(tmp_path / "m.csv"), "-o", str(tmp_path / "o.csv"), "--fractions", "0.5,0.1,0.1"])
    assert r.exit_code == 2 and "sum to 1" in r.output


def test_import_cvat_command_writes_a_normalised_file(tmp_path):
    export = {"categories": [{"id": 1, "name": "CERVIX", "supercategory": ""}],
              "images": [{"id": 1, "width": 10, "height": 10, "file_name": "a.jpg"}],
              "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 0,
                               "iscrowd": 0, "segmentation": []}]}
    (tmp_path / "cvat.json").write_text(json.dumps(export))
    r = runner.invoke(app, ["import-cvat", str(tmp_path / "cvat.json"), "-o", str(tmp_path / "coco.json")])
    assert r.exit_code == 0, r.output
    written = json.loads((tmp_path / "coco.json").read_text())
    assert written["categories"][0]["name"] == "cervix" and written["annotations"][0]["area"] == 25
    assert "info" in written


def test_threads_option_sets_torchs_thread_count_and_refuses_zero(tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        r = runner.invoke(app, ["--threads", "1", "validate", str(tmp_path / "missing.csv")])
        assert torch.get_num_threads() == 1, r.output
        r = runner.invoke(app, ["--threads", "0", "validate", str(tmp_path / "missing.csv")])
        assert r.exit_code == 2 and "must be >= 1" in r.output
    finally:
        torch.set_num_threads(before)


def test_split_refuses_a_manifest_without_rows_and_an_output_that_is_no_manifest(tmp_path):
    """A header alone printed pandas' "Empty DataFrame" and wrote an empty split; `-o x.xlsx`
    wrote CSV under a spreadsheet's name."""
    (tmp_path / "h.csv").write_text("path,patient_id,source,device,kind\n")
    r = runner.invoke(app, ["split", str(tmp_path / "h.csv"), "-o", str(tmp_path / "s.csv")])
    assert r.exit_code == 2 and "has no rows" in r.output and not (tmp_path / "s.csv").exists()
    r = runner.invoke(app, ["split", str(tmp_path / "h.csv"), "-o", str(tmp_path / "s.xlsx")])
    assert r.exit_code == 2 and "a manifest is .csv or .parquet" in r.output


def test_split_refuses_a_fold_without_folds_and_fractions_with_folds(tmp_path):
    """Each was an ordinary split without a word."""
    rows = pd.DataFrame({"path": [f"{i}.jpg" for i in range(10)], "patient_id": [f"p{i}" for i in range(10)],
                         "source": "s", "device": "d", "kind": "regular"})
    rows.to_csv(tmp_path / "m.csv", index=False)
    m, o = str(tmp_path / "m.csv"), str(tmp_path / "s.csv")
    r = runner.invoke(app, ["split", m, "-o", o, "--fold", "3"])
    assert r.exit_code == 2 and "give --folds too" in r.output, r.output
    r = runner.invoke(app, ["split", m, "-o", o, "--folds", "5", "--fractions", "0.5,0.25,0.25"])
    assert r.exit_code == 2 and "--fractions does not apply to --folds" in r.output, r.output
    assert not (tmp_path / "s.csv").exists()
    r = runner.invoke(app, ["split", m, "-o", o, "--folds", "5"])
    assert r.exit_code == 0, r.output
    assert (pd.read_csv(tmp_path / "s.csv")["split"] == "test").sum() == 2


def test_validate_finds_what_training_would_refuse_in_a_manifest_and_its_box_file(tmp_path):
    """validate said ok to a header alone, to a box file recording another size than its photo,
    and to one naming a file that is not there; split and eval refused each later."""
    from pipelines.data.coco import CocoCategory, CocoDataset, CocoImage, make_annotation, save_coco

    (tmp_path / "h.csv").write_text("path,patient_id,source,device,kind\n")
    r = runner.invoke(app, ["validate", str(tmp_path / "h.csv")])
    assert r.exit_code == 2 and "no rows, only a header" in r.output, r.output
    for k in (1, 2):
        Image.new("RGB", (60, 40), (k * 80, 90, 90)).save(tmp_path / f"{k}.png")
    pd.DataFrame({"path": ["1.png", "2.png"], "patient_id": ["a", "b"], "source": "s", "device": "d",
                  "kind": "regular"}).to_csv(tmp_path / "m.csv", index=False)

    def boxes(name, sizes, files=("1.png", "2.png")):
        images = [CocoImage(id=i, file_name=f, width=w, height=h) for i, (f, (w, h)) in enumerate(zip(files, sizes), 1)]
        return save_coco(CocoDataset(images=images, annotations=[make_annotation(1, 1, 1, [2, 2, 20, 20])],
                                     categories=[CocoCategory(id=1, name="cervix")]), tmp_path / name)

    args = ["validate", str(tmp_path / "m.csv"), "--coco"]
    r = runner.invoke(app, args + [str(boxes("ok.json", [(60, 40), (60, 40)]))])
    assert r.exit_code == 0 and "ok.json: 2 images, 1 boxes: ok" in r.output, r.output
    r = runner.invoke(app, args + [str(boxes("size.json", [(60, 40), (120, 80)]))])
    assert r.exit_code == 2 and "2.png: recorded 120x80, the photo is 60x40" in r.output, r.output
    r = runner.invoke(app, args + [str(boxes("gone.json", [(60, 40), (60, 40)], ("1.png", "none.png")))])
    assert r.exit_code == 2 and "none.png: no such file" in r.output, r.output
    # "ok" to what training refuses: a cervix photo without a box, and another collection's boxes (an audit)
    r = runner.invoke(app, args + [str(tmp_path / "ok.json")])
    assert "warning: 1 of the manifest's 2 cervix photos have no box in ok.json (e.g. 2.png)" in r.output, r.output
    (tmp_path / "other").mkdir()
    for k in (1, 2):
        Image.new("RGB", (60, 40)).save(tmp_path / "other" / f"{k}.png")
    r = runner.invoke(app, args + [str(boxes("other/b.json", [(60, 40), (60, 40)]))])
    assert r.exit_code == 2 and "not one of its 2 images is a row of the manifest" in r.output, r.output


def test_synth_refuses_a_size_it_cannot_make_before_writing_and_makes_the_size_asked_for(tmp_path):
    for value in ("-1", "0", "1e9", "nan"):
        r = runner.invoke(app, ["synth", str(tmp_path / "x"), "-n", "5", "--megapixels", value, "--workers", "1"])
        assert r.exit_code == 2 and "--megapixels must be at least 0.01" in r.output, r.output
        assert "Traceback" not in r.output and not (tmp_path / "x").exists()
    r = runner.invoke(app, ["synth", str(tmp_path / "x"), "-n", "5", "--workers", "0"], env={"COLUMNS": "200"})
    assert r.exit_code == 2 and not (tmp_path / "x").exists()
    # the size asked for, not the tiny preset's 320 px cap (0.5 MP came out 0.08 MP: an audit)
    r = runner.invoke(app, ["synth", str(tmp_path / "mp"), "--preset", "tiny", "-n", "2", "--megapixels", "0.5",
                            "--workers", "1", "--no-cervix-fraction", "0"])
    assert r.exit_code == 0, r.output
    from PIL import Image

    sizes = [Image.open(p).size for p in (tmp_path / "mp").rglob("*.jpg")]
    assert sizes and all(abs(w * h / 0.5e6 - 1) < 0.02 for w, h in sizes), sizes


def test_an_output_that_cannot_be_written_is_refused_before_the_work_with_exit_2(tmp_path):
    """A folder named as split's -o or stats' --chart, a file as synth's folder or
    propose-boxes' --sheets: exit 1 after the work (split's message named a temporary file),
    and propose-boxes had written its proposals already."""
    (tmp_path / "dir.csv").mkdir()
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "afile").write_text("x")
    r = runner.invoke(app, ["synth", str(tmp_path / "s"), "-n", "6", "--max-side", "96", "--workers", "1"])
    assert r.exit_code == 0, r.output
    m = str(tmp_path / "s" / "manifest.csv")
    for args, words in ((["synth", str(tmp_path / "afile"), "-n", "5", "--workers", "1"], "OUT"),
                        (["split", m, "-o", str(tmp_path / "dir.csv")], "--out"),
                        (["stats", m, "--chart", str(tmp_path / "dir.png")], "--chart"),
                        (["propose-boxes", m, "-o", str(tmp_path / "p.json"), "--sheets", str(tmp_path / "afile")],
                         "--sheets")):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and f"error: {words} " in r.output, (args, r.output)
    assert not (tmp_path / "p.json").exists()


def test_split_warns_of_byte_identical_copies_under_other_patients_that_land_apart(tmp_path):
    """A site's photo copied under a second patient id went to train and test with no word, its
    sha256 in the manifest all along (an audit)."""
    import hashlib

    rows = ["path,patient_id,source,device,kind,sha256"]
    for k in range(20):
        Image.new("RGB", (8, 8), (k, 0, 0)).save(tmp_path / f"{k}.png")
        rows.append(f"{k}.png,p{k},s,d,regular,{hashlib.sha256((tmp_path / f'{k}.png').read_bytes()).hexdigest()}")
    rows[-1] = rows[-1].rsplit(",", 1)[0] + "," + rows[1].rsplit(",", 1)[1]  # 19.png listed as 0.png's copy
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    said = []
    for seed in range(6):  # some seeds put the two patients on one side
        r = runner.invoke(app, ["split", str(tmp_path / "m.csv"), "-o", str(tmp_path / f"s{seed}.csv"), "--seed",
                                str(seed)])
        assert r.exit_code == 0, r.output
        split = dict(zip(*[pd.read_csv(tmp_path / f"s{seed}.csv")[c] for c in ("path", "split")]))
        apart = split["0.png"] != split["19.png"]
        assert ("byte-identical copies under other patient ids landed in different splits" in r.output) == apart
        said.append(apart)
    assert any(said)
