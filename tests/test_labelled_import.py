"""A site's folder + label sheet becomes a checked manifest: columns mapped, labels translated,
sha256 recorded, and every problem reported at once with the sheet's row number."""

import hashlib
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.data.labelled_import import LabelColumns, import_labelled, merge_manifests, parse_kind_map
from pipelines.data.manifest import ManifestError, load_manifest

runner = CliRunner()


def _photo(path: Path, colour) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def collection(tmp_path):
    """A train.csv-like sheet: file, kind, case (source:id), sha256, notes."""
    root = tmp_path / "photos"
    sha = {n: _photo(root / n, c) for n, c in [("atlas/a1.jpg", (200, 90, 90)), ("atlas/a2.jpg", (40, 160, 90)),
                                                ("bank/b1.jpg", (120, 60, 30)), ("bank/b2.jpg", (210, 120, 120))]}
    sheet = pd.DataFrame({
        "file": ["atlas/a1.jpg", "atlas/a2.jpg", "bank/b1.jpg", "bank/b2.jpg"],
        "kind": ["regular", "green", "Iodine", "unknown"],
        "case": ["atlas:c1", "atlas:c1", "bank:007", "bank:008"],
        "sha256": [sha["atlas/a1.jpg"], sha["atlas/a2.jpg"], sha["bank/b1.jpg"], sha["bank/b2.jpg"]],
        "notes": ["n1", "n2", "n3", "n4"],
    })
    sheet.to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path, root


def test_sheet_columns_become_a_manifest_with_sources_from_case_ids_and_sha256(collection):
    tmp, root = collection
    cols = LabelColumns(source="case", source_sep=":", sha256="sha256", kind_map=parse_kind_map("unknown=skip"))
    result = import_labelled(tmp / "labels.csv", root, tmp / "out" / "manifest.csv", cols)
    df = result.manifest
    assert result.skipped == 1 and result.counts == {"regular": 1, "green": 1, "iodine": 1}
    assert list(df["source"]) == ["atlas", "atlas", "bank"] and list(df["patient_id"]) == ["atlas:c1", "atlas:c1", "bank:007"]
    assert list(df["kind"]) == ["regular", "green", "iodine"]  # labels are case-insensitive
    assert list(df["notes"]) == ["n1", "n2", "n3"]  # other columns are kept
    assert df["path"].iat[0] == "../photos/atlas/a1.jpg"  # relative to the manifest's folder
    assert df["sha256"].iat[2] == hashlib.sha256((root / "bank/b1.jpg").read_bytes()).hexdigest()


def test_a_row_with_an_unknown_label_has_its_other_problems_named_in_the_same_refusal(collection):
    """A row whose label word was unknown was not checked further: the site fixed the word and
    was refused again for the same row's missing file and empty case (an audit of the README's
    walk)."""
    tmp, root = collection
    sheet = pd.read_csv(tmp / "labels.csv", dtype=str)
    sheet.loc[1, ["file", "kind", "case"]] = ["atlas/missing.jpg", "normal", ""]
    sheet.to_csv(tmp / "bad.csv", index=False)
    with pytest.raises(ManifestError) as err:
        import_labelled(tmp / "bad.csv", root, tmp / "m.csv", LabelColumns(source="case", source_sep=":"))
    reasons = {(p.row, p.column): p.reason for p in err.value.problems}
    assert "unknown label 'normal'" in reasons[(2, "kind")] and "missing file" in reasons[(2, "file")]
    assert any(row == 2 and "empty" in reason for (row, _), reason in reasons.items())


