"""Duplicate groups: exact copies by bytes, near copies by the engine's keys, and the split
that refuses (or merges) a group across its sides. Generated images and planted keys only."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.data.duplicates import DuplicateConfig, annotate, duplicates_of_records, find_duplicates
from pipelines.engine.hashes import encode_embedding
from pipelines.engine.qc_result import Label, QCResult
from tests.qc_fixtures import tiny_weights

runner = CliRunner()
H0, H0_NEAR, H_FAR = "0000000000000000", "0000000000000003", "ffffffff00000000"  # distances 2 and 32


def _photo(seed: int, size=(320, 240)) -> Image.Image:
    """A smooth random scene: distinct low frequencies per seed, as photos have."""
    low = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(low).resize(size, Image.Resampling.BICUBIC)


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=64)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline

    weights = tiny_weights(tmp_path_factory.mktemp("w"), detector_threshold=0.0)
    return QCPipeline(weights, QCConfig(device="cpu"))


def test_engine_keys_group_exact_reencoded_and_resized_copies_and_nothing_else(engine):
    original = _jpeg(_photo(1))
    items = {
        "a.jpg": original,
        "a_copy.jpg": original,  # byte-identical
        "a_q55.jpg": _jpeg(Image.open(io.BytesIO(original)), quality=55),
        "a_half.jpg": _jpeg(Image.open(io.BytesIO(original)).resize((160, 120), Image.Resampling.LANCZOS)),
        "a_double.jpg": _jpeg(Image.open(io.BytesIO(original)).resize((640, 480), Image.Resampling.LANCZOS)),
        **{f"other{i}.jpg": _jpeg(_photo(10 + i)) for i in range(5)},
    }
    records = engine.run(list(items.values()), names=list(items))
    assert all(r.phash is not None for r in records)
    df = duplicates_of_records(records)
    assert sorted(df["path"]) == ["a.jpg", "a_copy.jpg", "a_double.jpg", "a_half.jpg", "a_q55.jpg"]
    assert set(df["duplicate_of"]) == {"a.jpg"} and set(df["group"]) == {1}
    kinds = dict(zip(df["path"], df["kind"]))
    assert kinds["a.jpg"] == kinds["a_copy.jpg"] == "exact" and kinds["a_q55.jpg"] == kinds["a_half.jpg"] == "near"
    assert dict(zip(df["path"], df["evidence"]))["a_copy.jpg"] == "sha256"


@pytest.mark.parametrize("height,width", [(240, 320), (600, 800), (750, 1000), (20, 17)])
def test_whole_photo_hash_takes_the_exact_area_average_on_every_path(height, width):
    """The reshape-and-mean path (a side 32 divides), the weight-matrix path (neither does)
    and an upsampled tiny photo all give the bits of the exact 32 px area average of the
    colour photo, for uint8 photos and for the detector's 0..1 floats alike."""
    import torch

    from pipelines.engine.crops import crop_boxes, whole_frames
    from pipelines.engine.hashes import phash, whole_photo_hashes

    rng = np.random.default_rng(height)
    photos = [torch.from_numpy(np.asarray(_photo(k, (width, height)))).permute(2, 0, 1).contiguous() for k in range(3)]
    photos.append(torch.from_numpy(rng.integers(0, 256, (3, height, width), dtype=np.uint8)))
    exact = phash(crop_boxes(photos, whole_frames(photos), sizes=(32,))[32])
    assert whole_photo_hashes(photos) == exact
    assert whole_photo_hashes([p.float() / 255 for p in photos]) == exact


def test_each_key_alone_links_a_near_copy_within_its_threshold():
    cfg = DuplicateConfig(max_phash_distance=4, max_crop_distance=4, min_cosine=0.99)
    e = _unit(0)
    close = e + 0.01 * _unit(1)
    cases = {  # (phashes, crop_hashes, embeddings) of two photos with different bytes
        "phash": ([H0, H0_NEAR], [None, None], [None, None]),
        "crop_hash": ([H0, H_FAR], [H0, H0_NEAR], [None, None]),
        "embedding": ([H0, H_FAR], [None, None], [encode_embedding(e), encode_embedding(close / np.linalg.norm(close))]),
    }
    for key, (ph, ch, emb) in cases.items():
        df = find_duplicates(["x", "y"], ["s1", "s2"], ph, ch, emb, cfg)
        assert list(df["kind"]) == ["near", "near"], key  # neither's bytes are the other's
        assert list(df["evidence"]) == [key, key], key


