from pathlib import Path

import pandas as pd
import pytest

from pipelines.data.manifest import ManifestError, load_manifest, write_manifest


def _touch(root: Path, *names: str) -> None:
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"x")


def test_every_bad_row_is_reported_at_once_with_row_numbers_and_reasons(tmp_path, write_csv):
    _touch(tmp_path, "a.jpg", "b.jpg", "c.jpg", "d.jpg")
    path = write_csv(
        "m.csv",
        "path,patient_id,source,device,kind\n"
        "a.jpg,p1,s1,phone,regular\n"  # row 1 fine
        "missing.jpg,p2,s1,phone,green\n"  # row 2 missing file
        "b.jpg,p3,s1,phone,purple\n"  # row 3 unknown kind
        "c.jpg,,s1,phone,iodine\n"  # row 4 empty patient
        "a.jpg,p5,s1,phone,regular\n"  # row 5 duplicate of row 1
        "d.jpg,p6, ,phone,regular\n",  # row 6 blank source: it fell out of every cross-source split
    )
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    found = {(p.row, p.column) for p in err.value.problems}
    assert found == {(2, "path"), (3, "kind"), (4, "patient_id"), (5, "path"), (6, "source")}
    text = str(err.value)
    assert "5 problem(s)" in text and "empty source" in text
    assert "missing file 'missing.jpg'" in text
    assert "unknown kind 'purple'" in text
    assert "empty patient_id" in text
    assert "duplicate path 'a.jpg' (first at row 2)" in text