def test_every_bad_row_is_named_with_its_sheet_row(collection):
    tmp, root = collection
    sheet = pd.read_csv(tmp / "labels.csv", dtype=str)
    sheet.loc[1, "file"] = "atlas/missing.jpg"
    sheet.loc[2, "kind"] = "lugol"
    sheet.loc[3, "file"] = "atlas/a1.jpg"  # duplicate of row 1
    sheet.loc[3, "kind"] = "regular"
    sheet.loc[3, "sha256"] = ""  # blank: not checked
    sheet.loc[0, "sha256"] = "0" * 64
    sheet.to_csv(tmp / "bad.csv", index=False)
    with pytest.raises(ManifestError) as err:
        import_labelled(tmp / "bad.csv", root, tmp / "m.csv", LabelColumns(source="case", source_sep=":", sha256="sha256"))
    found = {(p.row, p.column) for p in err.value.problems}
    assert found == {(1, "sha256"), (2, "file"), (3, "kind"), (4, "path")}
    text = str(err.value)
    assert "missing file 'atlas/missing.jpg'" in text and "unknown label 'lugol'" in text
    assert "duplicate path" in text and "--kind-map" in text
    sheet = pd.read_csv(tmp / "labels.csv", dtype=str)
    os.mkfifo(root / "atlas" / "pipe.jpg")  # "missing file" though `ls` showed it (an audit)
    sheet.loc[1, "file"] = "atlas/pipe.jpg"
    sheet.to_csv(tmp / "pipe.csv", index=False)
    with pytest.raises(ManifestError, match="not a regular file .* 'atlas/pipe.jpg'"):
        import_labelled(tmp / "pipe.csv", root, tmp / "m.csv", LabelColumns(source="case", source_sep=":"))


def test_a_duplicate_names_its_first_row_in_the_sheet_not_in_the_manifest_made_of_it(collection):
    """Rows are named as a spreadsheet shows the sheet (header row 1); a skipped row before
    the first copy made the duplicate point at another row (the manifest's, one lower)."""
    tmp, root = collection
    sheet = pd.DataFrame({"file": ["atlas/a2.jpg", "atlas/a1.jpg", "atlas/a1.jpg"],
                          "kind": ["unknown", "regular", "regular"], "case": ["atlas:c1"] * 3})
    sheet.to_csv(tmp / "dup.csv", index=False)
    cols = LabelColumns(source="case", source_sep=":", kind_map=parse_kind_map("unknown=skip"))
    with pytest.raises(ManifestError) as err:
        import_labelled(tmp / "dup.csv", root, tmp / "m.csv", cols)
    assert "(the header is row 1)" in str(err.value)
    assert "row 4, path: duplicate path 'photos/atlas/a1.jpg' (first at row 3)" in str(err.value)


def test_a_constant_kind_and_source_fill_sheets_without_those_columns(collection):
    tmp, root = collection
    pd.DataFrame({"file": ["bank/b1.jpg"], "id": ["x1"]}).to_csv(tmp / "neg.csv", index=False)
    cols = LabelColumns(kind=None, kind_value="no_cervix", patient="id", source_value="endoscopy")
    df = import_labelled(tmp / "neg.csv", root, tmp / "neg_manifest.csv", cols).manifest
    assert list(df[["kind", "source", "patient_id"]].iloc[0]) == ["no_cervix", "endoscopy", "x1"]
    with pytest.raises(ValueError, match="exactly one of a kind column"):
        LabelColumns(kind="kind", kind_value="no_cervix", source_value="s")
    with pytest.raises(ValueError, match="label map"):
        LabelColumns(source_value="s", kind_map={"x": "purple"})


def test_merged_manifests_rebase_paths_and_refuse_patients_shared_across_sources(collection, tmp_path):
    tmp, root = collection
    cols = LabelColumns(source="case", source_sep=":", kind_map={"unknown": "skip"})
    a = import_labelled(tmp / "labels.csv", root, tmp / "a" / "m.csv", cols).manifest
    (tmp / "a").mkdir()
    a.to_csv(tmp / "a" / "m.csv", index=False)
    neg = pd.DataFrame({"path": ["../photos/bank/b2.jpg"], "patient_id": ["n1"], "source": ["gi"], "device": [""],
                        "kind": ["no_cervix"]})
    (tmp / "b").mkdir()
    neg.to_csv(tmp / "b" / "m.csv", index=False)
    merged = merge_manifests([tmp / "a" / "m.csv", tmp / "b" / "m.csv"], tmp / "all.csv")
    assert list(merged["path"]) == ["photos/atlas/a1.jpg", "photos/atlas/a2.jpg", "photos/bank/b1.jpg",
                                    "photos/bank/b2.jpg"]
    merged.to_csv(tmp / "all.csv", index=False)
    assert len(load_manifest(tmp / "all.csv")) == 4
    neg["patient_id"] = "atlas:c1"  # the same id under another source
    neg.to_csv(tmp / "b" / "m.csv", index=False)
    with pytest.raises(ManifestError, match="under several sources"):
        merge_manifests([tmp / "a" / "m.csv", tmp / "b" / "m.csv"], tmp / "all.csv")