def test_photos_within_the_whole_photo_hash_are_copies_only_if_their_pixels_align():
    """Eight different retina photos on their black surround and consecutive video frames sit
    3-4 bits apart by the whole-photo hash: unchecked, they were grouped as copies (an audit of
    1,461 real photos). With the photos at hand the pixels decide such a pair; one too plain for
    keypoints keeps the hash's word, as a re-encoded copy of a smooth photo needs it to."""
    from tests.qc_fixtures import textured_scene

    scene, other = textured_scene(1), textured_scene(2)
    flat = _photo(3)  # smooth: too few keypoints for the check
    files = {"a.jpg": _jpeg(scene), "a_q60.jpg": _jpeg(scene, 60), "b.jpg": _jpeg(other),
             "flat.jpg": _jpeg(flat), "flat_q60.jpg": _jpeg(flat, 60)}
    paths = list(files)
    # 3-4 bits apart: a's copy, another photo b, and a plain photo's copy; within 2 bits no check
    same_hash = [H0, "000000000000000f", "00000000000000f0", H_FAR, "ffffffff0000000f"]
    df = find_duplicates(paths, [f"s{i}" for i in range(5)], same_hash, [None] * 5, [None] * 5, DuplicateConfig(),
                         read=files.__getitem__)
    groups = {tuple(sorted(g["path"])): set(g["evidence"]) for _, g in df.groupby("group")}
    assert groups == {("a.jpg", "a_q60.jpg"): {"aligned"}, ("flat.jpg", "flat_q60.jpg"): {"phash"}}, df
    # without the photos, the hash alone decides, as before
    keys_alone = find_duplicates(paths, [f"s{i}" for i in range(5)], same_hash, [None] * 5, [None] * 5,
                                 DuplicateConfig())
    assert sorted(keys_alone["path"]) == sorted(paths)


def test_photos_beyond_every_threshold_are_not_grouped():
    cfg = DuplicateConfig(max_phash_distance=4, max_crop_distance=4, min_cosine=0.99)
    df = find_duplicates(["x", "y"], ["s1", "s2"], [H0, H_FAR], [H0, H_FAR],
                         [encode_embedding(_unit(0)), encode_embedding(_unit(1))], cfg)
    assert df.empty and list(df.columns) == ["path", "group", "duplicate_of", "kind", "evidence"]


def test_a_finder_that_groups_nothing_has_no_pair_precision_not_a_perfect_one():
    """Precision over no predicted pair read 1.0, overall and per source: a finder that found
    nothing looked perfectly precise (an audit). It is undefined: NaN, null in the report."""
    from pipelines.evaluation.duplicates_eval import score

    cfg = DuplicateConfig(max_phash_distance=4, max_crop_distance=4, min_cosine=0.99)
    records = [QCResult(path=n, label=Label.REGULAR, sha256=sha, phash=ph)
               for n, sha, ph in (("a.jpg", "s1", H0), ("a-copy.jpg", "s2", H_FAR))]  # the copy beyond every key
    truth = pd.DataFrame({"name": ["a.jpg", "a-copy.jpg"], "original": ["a.jpg", "a.jpg"],
                          "transform": ["original", "crop"], "cluster": [0, 0], "patient_id": ["p", "p"],
                          "source": ["s", "s"]})
    out = score(records, truth, cfg)
    assert out["predicted_pairs"] == 0 and out["near_recall"]["crop"] == 0.0
    assert np.isnan(out["precision"]) and np.isnan(out["per_source"]["s"]["precision"])


def test_missing_keys_join_nothing_and_never_fail():
    paths = ["unreadable", "no_crop", "b", "c"]
    df = find_duplicates(paths, [None, "s", "s2", None], [None, H0, H0_NEAR, None], [None, None, None, None],
                         [None, None, None, None])
    assert sorted(df["path"]) == ["b", "no_crop"]
    assert find_duplicates(paths, None, None, None, None).empty
    assert find_duplicates([], [], [], [], []).empty
    nan_rows = np.full((4, 64), np.nan, dtype=np.float32)
    assert find_duplicates(paths, None, None, None, nan_rows).empty