def test_a_pipe_or_a_folder_under_a_rows_name_is_said_to_be_one_not_a_missing_file(tmp_path, write_csv):
    """Both read "missing file" though `ls` showed them there (an audit)."""
    import os

    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "folder.jpg").mkdir()
    path = write_csv("m.csv", "path,patient_id,source,device,kind\npipe.jpg,p1,s1,phone,regular\n"
                              "folder.jpg,p2,s1,phone,regular\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    text = str(err.value)
    assert "not a regular file (a pipe, socket or device) 'pipe.jpg'" in text
    assert "a folder, not a file, 'folder.jpg'" in text and "missing file" not in text


def test_missing_columns_are_named(write_csv):
    path = write_csv("m.csv", "path,patient\nx.jpg,p1\n")
    with pytest.raises(ManifestError, match=r"file: missing column\(s\) patient_id, source, device, kind; required"):
        load_manifest(path)


def test_blank_kind_means_unknown_and_is_accepted(tmp_path, write_csv):
    _touch(tmp_path, "a.jpg")
    df = load_manifest(write_csv("m.csv", "path,patient_id,source,device,kind\na.jpg,007,s,d,\n"))
    assert df.loc[0, "kind"] == ""
    assert df.loc[0, "patient_id"] == "007"  # IDs stay text: leading zeros survive


def test_a_source_named_as_a_report_row_is_refused_since_it_would_replace_that_row(tmp_path, write_csv):
    """Every report keys its rows by source beside `overall` (and the detector's `cervix
    photos`): a source so named replaced the report's overall figures, unsaid."""
    _touch(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    path = write_csv("m.csv", "path,patient_id,source,device,kind\na.jpg,p1,overall,d,regular\n"
                              "b.jpg,p2,cervix photos,d,regular\nc.jpg,p3,Overall,d,regular\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert [(p.row, p.column) for p in err.value.problems] == [(1, "source"), (2, "source")]
    assert "source 'overall' is a row of every report" in str(err.value)


def test_unknown_split_value_is_refused(tmp_path, write_csv):
    _touch(tmp_path, "a.jpg")
    path = write_csv("m.csv", "path,patient_id,source,device,kind,split\na.jpg,p,s,d,regular,training\n")
    with pytest.raises(ManifestError, match="unknown split 'training'"):
        load_manifest(path)


def test_known_findings_accept_the_finding_names_in_any_case_and_refuse_others(tmp_path, write_csv):
    _touch(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    head = "path,patient_id,source,device,kind,Known_Findings\n"
    df = load_manifest(write_csv("ok.csv", head + "a.jpg,p,s,d,regular,Blur; dark\nb.jpg,q,s,d,regular,\n"))
    assert df["known_findings"].tolist() == ["Blur; dark", ""]
    with pytest.raises(ManifestError) as err:
        load_manifest(write_csv("bad.csv", head + "a.jpg,p,s,d,regular,blur\nc.jpg,q,s,d,regular,blurry;glare\n"))
    assert [(e.row, e.column) for e in err.value.problems] == [(2, "known_findings")]
    assert "unknown finding blurry (one of blur, dark, overexposed, glare), separated by ';'" in str(err.value)


def test_parquet_and_csv_round_trip_to_the_same_table(tmp_path):
    _touch(tmp_path, "img/a.jpg", "img/b.jpg")
    df = pd.DataFrame({"path": ["img/a.jpg", "img/b.jpg"], "patient_id": ["01", "02"], "source": ["s", "t"],
                       "device": ["eva", "phone"], "kind": ["regular", "iodine"], "split": ["train", "test"]})
    for name in ("m.csv", "m.parquet"):
        back = load_manifest(write_manifest(df, tmp_path / name))
        pd.testing.assert_frame_equal(back.drop(columns="abspath"), df, check_dtype=False)
        assert Path(back.loc[0, "abspath"]) == tmp_path / "img/a.jpg"


def test_relative_paths_resolve_against_an_explicit_root(tmp_path, write_csv):
    _touch(tmp_path / "data", "a.jpg")
    path = write_csv("m.csv", "path,patient_id,source,device,kind\na.jpg,p,s,d,regular\n")
    with pytest.raises(ManifestError, match="missing file"):
        load_manifest(path)
    assert len(load_manifest(path, root=tmp_path / "data")) == 1


def test_padded_values_are_read_as_validated_so_one_patient_stays_in_one_split(tmp_path, write_csv):
    """`validate` strips before it checks; loading did not, so "P1 " was another patient than
    "P1" (a patient in two splits) and " train" was no split at all."""
    from pipelines.data.splits import SplitFractions, patient_split

    _touch(tmp_path, *(f"{k}.jpg" for k in range(8)))
    rows = "".join(f"{k}.jpg,{'P1 ' if k % 2 else 'P1'},s,d,regular, train\n" if k < 2 else
                   f"{k}.jpg,P{k},s,d,regular,train\n" for k in range(8))
    df = load_manifest(write_csv("m.csv", "path,patient_id,source,device,kind,split\n" + rows))
    assert set(df.loc[:1, "patient_id"]) == {"P1"} and set(df["split"]) == {"train"}
    for seed in range(5):
        split = patient_split(df, SplitFractions(0.5, 0.5, 0.0), seed=seed)
        assert split[0] == split[1]


def test_a_file_that_is_no_table_is_named_with_the_reason_not_a_traceback(tmp_path, write_csv):
    from typer.testing import CliRunner

    from pipelines.cli import app

    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "latin1.csv").write_bytes(b"path\n\xe9.jpg\n")
    (tmp_path / "fake.parquet").write_bytes(b"not parquet")
    (tmp_path / "twice.csv").write_text("path,patient_id,source,device,kind,kind\na.jpg,p,s,d,regular,green\n")
    for name, reason in (("missing.csv", "No such file"), ("empty.csv", "No columns to parse"),
                         ("latin1.csv", "codec can't decode"), ("fake.parquet", "cannot read it as Parquet"),
                         ("twice.csv", "kind: the column appears twice")):
        r = CliRunner().invoke(app, ["validate", str(tmp_path / name)])
        assert r.exit_code == 2 and reason in r.output and "Traceback" not in r.output, (name, r.output)


def test_one_file_under_a_relative_and_an_absolute_path_is_a_duplicate(tmp_path, write_csv):
    _touch(tmp_path, "a.jpg")
    path = write_csv("m.csv", f"path,patient_id,source,device,kind\na.jpg,p1,s,d,regular\n{tmp_path / 'a.jpg'},p2,s,d,regular\n")
    with pytest.raises(ManifestError, match="duplicate path .* \\(first at row 2\\)"):
        load_manifest(path)


def test_a_manifest_that_cannot_be_written_leaves_no_half_written_file_behind(tmp_path, monkeypatch):
    df = pd.DataFrame({"path": ["a.jpg"], "patient_id": ["1"], "source": ["s"], "kind": ["regular"]})
    for name in ("m.csv", "m.parquet"):
        (tmp_path / name).mkdir()  # a folder where the manifest should go
        with pytest.raises(OSError):
            write_manifest(df, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "m.parquet"]
    # a write that fails half-way (a full disk): the manifest there before is kept as it was.
    # The folder above fails before a byte is written, and a writer onto the file passed it too
    # (an audit's mutation)
    old = tmp_path / "kept"
    old.mkdir()
    for name in ("m.csv", "m.parquet"):
        write_manifest(df, old / name)
    before = {p.name: p.read_bytes() for p in old.iterdir()}

    def half_then_full(self, target, *args, **kwargs):
        Path(target).write_bytes(b"path,pati")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_full)
    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_then_full)
    for name in ("m.csv", "m.parquet"):
        with pytest.raises(OSError, match="No space"):
            write_manifest(df.assign(kind="green"), old / name)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before


def test_a_sheet_as_excel_saves_it_reads_as_the_table_it_shows(tmp_path):
    """An audit of real sheets: European Excel separates by ';' (a cell with a comma then made
    the file unreadable), types headers with capitals and spaces, and leaves empty rows and
    columns after the table (refused as rows without a path)."""
    _touch(tmp_path, "a.jpg", "x,y.jpg")
    text = ("Path; patient_id ;Source;Device;Kind;;\r\n"
            "a.jpg;007;s1;phone;regular;;\r\n"
            "x,y.jpg;7.0;s1;phone;green;;\r\n"
            ";;;;;;\r\n;;;;;;\r\n")
    (tmp_path / "m.csv").write_bytes("\ufeff".encode() + text.encode())
    df = load_manifest(tmp_path / "m.csv")
    assert list(df["path"]) == ["a.jpg", "x,y.jpg"] and list(df["patient_id"]) == ["007", "7.0"]
    assert [c for c in df.columns if c != "abspath"] == ["path", "patient_id", "source", "device", "kind"]
    (tmp_path / "twice.csv").write_text("path,Path,patient_id,source,device,kind\na.jpg,a.jpg,p,s,d,regular\n")
    with pytest.raises(ManifestError, match="path: the column appears twice"):
        load_manifest(tmp_path / "twice.csv")
    (tmp_path / "book.csv").write_bytes(b"PK\x03\x04" + b"\0" * 100)  # an .xlsx renamed
    with pytest.raises(ManifestError, match="an Excel workbook"):
        load_manifest(tmp_path / "book.csv")
    # a COCO box file given for the manifest: 23 lines of "the column appears twice" (an audit)
    (tmp_path / "coco.json").write_text('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}')
    with pytest.raises(ManifestError, match="JSON \\(a COCO box file\\?\\), not a table") as e:
        load_manifest(tmp_path / "coco.json")
    assert len(e.value.problems) == 1


def test_a_semicolon_sheet_with_a_comma_in_its_header_or_a_sep_line_reads_as_its_columns(tmp_path):
    """`Label (normal, green)` in a ';' sheet's header made it two columns split at that comma,
    and Excel's `sep=;` first line a table of columns `sep=` and `Unnamed: 1` (an audit)."""
    from pipelines.data.manifest import read_table

    (tmp_path / "comma.csv").write_text("Image File;Case;Label (normal, green);Site\r\na.jpg;c1;green;s1\r\n"
                                        "b,c.jpg;c2;normal;s1\r\n;;;\r\n", newline="")
    df = read_table(tmp_path / "comma.csv")
    assert list(df.columns) == ["Image File", "Case", "Label (normal, green)", "Site"]
    assert list(df["Image File"])[:2] == ["a.jpg", "b,c.jpg"]
    (tmp_path / "hint.csv").write_text("sep=;\r\npath;kind\r\na,b.jpg;regular\r\n", newline="")
    assert read_table(tmp_path / "hint.csv").to_dict("records") == [{"path": "a,b.jpg", "kind": "regular"}]
    # a ',' sheet with a ';' in a header cell stays a ',' sheet
    (tmp_path / "plain.csv").write_text("path,notes (a;b;c)\na.jpg,hello\nb.jpg,x\n")
    assert list(read_table(tmp_path / "plain.csv").columns) == ["path", "notes (a;b;c)"]


def test_a_problem_after_a_blank_line_names_the_row_a_spreadsheet_shows(tmp_path, write_csv):
    """A blank line is a row in a spreadsheet; skipped, every later row was named one too low."""
    _touch(tmp_path, "a.jpg", "b.jpg")
    path = write_csv("m.csv", "path,patient_id,source,device,kind\na.jpg,p1,s,d,regular\n\n"
                              "b.jpg,p2,s,d,purple\n\n\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert [(p.row + 1, p.column) for p in err.value.problems] == [
        (3, "path"), (3, "patient_id"), (3, "source"), (4, "kind")]


def test_a_missing_file_written_on_windows_says_so(tmp_path, write_csv):
    _touch(tmp_path, "sub/b.jpg")
    path = write_csv("m.csv", "path,patient_id,source,device,kind\n"
                              "sub\\b.jpg,p1,s,d,regular\nC:\\data\\sub\\b.jpg,p2,s,d,regular\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert "the folder has 'sub/b.jpg'" in str(err.value) and "a Windows path" in str(err.value)
    # a drive path whose tail the folder holds in other letter case: that spelling is named (it
    # was told only to be made relative: an audit)
    path = write_csv("w.csv", "path,patient_id,source,device,kind\nC:\\fotos\\SUB\\B.JPG,p1,s,d,regular\n"
                              "C:\\fotos\\gone.jpg,p2,s,d,regular\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert "a Windows path, and the folder has 'sub/b.jpg': name it so" in str(err.value)
    assert "a Windows path: name the file relative to" in str(err.value)  # gone.jpg: no such tail


def test_a_manifest_written_elsewhere_keeps_each_linked_files_own_name(tmp_path, write_csv):
    """git-annex and DVC's link cache keep photos as links to one store: resolved whole, two
    links to one object were written as one path (a duplicate the next load refused)."""
    from pipelines.data.manifest import rebased

    store = tmp_path / "store"
    store.mkdir()
    (store / "obj1").write_bytes(b"x")
    (tmp_path / "photos").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "photos" / name).symlink_to(store / "obj1")
    df = load_manifest(write_csv("m.csv", "path,patient_id,source,device,kind\nphotos/a.jpg,p1,s,d,regular\n"
                                          "photos/b.jpg,p2,s,d,regular\n"))
    (tmp_path / "out").mkdir()
    assert list(rebased(df, tmp_path / "out" / "split.csv")["path"]) == ["../photos/a.jpg", "../photos/b.jpg"]