def test_import_labels_command_writes_the_manifest_and_fails_cleanly(collection):
    tmp, root = collection
    out = tmp / "m.csv"
    r = runner.invoke(app, ["import-labels", str(tmp / "labels.csv"), "--images", str(root), "-o", str(out),
                            "--source-col", "case", "--source-sep", ":", "--kind-map", "unknown=skip"])
    assert r.exit_code == 0, r.output
    assert "3 rows (green 1, iodine 1, regular 1)" in r.output and "1 rows skipped" in r.output
    assert len(load_manifest(out)) == 3
    assert "note:" not in r.output and "warning:" not in r.output  # every photo named (one skipped), ':' found
    # a photo the sheet lacks, and a separator no row holds: both were silent (an audit)
    _photo(root / "bank" / "b3.jpg", (10, 20, 30))
    r = runner.invoke(app, ["import-labels", str(tmp / "labels.csv"), "--images", str(root), "-o", str(out),
                            "--source-col", "case", "--source-sep", ";", "--kind-map", "unknown=skip"])
    assert r.exit_code == 0, r.output
    assert f"note: 1 photos under {root} are in no row of the sheet (e.g. bank/b3.jpg)" in r.output, r.output
    assert "warning: --source-sep ';' is in no row's 'case': each whole value is a source (2 sources)" in r.output
    r = runner.invoke(app, ["import-labels", str(tmp / "labels.csv"), "--images", str(root), "-o", str(out),
                            "--source-col", "case"])
    assert r.exit_code == 2 and "unknown label 'unknown'" in r.output


def test_a_parquet_sheet_with_missing_case_ids_and_an_empty_sheet_are_refused_by_name(collection):
    """Nulls in a Parquet sheet read as "nan" and fused every photo without a case id into one
    patient; a sheet with no row to import ended in a KeyError."""
    tmp, root = collection
    sheet = pd.read_csv(tmp / "labels.csv", dtype=str)
    sheet.loc[0, "case"] = None
    sheet.to_parquet(tmp / "labels.parquet")
    cols = LabelColumns(source="case", source_sep=":", sha256="sha256", kind_map=parse_kind_map("unknown=skip"))
    with pytest.raises(ManifestError, match="row 2, patient_id: empty patient_id"):
        import_labelled(tmp / "labels.parquet", root, tmp / "out" / "manifest.csv", cols)
    sheet.iloc[:0].to_csv(tmp / "header-only.csv", index=False)
    with pytest.raises(ManifestError, match="no row to import"):
        import_labelled(tmp / "header-only.csv", root, tmp / "out" / "manifest.csv", cols)


def test_numeric_case_ids_in_a_parquet_sheet_with_a_null_stay_whole_numbers(collection):
    """pandas read an integer column holding one null as floats, so case 7 became patient
    "7.0": another patient than the CSV's "7", and the photo's id changed with the format."""
    tmp, root = collection
    import pyarrow as pa
    import pyarrow.parquet as pq

    sheet = pd.read_csv(tmp / "labels.csv", dtype=str).iloc[:3]

    def write(kind: list, case: list) -> None:  # as R, Spark or DuckDB write it: no pandas metadata
        pq.write_table(pa.table({"file": list(sheet["file"]), "kind": kind, "case": pa.array(case, pa.int64()),
                                 "notes": ["n1", None, "n3"]}), tmp / "labels.parquet")

    cols = LabelColumns(patient="case", source_value="site", kind_map=parse_kind_map("unknown=skip"))
    write(["regular", "regular", "iodine"], [7, None, 8])
    with pytest.raises(ManifestError, match="row 3, patient_id: empty patient_id"):
        import_labelled(tmp / "labels.parquet", root, tmp / "out" / "manifest.csv", cols)
    write(["regular", "unknown", "iodine"], [7, None, 8])  # the skipped row had no case id
    df = import_labelled(tmp / "labels.parquet", root, tmp / "out" / "manifest.csv", cols).manifest
    assert list(df["patient_id"]) == ["7", "8"] and list(df["notes"]) == ["n1", "n3"]
    write(["regular", "green", "iodine"], [7, 7, 8])
    df = import_labelled(tmp / "labels.parquet", root, tmp / "out" / "manifest.csv", cols).manifest
    assert list(df["patient_id"]) == ["7", "7", "8"] and list(df["notes"]) == ["n1", "", "n3"]