def test_groups_are_numbered_by_first_path_and_point_to_it():
    paths = ["z1", "m2", "a1", "m1", "z2"]
    sha = ["zz", "mm", "aa", "mm", "zz"]
    df = find_duplicates(paths, sha, None, None, None)
    assert list(df["path"]) == ["m1", "m2", "z1", "z2"]
    assert list(df["group"]) == [1, 1, 2, 2]
    assert list(df["duplicate_of"]) == ["m1", "m1", "z1", "z1"]
    assert set(df["kind"]) == {"exact"}


def test_copies_chain_into_one_group_and_exact_means_a_byte_twin_in_the_group():
    # a -(sha)- b -(phash)- c -(embedding)- d: one group; a and b are each other's bytes
    e = _unit(3)
    df = find_duplicates(["a", "b", "c", "d"], ["s", "s", "t", "u"], [H0, H0, H0_NEAR, H_FAR], None,
                         [None, None, encode_embedding(e), encode_embedding(e)],
                         DuplicateConfig(max_phash_distance=4, min_cosine=0.99))
    assert list(df["kind"]) == ["exact", "exact", "near", "near"]
    assert list(df["evidence"]) == ["sha256", "sha256", "phash", "embedding"]


def test_a_groups_first_path_is_not_exact_without_a_byte_twin_and_twins_of_another_photo_are():
    """`exact` meant "the first path's bytes": a crop sorting first was exact, and two byte
    twins of it were near, so dropping the exact rows dropped the crop and kept both twins (an audit)."""
    df = find_duplicates(["a_crop", "b", "c"], ["s1", "s2", "s2"], [H0, H0_NEAR, H0_NEAR], None, None,
                         DuplicateConfig(max_phash_distance=4))
    assert list(df["path"]) == ["a_crop", "b", "c"] and list(df["kind"]) == ["near", "exact", "exact"]


