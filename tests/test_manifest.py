from pathlib import Path

import pandas as pd
import pytest

from pipelines.data.manifest import ManifestError, load_manifest, write_manifest


def _touch(root: Path, *names: str) -> None:
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"x")


def test_every_bad_row_is_reported_at_once_with_row_numbers_and_reasons(tmp_path, write_csv):
    _touch(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    path = write_csv(
        "m.csv",
        "path,patient_id,source,device,kind\n"
        "a.jpg,p1,s1,phone,regular\n"  # row 1 fine
        "missing.jpg,p2,s1,phone,green\n"  # row 2 missing file
        "b.jpg,p3,s1,phone,purple\n"  # row 3 unknown kind
        "c.jpg,,s1,phone,iodine\n"  # row 4 empty patient
        "a.jpg,p5,s1,phone,regular\n",  # row 5 duplicate of row 1
    )
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    found = {(p.row, p.column) for p in err.value.problems}
    assert found == {(2, "path"), (3, "kind"), (4, "patient_id"), (5, "path")}
    text = str(err.value)
    assert "4 problem(s)" in text
    assert "missing file 'missing.jpg'" in text
    assert "unknown kind 'purple'" in text
    assert "empty patient_id" in text
    assert "duplicate path 'a.jpg' (first at row 1)" in text


def test_missing_columns_are_named(write_csv):
    path = write_csv("m.csv", "path,patient\nx.jpg,p1\n")
    with pytest.raises(ManifestError, match="patient_id,source,device,kind: missing column"):
        load_manifest(path)


def test_blank_kind_means_unknown_and_is_accepted(tmp_path, write_csv):
    _touch(tmp_path, "a.jpg")
    df = load_manifest(write_csv("m.csv", "path,patient_id,source,device,kind\na.jpg,007,s,d,\n"))
    assert df.loc[0, "kind"] == ""
    assert df.loc[0, "patient_id"] == "007"  # IDs stay text: leading zeros survive


def test_unknown_split_value_is_refused(tmp_path, write_csv):
    _touch(tmp_path, "a.jpg")
    path = write_csv("m.csv", "path,patient_id,source,device,kind,split\na.jpg,p,s,d,regular,training\n")
    with pytest.raises(ManifestError, match="unknown split 'training'"):
        load_manifest(path)


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
