"""The pixel check behind cropped and turned copies (pipelines/data/copy_check.py), and the
duplicate search that uses it. Generated textured scenes only."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.data.copy_check import CopyCheckConfig, CopyChecker, compare, features
from pipelines.data.duplicates import DuplicateConfig, find_duplicates, read_duplicates
from pipelines.engine.hashes import hamming
from tests.qc_fixtures import cropped_copy, fuzz_set, jpeg_bytes, textured_scene, tiny_weights

runner = CliRunner()


def _later(img: Image.Image) -> Image.Image:
    """The same scene moments later: nothing moved, but a patch of it turned white (acetic
    acid) and the light changed a little, as a second photo of one patient does."""
    a = np.asarray(img, np.float32) * 0.97
    a[150:330, 220:460] = 0.5 * a[150:330, 220:460] + 120
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def test_a_cropped_shrunk_turned_copy_is_a_copy():
    original = textured_scene(1)
    a, b = features(jpeg_bytes(original)), features(jpeg_bytes(cropped_copy(original), 60))
    v = compare(a, b)
    assert v.copy, v
    assert v.inliers >= 100 and 0.5 < v.overlap < 0.95  # the crop covers part of the original only
    # either way round: the finer thumbnail is warped onto the coarser (blown up, the crop's
    # would read 3.8 grey levels apart)
    back = compare(b, a)
    assert back.copy and abs(back.difference - v.difference) < 0.5, (v, back)


def test_another_scene_and_the_same_scene_changed_are_not_copies():
    original = textured_scene(1)
    a = features(jpeg_bytes(original))
    other = compare(a, features(jpeg_bytes(textured_scene(2))))
    assert not other.copy and other.reason in ("too few matches", "no transform")
    # keypoints outside the patch still align it, as for a colposcope held still between two
    # photos: the aligned pixels are what tell the second photo from a copy
    later = compare(a, features(jpeg_bytes(_later(original))))
    assert later.inliers >= 40 and later.difference is not None
    assert not later.copy and later.reason == "differs once aligned" and later.difference > 5


def test_an_unreadable_photo_is_no_copy_of_anything_and_raises_nothing(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(textured_scene(1)))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "bomb.png").write_bytes(fuzz_set()["bomb.png"][0])  # 400 MP: refused from its header
    check = CopyChecker(lambda rel: (tmp_path / rel).read_bytes())
    for other in ("broken.jpg", "missing.jpg", "bomb.png"):
        v = check("a.jpg", other)
        assert not v.copy and v.reason == "unreadable"


def _collection(tmp_path):
    """An original, its cropped copy (whole-photo hashes far apart) and three other scenes."""
    photos = {"a.jpg": jpeg_bytes(textured_scene(1)), "a_crop.jpg": jpeg_bytes(cropped_copy(textured_scene(1)), 60),
              **{f"other{i}.jpg": jpeg_bytes(textured_scene(10 + i)) for i in range(3)}}
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in photos.items():
        (folder / name).write_bytes(data)
    return folder


def test_the_closest_photos_are_checked_with_the_pixels_only_when_they_can_be_read(tmp_path):
    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline

    folder = _collection(tmp_path)
    names = sorted(p.name for p in folder.iterdir())
    records = QCPipeline(tiny_weights(tmp_path / "w", detector_threshold=0.0), QCConfig(device="cpu")).run(
        [folder / n for n in names], names=names)
    keys = {r.path: r for r in records}
    assert hamming(keys["a.jpg"].phash, keys["a_crop.jpg"].phash) > DuplicateConfig().max_phash_distance
    args = ([r.path for r in records], [r.sha256 for r in records], [r.phash for r in records],
            [r.crop_hash for r in records], [r.embedding for r in records])
    assert find_duplicates(*args).empty  # keys alone: the crop is not found
    df = find_duplicates(*args, read=lambda rel: (folder / rel).read_bytes())
    assert list(df["path"]) == ["a.jpg", "a_crop.jpg"]
    assert list(df["evidence"]) == ["aligned", "aligned"] and list(df["kind"]) == ["near", "near"]  # no byte twin
    assert find_duplicates(*args, DuplicateConfig(verify_k=0), read=lambda rel: (folder / rel).read_bytes()).empty


def test_keypoints_beyond_the_memory_limit_go_to_a_temporary_file_that_is_removed(tmp_path, monkeypatch):
    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline

    folder = _collection(tmp_path)
    names = sorted(p.name for p in folder.iterdir())
    records = QCPipeline(tiny_weights(tmp_path / "w", detector_threshold=0.0), QCConfig(device="cpu")).run(
        [folder / n for n in names], names=names)
    spill = tmp_path / "tmp"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    seen = []
    read = lambda rel: (seen.append(sorted(spill.iterdir())), (folder / rel).read_bytes())[1]  # noqa: E731
    df = find_duplicates([r.path for r in records], [r.sha256 for r in records], [r.phash for r in records],
                         [r.crop_hash for r in records], [r.embedding for r in records],
                         DuplicateConfig(copy_check=CopyCheckConfig(in_memory=0)), read=read)
    assert list(df["path"]) == ["a.jpg", "a_crop.jpg"]
    assert any(d and d[0].name.startswith("cervixqc-keypoints-") for d in seen)  # it was used
    assert list(spill.iterdir()) == []  # and removed


def test_duplicates_command_and_clean_find_a_cropped_copy(tmp_path, caplog):
    folder = _collection(tmp_path)
    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0)
    r = runner.invoke(app, ["duplicates", str(folder), "-o", str(tmp_path / "d.csv"), "--weights", str(weights),
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert list(pd.read_csv(tmp_path / "d.csv")["path"]) == ["a.jpg", "a_crop.jpg"]
    from pipelines.data.duplicates import compared_paths

    every = {p.name for p in folder.iterdir()}
    assert compared_paths(tmp_path / "d.csv") == every  # beside the table: every photo it compared

    out = tmp_path / "clean"
    r = runner.invoke(app, ["clean", str(folder), "-o", str(out), "--weights", str(weights), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    results = pd.read_csv(out / "results.csv", keep_default_na=False)
    groups = dict(zip(results["path"], results["duplicate_group"]))
    assert groups["a.jpg"] == groups["a_crop.jpg"] != "" and all(groups[f"other{i}.jpg"] == "" for i in range(3))
    # `split --duplicates` reads the clean folder's own table, crops included
    assert list(read_duplicates(out)["path"]) == ["a.jpg", "a_crop.jpg"]
    assert compared_paths(out) == compared_paths(out / "duplicates.csv") == every  # the run's state
    # a clean folder is grouped again from its state: with the photos' folder, and without
    r = runner.invoke(app, ["duplicates", str(out), "-o", str(tmp_path / "d2.csv"), "--images", str(folder)])
    assert r.exit_code == 0 and list(pd.read_csv(tmp_path / "d2.csv")["path"]) == ["a.jpg", "a_crop.jpg"]
    r = runner.invoke(app, ["duplicates", str(out), "-o", str(tmp_path / "d3.csv")])
    assert r.exit_code == 0 and "no --images" in r.output
    # a wrong --images read nothing and fell back to the keys, exit 0, unsaid (an audit)
    r = runner.invoke(app, ["duplicates", str(out), "-o", str(tmp_path / "d4.csv"), "--images", str(weights)])
    assert r.exit_code == 2 and "holds none of the run's photos" in r.output, r.output
    partial = tmp_path / "partial"  # the crop moved away: its pair cannot be judged, and that is said
    partial.mkdir()
    for p in folder.iterdir():
        if p.name != "a_crop.jpg":
            (partial / p.name).write_bytes(p.read_bytes())
    with caplog.at_level("WARNING", logger="pipelines.data.duplicates"):
        r = runner.invoke(app, ["duplicates", str(out), "-o", str(tmp_path / "d4.csv"), "--images", str(partial)])
    assert r.exit_code == 0 and pd.read_csv(tmp_path / "d4.csv").empty
    assert "pairs not judged, a photo unreadable" in caplog.text
    # switched off, clean groups by the keys alone
    r = runner.invoke(app, ["clean", str(folder), "-o", str(tmp_path / "clean2"), "--weights", str(weights),
                            "--device", "cpu", "--no-pixel-check"])
    assert r.exit_code == 0, r.output
    assert pd.read_csv(tmp_path / "clean2" / "duplicates.csv").empty


def test_the_pixel_check_setting_reads_from_the_environment(monkeypatch):
    from service.settings import Settings

    assert Settings(auth_disabled=True).duplicate_pixel_check is True
    monkeypatch.setenv("CERVIXQC_DUPLICATE_PIXEL_CHECK", "false")
    assert Settings(auth_disabled=True).duplicate_pixel_check is False


def test_a_service_with_the_pixel_check_off_groups_its_jobs_by_the_keys_alone(tmp_path):
    """The setting reaches the job runner: a real uvicorn with CERVIXQC_DUPLICATE_PIXEL_CHECK=false
    leaves a cropped copy ungrouped that `clean` (pixel check on) groups."""
    import time

    from tests.service_server import start_server

    data = tmp_path / "data"
    data.mkdir()
    folder = _collection(data)
    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0)
    srv = start_server(tmp_path / "srv", weights, data_roots=data, duplicate_pixel_check="false")
    try:
        with srv.client() as c:
            job = c.post("/v1/jobs", json={"source": folder.name}).json()
            deadline = time.time() + 180
            while (job := c.get(f"/v1/jobs/{job['id']}").json())["status"] not in ("done", "failed"):
                assert time.time() < deadline, job
                time.sleep(0.2)
            assert job["status"] == "done", job
            rows = c.get(f"/v1/jobs/{job['id']}/results", params={"format": "jsonl"}).text.splitlines()
    finally:
        srv.kill()
    assert len(rows) == 5 and all('"duplicate_group":null' in r.replace(" ", "") for r in rows)


def test_duplicates_finds_a_copy_named_in_latin1_and_checks_its_options_before_reading(tmp_path):
    """A name that is not UTF-8 was opened under its escaped key, read as unreadable and left
    out of every group (clean found it); a wrong --images fell back to the keys unsaid; -o a
    folder failed after every photo was read."""
    import os

    from pipelines.clean.state import StateStore

    folder = _collection(tmp_path)
    with open(os.path.join(os.fsencode(folder), b"Pe\xf1a.jpg"), "wb") as f:
        f.write((folder / "a.jpg").read_bytes())
    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0)
    r = runner.invoke(app, ["duplicates", str(folder), "-o", str(tmp_path / "d.csv"), "--weights", str(weights),
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(tmp_path / "d.csv", keep_default_na=False)
    assert set(table["path"]) == {"a.jpg", "a_crop.jpg", "Pe\\xf1a.jpg"} and table["group"].nunique() == 1
    (tmp_path / "empty").mkdir()
    state = tmp_path / "clean"
    StateStore(state / "state.sqlite", source=folder).close()
    for args, message in (([str(tmp_path / "empty")], "no photos to compare"),
                          ([str(folder), "-o", str(tmp_path)], "is a folder"),
                          ([str(state), "--images", str(tmp_path / "d.csv")], "--images"),
                          ([str(state), "-o", str(state / "duplicates.csv")], "the run's own table")):
        r = runner.invoke(app, ["duplicates", *args, "--weights", str(weights), "--device", "cpu"])
        assert r.exit_code == 2 and message in r.output, (args, r.output)


def test_a_rerun_of_clean_takes_the_pixel_checks_verdicts_from_its_state_and_reads_only_new_photos(tmp_path, caplog):
    """Every rerun and resume decoded the whole collection again for the pixel check: 11 of a
    no-op rerun's 17 s on 2,000 photos, about 9 minutes at 10^5."""
    import logging
    import re

    from pipelines.clean.run import clean
    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline

    folder = _collection(tmp_path)
    qc = QCPipeline(tiny_weights(tmp_path / "w", detector_threshold=0.0), QCConfig(device="cpu"))
    out = tmp_path / "out"

    def run() -> tuple[str, str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipelines.data.duplicates"):
            clean(qc, folder, out)
        lines = [m for m in caplog.messages if m.startswith("pixel check:")]
        return (lines[0] if lines else ""), (out / "duplicates.csv").read_text()

    first, table = run()
    assert " 0 known from before" in first and " 0 photos read" not in first
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.csv")}
    again, table_again = run()  # nothing changed: the exports are kept, no pair is looked at
    assert again == "" and table_again == table and {p.name: p.stat().st_mtime_ns for p in out.glob("*.csv")} == written
    (out / "results.csv").unlink()  # the exports are made again where one is missing, from the kept verdicts
    again, table_again = run()
    assert " 0 checked, " in again and " 0 photos read" in again and table_again == table
    csv = out / "results.csv"  # re-saved by a spreadsheet: not the file the run wrote, made again
    csv.write_bytes(csv.read_bytes().replace(b"\n", b"\r\n"))
    again, _ = run()
    assert " 0 checked, " in again and b"\r\n" not in csv.read_bytes()
    (folder / "b_crop.jpg").write_bytes(jpeg_bytes(cropped_copy(textured_scene(11)), 60))  # other1's copy
    third, table3 = run()
    count = lambda line, what: int(re.search(rf"(\d+) {what}", line).group(1))  # noqa: E731
    # the pairs of the new photo (at most one with each of the 5 others) checked, the rest known
    assert count(third, "known from before") == count(first, "candidate pairs"), third
    assert 1 <= count(third, "checked") <= 5 and count(third, "candidate pairs") > count(first, "candidate pairs")
    groups = pd.read_csv(out / "duplicates.csv")
    assert set(groups["path"]) == {"a.jpg", "a_crop.jpg", "other1.jpg", "b_crop.jpg"}, table3


def test_stored_verdicts_are_taken_only_in_the_order_they_were_checked(tmp_path):
    """The check matches the second photo's keypoints to the first's, and at the cut a pair was
    a copy one way and not the other: a file renamed past its pair's must be checked again."""
    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline

    folder = _collection(tmp_path)
    names = sorted(p.name for p in folder.iterdir())
    records = QCPipeline(tiny_weights(tmp_path / "w", detector_threshold=0.0), QCConfig(device="cpu")).run(
        [folder / n for n in names], names=names)
    sha = {r.path: r.sha256 for r in records}

    from pipelines.clean.state import StateStore

    class Kept(StateStore):  # the clean run's own store (SQLite); what was asked and stored, seen
        def verdicts(self, pairs, setting):
            self.asked += pairs
            return super().verdicts(pairs, setting)

        @property
        def stored(self) -> dict:
            rows = self.db.execute("SELECT a, b, setting, copy FROM verdicts")
            return {((a, b), setting): bool(copy) for a, b, setting, copy in rows}

    kept = Kept(tmp_path / "state" / "state.sqlite")
    kept.asked = []
    read = lambda rel: (folder / rel.replace("z_", "")).read_bytes()  # noqa: E731
    keys = lambda rs, rename={}: ([rename.get(r.path, r.path) for r in rs], [r.sha256 for r in rs],  # noqa: E731
                                  [r.phash for r in rs], [r.crop_hash for r in rs], [r.embedding for r in rs])
    first = find_duplicates(*keys(records), read=read, verdicts=kept)
    assert list(first["path"]) == ["a.jpg", "a_crop.jpg"]
    assert kept.stored[((sha["a.jpg"], sha["a_crop.jpg"]), next(s for _, s in kept.stored))] is True
    # the original renamed after its copy: the pair comes in the other order and is checked again
    renamed = sorted(records, key=lambda r: {"a.jpg": "z_a.jpg"}.get(r.path, r.path))
    kept.asked.clear()
    again = find_duplicates(*keys(renamed, {"a.jpg": "z_a.jpg"}), read=read, verdicts=kept)
    assert (sha["a_crop.jpg"], sha["a.jpg"]) in kept.asked
    assert any(p == (sha["a_crop.jpg"], sha["a.jpg"]) for p, _ in kept.stored)  # checked, then stored
    assert sorted(again["path"]) == ["a_crop.jpg", "z_a.jpg"]


def test_a_clean_rerun_asks_again_the_pairs_a_photo_it_could_not_read_left_without_a_verdict(tmp_path, monkeypatch):
    """Kept as they were, the exports of a run whose pixel check could not read a photo (a
    share away for a moment) missed that photo's copies until some other change came."""
    from pipelines.clean.run import clean
    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline

    folder = _collection(tmp_path)
    qc = QCPipeline(tiny_weights(tmp_path / "w", detector_threshold=0.0), QCConfig(device="cpu"))
    read_bytes = Path.read_bytes

    def share_away(path):  # the engine has read it (its own open); the pixel check cannot
        if path.name == "a_crop.jpg":
            raise OSError(5, "Input/output error")
        return read_bytes(path)

    with monkeypatch.context() as m:
        m.setattr(Path, "read_bytes", share_away)
        clean(qc, folder, tmp_path / "out")
    assert pd.read_csv(tmp_path / "out" / "duplicates.csv").empty
    clean(qc, folder, tmp_path / "out")  # nothing new to label; the pair is asked again
    assert list(pd.read_csv(tmp_path / "out" / "duplicates.csv")["path"]) == ["a.jpg", "a_crop.jpg"]