def test_the_approximate_index_above_exact_below_finds_planted_copies(monkeypatch):
    """Each configuration checked to take its approximate path (pigeonhole buckets for the
    hashes, an IVF index for the embeddings): exact search finds the same pairs, and with
    every branch forced flat this passed (an audit's mutation)."""
    import pipelines.data.duplicates as duplicates

    ran = []
    for name in ("_pigeonhole_pairs", "_ivf_cells"):  # spies: the real functions run
        real = getattr(duplicates, name)
        monkeypatch.setattr(duplicates, name, lambda *a, _real=real, _name=name: ran.append(_name) or _real(*a))
    rng = np.random.default_rng(0)
    n = 3000
    bits = rng.integers(0, 2, (n, 64), dtype=np.uint8)
    bits[1::2] = bits[::2]  # every odd row a copy of the row before, 2 bits flipped
    bits[1::2, [5, 40]] ^= 1
    hashes = [np.packbits(b).tobytes().hex() for b in bits]
    vectors = rng.normal(size=(n, 64)).astype(np.float32)
    vectors[1::2] = vectors[::2] + 0.01 * rng.normal(size=(n // 2, 64))
    paths = [f"p{i:05d}" for i in range(n)]
    for cfg, path in ((DuplicateConfig(max_phash_distance=4, min_cosine=1.01, exact_below=100, nprobe=8),
                       "_pigeonhole_pairs"),
                      (DuplicateConfig(max_phash_distance=-1, min_cosine=0.99, exact_below=100, nprobe=8),
                       "_ivf_cells")):
        ran.clear()
        df = find_duplicates(paths, None, hashes, None, vectors, cfg)
        sizes = df.groupby("group").size()
        assert len(sizes) >= 0.98 * n / 2 and sizes.max() == 2  # planted pairs, nothing else
        assert path in ran, (path, ran)


def _record(path: str, sha: str | None, phash: str | None) -> QCResult:
    return QCResult(path=path, sha256=sha, label=Label.REGULAR if phash else Label.UNREADABLE, phash=phash)


def test_annotate_sets_the_duplicate_fields_and_clears_stale_ones():
    records = [_record("a", "s", H0), _record("b", "s", H0), _record("c", None, None),
               _record("d", "t", H_FAR).model_copy(update={"duplicate_group": 9, "duplicate_of": "x",
                                                           "duplicate_kind": "near"})]
    out = annotate(records, duplicates_of_records(records))
    assert [(r.duplicate_group, r.duplicate_of, r.duplicate_kind) for r in out] == [
        (1, "a", "exact"), (1, "a", "exact"), (None, None, None), (None, None, None)]
    assert records[3].duplicate_group == 9  # inputs are left as they were


def _manifest(tmp_path) -> str:
    rows = [(f"img/p{i}_{j}.jpg", f"p{i}", "A" if i % 2 else "B", "", "regular") for i in range(20) for j in range(2)]
    pd.DataFrame(rows, columns=["path", "patient_id", "source", "device", "kind"]).to_csv(tmp_path / "m.csv", index=False)
    return str(tmp_path / "m.csv")


def _across_group(tmp_path, manifest: str) -> tuple[str, list[str]]:
    """A duplicates.csv whose one group joins photos of patients that a plain split separates."""
    plain = tmp_path / "plain.csv"
    assert runner.invoke(app, ["split", manifest, "-o", str(plain)]).exit_code == 0
    df = pd.read_csv(plain, keep_default_na=False)
    first = df.groupby("split")["path"].first()
    members = sorted([first["train"], first["test"]])
    pd.DataFrame({"path": members, "group": 1, "duplicate_of": members[0], "kind": "near", "evidence": "phash"}
                 ).to_csv(tmp_path / "duplicates.csv", index=False)
    return str(tmp_path / "duplicates.csv"), members


def test_split_refuses_a_group_across_splits_and_names_it(tmp_path):
    manifest = _manifest(tmp_path)
    dup, members = _across_group(tmp_path, manifest)
    r = runner.invoke(app, ["split", manifest, "-o", str(tmp_path / "o.csv"), "--duplicates", dup])
    assert r.exit_code == 2
    assert "group 1" in r.output and all(m in r.output for m in members)
    assert "train" in r.output and "test" in r.output
    assert not (tmp_path / "o.csv").exists()


def test_merge_duplicates_puts_the_group_under_one_patient_and_one_split(tmp_path):
    manifest = _manifest(tmp_path)
    dup, members = _across_group(tmp_path, manifest)
    r = runner.invoke(app, ["split", manifest, "-o", str(tmp_path / "o.csv"), "--duplicates", dup,
                            "--merge-duplicates"])
    assert r.exit_code == 0, r.output
    assert "merged duplicates: 1 groups" in r.output
    ids = sorted(m.split("/")[1].split("_")[0] for m in members)
    assert f"{ids[1]} -> {ids[0]}" in r.output  # which ids, not only how many
    df = pd.read_csv(tmp_path / "o.csv", keep_default_na=False)
    group = df[df["path"].isin(members)]
    assert group["split"].nunique() == 1 and group["patient_id"].nunique() == 1
    # the merged patients' other photos follow them, so no patient straddles splits either
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(group["patient_id_original"]) == {m.split("/")[1].split("_")[0] for m in members}


def test_split_says_when_manifest_photos_were_never_compared_by_the_duplicates_table(tmp_path):
    """The table lists group members only: one made on a subfolder, or before photos were
    added, passed a split whose copies it never saw, unsaid (an audit)."""
    from pipelines.data.duplicates import compared_file

    manifest = _manifest(tmp_path)
    dup, members = _across_group(tmp_path, manifest)
    merge = ["--merge-duplicates"]
    r = runner.invoke(app, ["split", manifest, "-o", str(tmp_path / "o.csv"), "--duplicates", dup, *merge])
    assert r.exit_code == 0 and "does not say which photos it compared" in r.output, r.output
    paths = pd.read_csv(manifest)["path"]
    pd.DataFrame({"path": paths[:15]}).to_csv(compared_file(Path(dup)), index=False)
    r = runner.invoke(app, ["split", manifest, "-o", str(tmp_path / "o.csv"), "--duplicates", dup, *merge])
    assert r.exit_code == 0 and "25 of the manifest's 40 photos were not compared" in r.output, r.output
    assert sorted(paths[15:])[0] in r.output
    pd.DataFrame({"path": paths}).to_csv(compared_file(Path(dup)), index=False)
    r = runner.invoke(app, ["split", manifest, "-o", str(tmp_path / "o.csv"), "--duplicates", dup, *merge])
    assert r.exit_code == 0 and "not compared" not in r.output and "does not say" not in r.output, r.output


def test_split_reads_groups_from_a_clean_output_folder(tmp_path):
    manifest = _manifest(tmp_path)
    _, members = _across_group(tmp_path, manifest)
    out = tmp_path / "clean"
    out.mkdir()
    db = sqlite3.connect(out / "state.sqlite")
    db.execute("CREATE TABLE results (path TEXT PRIMARY KEY, label TEXT, record TEXT)")
    db.executemany("INSERT INTO results VALUES (?, ?, ?)",
                   [(m, "regular", _record(m, "same-bytes", H0).model_dump_json()) for m in members])
    db.commit()
    db.close()
    r = runner.invoke(app, ["split", manifest, "-o", str(tmp_path / "o.csv"), "--duplicates", str(out)])
    assert r.exit_code == 2 and "group 1" in r.output


def test_split_matches_table_paths_written_otherwise_and_refuses_a_table_that_matches_nothing(tmp_path):
    """The manifest said `./img/a.jpg`, the duplicates table `img/a.jpg`: nothing matched, the
    split went on with a warning, and the copies landed in train and test (exit 0)."""
    manifest = _manifest(tmp_path)
    dup, members = _across_group(tmp_path, manifest)
    dotted = pd.read_csv(manifest, keep_default_na=False)
    dotted["path"] = "./" + dotted["path"]
    dotted.to_csv(tmp_path / "dotted.csv", index=False)
    r = runner.invoke(app, ["split", str(tmp_path / "dotted.csv"), "-o", str(tmp_path / "o.csv"), "--duplicates", dup])
    assert r.exit_code == 2 and "group 1" in r.output
    elsewhere = pd.read_csv(dup, keep_default_na=False).assign(path=lambda d: "other/" + d["path"])
    elsewhere.to_csv(tmp_path / "elsewhere.csv", index=False)
    r = runner.invoke(app, ["split", manifest, "-o", str(tmp_path / "o.csv"), "--duplicates",
                            str(tmp_path / "elsewhere.csv")])
    assert r.exit_code == 2 and "none of its 2 paths is in the manifest" in r.output
    assert not (tmp_path / "o.csv").exists()
    # no copies found, made over the images' folder (paths without `img/`): "N were not compared; run
    # cervixqc duplicates over the whole collection", which it had been (an audit)
    pd.DataFrame(columns=["path", "group", "duplicate_of", "kind", "evidence"]).to_csv(tmp_path / "none.csv",
                                                                                        index=False)
    pd.DataFrame({"path": [p.removeprefix("img/") for p in pd.read_csv(manifest)["path"]]}).to_csv(
        tmp_path / "none.compared.csv", index=False)
    r = runner.invoke(app, ["split", manifest, "-o", str(tmp_path / "o.csv"), "--duplicates",
                            str(tmp_path / "none.csv")])
    assert r.exit_code == 2 and "none of the 40 photos it compared is a path of the manifest" in r.output, r.output
    assert f"cervixqc duplicates {manifest} -o" in r.output and not (tmp_path / "o.csv").exists()


def test_a_second_merge_keeps_the_first_merges_original_patient_ids(tmp_path):
    manifest = _manifest(tmp_path)
    dup, members = _across_group(tmp_path, manifest)
    once, twice = tmp_path / "once.csv", tmp_path / "twice.csv"
    assert runner.invoke(app, ["split", manifest, "-o", str(once), "--duplicates", dup, "--merge-duplicates"]).exit_code == 0
    first = pd.read_csv(once, keep_default_na=False)
    more = pd.DataFrame({"path": [members[0], "img/p19_0.jpg"], "group": 1, "duplicate_of": members[0],
                         "kind": "near", "evidence": "phash"})
    more.to_csv(tmp_path / "more.csv", index=False)
    r = runner.invoke(app, ["split", str(once), "-o", str(twice), "--duplicates", str(tmp_path / "more.csv"),
                            "--merge-duplicates"])
    assert r.exit_code == 0, r.output
    second = pd.read_csv(twice, keep_default_na=False)
    assert list(second["patient_id_original"]) == list(first["patient_id_original"])
    assert second.loc[second["path"] == "img/p19_0.jpg", "patient_id_original"].item() == "p19"


@pytest.mark.parametrize("cell", ["", "one", "1.5"])
def test_a_duplicates_table_with_a_group_that_is_no_whole_number_is_refused_by_line(tmp_path, cell):
    manifest = _manifest(tmp_path)
    dup, _ = _across_group(tmp_path, manifest)
    table = pd.read_csv(dup, keep_default_na=False, dtype=str)
    table.loc[1, "group"] = cell
    table.to_csv(dup, index=False)
    r = runner.invoke(app, ["split", manifest, "-o", str(tmp_path / "o.csv"), "--duplicates", dup])
    assert r.exit_code == 2 and "group must be a whole number; not on line 3" in r.output, r.output


def test_a_clean_folder_whose_exports_lag_its_state_is_grouped_from_the_state(tmp_path):
    """A resumed run stopped before its exports left the older duplicates.csv, without the new
    photos' groups, and split read that one."""
    from pipelines.clean.state import StateStore
    from pipelines.data.duplicates import read_duplicates

    out = tmp_path / "clean"
    store = StateStore(out / "state.sqlite", source=tmp_path)
    store.add([_record("a.jpg", "s1", H0), _record("b.jpg", "s1", H0)])
    duplicates_of_records(store.records()).to_csv(out / "duplicates.csv", index=False)
    store.mark_exported()
    assert read_duplicates(out)["path"].tolist() == ["a.jpg", "b.jpg"]
    store.add([_record("c.jpg", "s2", H_FAR), _record("d.jpg", "s2", H_FAR)])  # stopped before the exports
    store.close()
    assert sorted(read_duplicates(out)["path"]) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]


def test_merging_copies_filed_under_two_sources_is_named_before_a_split_by_source(tmp_path):
    manifest = _manifest(tmp_path)
    df = pd.read_csv(manifest, keep_default_na=False)
    a, b = df[df.source == "A"]["path"].iat[0], df[df.source == "B"]["path"].iat[0]
    pd.DataFrame({"path": [a, b], "group": 1, "duplicate_of": a, "kind": "exact", "evidence": "sha256"}
                 ).to_csv(tmp_path / "d.csv", index=False)
    r = runner.invoke(app, ["split", manifest, "-o", str(tmp_path / "o.csv"), "--duplicates", str(tmp_path / "d.csv"),
                            "--merge-duplicates", "--train-sources", "A", "--test-sources", "B"])
    assert r.exit_code == 2 and "joined copies filed under different sources" in r.output, r.output


def test_split_takes_a_table_of_no_copies_and_names_a_damaged_clean_state(tmp_path):
    """A table of no copies (what `duplicates` writes for a clean collection) was a KeyError
    traceback; so was a clean folder whose state.sqlite is damaged or empty (an audit)."""
    manifest = _manifest(tmp_path)
    (tmp_path / "none.csv").write_text("path,group,duplicate_of,kind,evidence\n")
    none = str(tmp_path / "none.csv")
    r = runner.invoke(app, ["split", manifest, "-o", str(tmp_path / "o.csv"), "--duplicates", none])
    assert r.exit_code == 0 and "duplicates: 0 groups, 0 photos of the manifest" in r.output, r.output
    for name, damage in (("garbled", b"this is not a database" * 50), ("empty", b"")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "state.sqlite").write_bytes(damage)
        for args in (["split", manifest, "-o", str(tmp_path / "o.csv"), "--duplicates", str(folder)],
                     ["duplicates", str(folder), "-o", str(tmp_path / "d.csv")]):
            r = runner.invoke(app, args)
            assert r.exit_code == 2 and "state.sqlite: not a readable `cervixqc clean` state" in r.output, r.output
            assert r.exception is None or isinstance(r.exception, SystemExit), r.exception


def test_split_with_a_clean_folder_checks_the_photos_its_table_compared_and_reads_its_table_as_the_folder(
        tmp_path, engine, caplog):
    """A clean folder's state keeps the rows of photos a later run's manifest left out, while
    its duplicates.csv is the later run's: the left-out copy passed as compared and landed
    across the split, exit 0. Its duplicates.csv named itself was read even when the run's later
    rows had outdated it (an audit)."""
    from pipelines.clean.run import clean
    from pipelines.data.duplicates import read_duplicates

    manifest = Path(_manifest(tmp_path))
    _, members = _across_group(tmp_path, str(manifest))
    full = pd.read_csv(manifest, keep_default_na=False)
    for k, path in enumerate(full["path"]):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_bytes(_jpeg(_photo(100 + k)))
    (tmp_path / members[1]).write_bytes((tmp_path / members[0]).read_bytes())  # a copy across the plain split
    out = tmp_path / "clean"
    clean(engine, manifest, out)
    split = ["split", str(manifest), "-o", str(tmp_path / "o.csv"), "--duplicates"]
    r = runner.invoke(app, [*split, str(out)])
    assert r.exit_code == 2 and "group" in r.output, r.output
    full[full["path"] != members[1]].to_csv(manifest, index=False)  # the copy left out of a rerun
    clean(engine, manifest, out)
    full.to_csv(manifest, index=False)
    for given in (out, out / "duplicates.csv"):
        r = runner.invoke(app, [*split, str(given)])
        assert r.exit_code == 0 and "1 of the manifest's 40 photos were not compared" in r.output, r.output
        assert members[1] in r.output
    # the run's later rows not yet exported (a run stopped before its exports): the table named
    # itself is the folder's, grouped again from the state
    db = sqlite3.connect(out / "state.sqlite")
    with db:
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'writes'")
    db.close()
    with caplog.at_level("WARNING", logger="pipelines.data.duplicates"):
        table = read_duplicates(out / "duplicates.csv")
    assert "older than the run's state" in caplog.text
    pd.testing.assert_frame_equal(table, read_duplicates(out))


def test_duplicate_tables_escape_formula_and_carriage_return_names_and_read_them_back_as_on_disk(tmp_path):
    """duplicates.csv held `=HYPERLINK(..).jpg` raw, a formula in a spreadsheet (results.csv of
    the same run escaped it), and a name with a carriage return split its row in two for pandas
    and the csv module (an audit); `split --duplicates` reads the names back as on disk."""
    import csv

    from pipelines.data.duplicates import compared_paths, read_duplicates

    photos = tmp_path / "photos"
    photos.mkdir()
    twins = [('=HYPERLINK("http:x","y").jpg', "+1+1.jpg"), ("x\r@SUM(1+1).jpg", "plain;=2.jpg")]
    for seed, names in enumerate(twins):
        for name in names:
            (photos / name).write_bytes(_jpeg(_photo(seed)))
    names = sorted(n for pair in twins for n in pair)
    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0)
    r = runner.invoke(app, ["clean", str(photos), "-o", str(tmp_path / "c"), "--weights", str(weights),
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["duplicates", str(photos), "-o", str(tmp_path / "d.csv"), "--weights", str(weights),
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    for table in (tmp_path / "c" / "duplicates.csv", tmp_path / "d.csv"):
        with open(table, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 4, rows  # one row per member, none split at the carriage return
        cells = [row[c] for row in rows for c in ("path", "duplicate_of")]
        assert not [c for c in cells if c.startswith(("=", "+", "-", "@")) or "\r" in c or ";=" in c], cells
        assert sorted(read_duplicates(table)["path"]) == names
        assert read_duplicates(table).groupby("group")["path"].apply(sorted).map(tuple).tolist() == sorted(
            tuple(sorted(pair)) for pair in twins)
    assert compared_paths(tmp_path / "d.csv") == set(names)
    assert compared_paths(tmp_path / "c") == set(names)  # from its results.csv, escaped the same way