def test_sheet_columns_named_like_the_manifests_are_kept_under_another_name(collection):
    """A sheet with its own `source` and `patient_id` columns, imported with the source taken
    from the case ids: the sheet's values were overwritten and lost."""
    tmp, root = collection
    sheet = pd.read_csv(tmp / "labels.csv", dtype=str)
    sheet["source"] = "hospital-a"
    sheet["patient_id"] = ["x1", "x2", "x3", "x4"]
    sheet.to_csv(tmp / "labels.csv", index=False)
    cols = LabelColumns(source="case", source_sep=":", kind_map=parse_kind_map("unknown=skip"))
    df = import_labelled(tmp / "labels.csv", root, tmp / "out" / "manifest.csv", cols).manifest
    assert list(df["source"]) == ["atlas", "atlas", "bank"] and list(df["sheet_source"]) == ["hospital-a"] * 3
    assert list(df["patient_id"]) == ["atlas:c1", "atlas:c1", "bank:007"] and list(df["sheet_patient_id"]) == ["x1", "x2", "x3"]


def test_a_name_spelt_otherwise_and_an_excel_sheet_get_what_to_do(collection):
    """An NFC name in the sheet against an NFD file or another letter case read "missing file"
    for a name that looks the same in `ls`; Excel's plain CSV (cp1252) read as a codec error; a
    ';' sheet (Excel's CSV in European locales) reads as the ',' one. Windows' backslash names
    are read as the folder's files (below)."""
    import unicodedata

    tmp, root = collection
    _photo(root / unicodedata.normalize("NFD", "bank/José café.jpg"), (90, 90, 200))  # as a Mac writes it
    _photo(root / "bank" / "IMG_001.JPG", (90, 200, 90))
    sheet = pd.DataFrame({"file": [unicodedata.normalize("NFC", "bank/José café.jpg"), "bank/img_001.jpg",
                                   "bank\\b1.jpg", "bank/nowhere.jpg"],
                          "kind": ["regular"] * 4, "case": ["bank:1", "bank:2", "bank:3", "bank:4"]})
    sheet.to_csv(tmp / "spelt.csv", index=False)
    with pytest.raises(ManifestError) as err:
        import_labelled(tmp / "spelt.csv", root, tmp / "m.csv", LabelColumns(source="case", source_sep=":"))
    text = str(err.value)
    assert text.count("spelt otherwise") == 2 and "the folder has 'bank/IMG_001.JPG'" in text
    assert "bank\\b1.jpg" not in text and "missing file 'bank/nowhere.jpg'" in text
    sheet.to_csv(tmp / "cp1252.csv", index=False, encoding="cp1252")
    sheet.to_csv(tmp / "semicolons.csv", index=False, sep=";")
    for name, hint in (("cp1252.csv", 'save it as "CSV UTF-8"'), ("semicolons.csv", "the folder has 'bank/IMG_001")):
        with pytest.raises(ManifestError, match=hint):
            import_labelled(tmp / name, root, tmp / "m.csv", LabelColumns(source="case", source_sep=":"))


def test_a_windows_sheet_clinic_headers_and_many_unknown_labels_import_or_say_what_to_do(collection):
    """A sheet exported on the clinic's PC (`C:\\...` names, `Image File` headers) was 400
    missing files out of 400; labels were listed a row each, capped at 50, so a rare word past
    the 50th row was never seen; missing columns were joined into one name (an audit)."""
    tmp, root = collection
    names = ["C:\\Users\\clinic\\photos\\atlas\\a1.jpg", "\\\\server\\share\\atlas\\a2.jpg", "bank\\b1.jpg"]
    sheet = pd.DataFrame({"Image File": names, "Finding": ["regular", "green", "iodine"],
                          "Case": ["atlas:1", "atlas:2", "bank:3"]})
    sheet.to_csv(tmp / "clinic.csv", index=False)
    cols = LabelColumns(path="image file", kind="finding", patient="case", source="case", source_sep=":")
    result = import_labelled(tmp / "clinic.csv", root, tmp / "m.csv", cols)
    assert list(result.manifest["path"]) == ["photos/atlas/a1.jpg", "photos/atlas/a2.jpg", "photos/bank/b1.jpg"]
    assert result.windows_paths == 3
    sheet.assign(**{"Image File": ["C:\\elsewhere\\nothing.jpg", "atlas/a2.jpg", "bank/b1.jpg"]}).to_csv(
        tmp / "gone.csv", index=False)
    with pytest.raises(ManifestError, match="relative to the --images folder"):
        import_labelled(tmp / "gone.csv", root, tmp / "m.csv", cols)

    words = ["regular"] * 60 + ["normal"] * 60 + ["lugol"]  # the rare word last
    many = pd.DataFrame({"Image File": ["atlas/a1.jpg"] * len(words), "Finding": words,
                         "Case": [f"atlas:{i}" for i in range(len(words))]})
    many.to_csv(tmp / "many.csv", index=False)
    with pytest.raises(ManifestError) as err:
        import_labelled(tmp / "many.csv", root, tmp / "m.csv", cols)
    unknown = [p.reason for p in err.value.problems if "unknown label" in p.reason]
    assert len(unknown) == 2 and "'normal' (60 rows: 62, 63, 64, 65, 66 and 55 more)" in unknown[0]
    assert "'lugol' (1 row: 122)" in unknown[1]
    with pytest.raises(ManifestError) as err:
        import_labelled(tmp / "many.csv", root, tmp / "m.csv", LabelColumns(path="file", source_value="s"))
    assert "no column 'file', 'kind'; the sheet has ['Image File', 'Finding', 'Case']" in str(err.value)


def test_merge_manifests_into_a_folder_not_made_yet_keeps_every_row(collection, tmp_path):
    """Rebased paths were checked from a folder -o had yet to make: every row a missing file."""
    tmp, root = collection
    cols = LabelColumns(source="case", source_sep=":", kind_map={"unknown": "skip"})
    (tmp / "a").mkdir()
    import_labelled(tmp / "labels.csv", root, tmp / "a" / "m.csv", cols).manifest.to_csv(tmp / "a" / "m.csv",
                                                                                          index=False)
    out = tmp / "new" / "deep" / "all.csv"
    r = runner.invoke(app, ["merge-manifests", str(tmp / "a" / "m.csv"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert len(load_manifest(out)) == len(load_manifest(tmp / "a" / "m.csv"))


def test_manifest_writers_refuse_a_name_that_is_not_csv_or_parquet_before_their_work(collection):
    """`-o x.xlsx` was written as CSV text under that name, which split then refused."""
    tmp, root = collection
    r = runner.invoke(app, ["import-labels", str(tmp / "labels.csv"), "--images", str(root), "-o",
                            str(tmp / "m.xlsx"), "--source-col", "case", "--source-sep", ":", "--kind-map",
                            "unknown=skip"])
    assert r.exit_code == 2 and "a manifest is .csv or .parquet" in r.output, r.output
    assert not (tmp / "m.xlsx").exists()
    r = runner.invoke(app, ["import-labels", str(tmp / "labels.csv"), "--images", str(root), "-o",
                            str(tmp / "m.csv"), "--source-col", "case", "--source-sep", ":", "--kind-map",
                            "unknown=skip"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["merge-manifests", str(tmp / "m.csv"), "-o", str(tmp / "all.xlsx")])
    assert r.exit_code == 2 and "a manifest is .csv or .parquet" in r.output, r.output
    assert not (tmp / "all.xlsx").exists()


def test_import_labels_names_an_images_folder_that_is_not_there_once(collection):
    """Every row read as a missing file instead."""
    tmp, _ = collection
    r = runner.invoke(app, ["import-labels", str(tmp / "labels.csv"), "--images", str(tmp / "nowhere"), "-o",
                            str(tmp / "m.csv"), "--source-col", "case", "--source-sep", ":", "--kind-map",
                            "unknown=skip"])
    assert r.exit_code == 2 and f"--images {tmp / 'nowhere'}: no such folder" in r.output, r.output
    assert "missing file" not in r.output


def test_one_kind_for_every_row_says_it_left_the_sheets_own_kind_column_unread(collection):
    """`--kind regular` on a sheet with a kind column replaced its labels without a word."""
    tmp, root = collection
    r = runner.invoke(app, ["import-labels", str(tmp / "labels.csv"), "--images", str(root), "-o",
                            str(tmp / "m.csv"), "--source-col", "case", "--source-sep", ":", "--kind", "regular"])
    assert r.exit_code == 0, r.output
    assert "--kind regular labelled every row; the sheet's own 'kind' column was not read" in r.output
    assert set(load_manifest(tmp / "m.csv")["kind"]) == {"regular"}


def test_merge_names_a_problem_by_its_input_file_and_row(tmp_path):
    """"row 74" was a row of the merged table, which no one can open."""
    _photo(tmp_path / "a.jpg", (10, 20, 30))
    for name, patient in (("one.csv", "p1"), ("two.csv", "p2")):
        pd.DataFrame({"path": ["a.jpg"], "patient_id": [patient], "source": "s", "device": "", "kind": "regular"}
                     ).to_csv(tmp_path / name, index=False)
    r = runner.invoke(app, ["merge-manifests", str(tmp_path / "one.csv"), str(tmp_path / "two.csv"), "-o",
                            str(tmp_path / "all.csv")])
    assert r.exit_code == 2 and "two.csv row 2, path: duplicate path 'a.jpg' (first at one.csv row 2)" in r.output, \
        r.output


def test_merging_a_manifest_of_no_rows_is_refused_naming_it(tmp_path):
    """A header alone merged without a word, where stats and split refuse it (an audit)."""
    (tmp_path / "a.jpg").write_bytes(b"x")
    pd.DataFrame({"path": ["a.jpg"], "patient_id": ["p"], "source": ["s"], "device": ["d"],
                  "kind": ["regular"]}).to_csv(tmp_path / "one.csv", index=False)
    (tmp_path / "empty.csv").write_text("path,patient_id,source,device,kind\n")
    with pytest.raises(ManifestError, match="(?s)empty.csv.*no rows"):
        merge_manifests([tmp_path / "one.csv", tmp_path / "empty.csv"], tmp_path / "merged.csv")


def test_a_sheet_pointed_at_the_wrong_images_folder_is_told_so_first(collection):
    """50 lines of "missing file", and nothing said that not one row's file was there: the
    negatives' folder given for the cervix photos' sheet (an audit of a site's walkthrough)."""
    tmp, _ = collection
    _photo(tmp / "negatives" / "n1.jpg", (90, 90, 90))
    r = runner.invoke(app, ["import-labels", str(tmp / "labels.csv"), "--images", str(tmp / "negatives"), "-o",
                            str(tmp / "m.csv"), "--source-col", "case", "--source-sep", ":", "--kind-map",
                            "unknown=skip"])
    assert r.exit_code == 2, r.output
    first = next(line for line in r.output.splitlines() if "file" in line)
    assert "not one of the 3 listed files is under" in first and "(it holds 1 photos)" in first, r.output
    # one missing file among present ones is only itself
    (tmp / "photos" / "atlas" / "a1.jpg").unlink()
    r = runner.invoke(app, ["import-labels", str(tmp / "labels.csv"), "--images", str(tmp / "photos"), "-o",
                            str(tmp / "m.csv"), "--source-col", "case", "--source-sep", ":", "--kind-map",
                            "unknown=skip"])
    assert r.exit_code == 2 and "missing file 'atlas/a1.jpg'" in r.output and "not one of" not in r.output, r.output
