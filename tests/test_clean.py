"""Batch cleaning: one row per file, originals untouched, quarantine as links, and a run
killed with SIGKILL resumes to exactly the rows of an uninterrupted run."""

import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet
import pytest

from pipelines.clean.notes import NoteWatch, run_notes
from pipelines.clean.run import clean
from pipelines.engine.config import QCConfig
from pipelines.engine.qc import QCPipeline
from pipelines.engine.qc_result import Label, QCResult
from tests.qc_fixtures import fuzz_set, jpeg_bytes, textured_scene, tiny_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    # detector threshold 0: every readable photo gets a box and goes through stage 2, so the
    # rows compared below carry boxes, kinds and scores, not only no_cervix
    return tiny_weights(tmp_path_factory.mktemp("w"), detector_threshold=0.0)


@pytest.fixture()
def collection(tmp_path) -> Path:
    src = tmp_path / "collection"
    for i, (name, (data, _)) in enumerate(fuzz_set().items()):
        sub = src / ("clinic_a" if i % 2 else "clinic_b/2019")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / name).write_bytes(data)
    return src


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_clean_writes_one_row_per_file_and_never_touches_originals(weights, collection, tmp_path):
    before = _checksums(collection)
    out, quarantine = tmp_path / "out", tmp_path / "quarantine"
    summary = clean(QCPipeline(weights), collection, out, quarantine, batch_size=4)
    assert _checksums(collection) == before
    csv = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert sorted(csv["path"]) == sorted(before) and csv["path"].is_unique
    pq = pd.read_parquet(out / "results.parquet")
    assert list(pq["path"]) == list(csv["path"]) and list(pq["label"]) == list(csv["label"])
    # typed in Parquet: the box a list of floats, no box null (it was the CSV's "" text)
    assert [None if b is None else list(b) for b in pq["cervix_box"]] == [
        json.loads(b) if b else None for b in csv["cervix_box"]] and pq["cervix_box"].isna().any()
    row = csv[csv["path"].str.endswith("/random.jpg")].iloc[0]
    assert row["label"] == "unreadable" and "not an image" in row["error"]
    read = csv[csv["label"] != "unreadable"]
    assert all(w.isdigit() and h.isdigit() for w, h in zip(read["width"].astype(str), read["height"].astype(str)))
    boxed = csv[csv["cervix_box"] != ""]
    assert len(boxed) == len(read) > 0 and all(len(json.loads(b)) == 4 for b in boxed["cervix_box"])
    flagged = csv[csv["label"] != "regular"]
    for _, r in flagged.iterrows():
        q = quarantine / r["label"] / r["path"]
        assert q.is_file() and q.read_bytes() == (collection / r["path"]).read_bytes()
    assert summary.total == len(before) and sum(summary.by_label.values()) == len(before)
    again = clean(QCPipeline(weights), collection, out, quarantine, batch_size=4)
    assert again.processed_now == 0 and again.skipped_done == len(before)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_without_lost_or_duplicate_rows(weights, collection, tmp_path):
    ok_jpeg = fuzz_set()["ok.jpg"][0]
    (collection / "extra").mkdir()
    copies = 40  # batches of 2 enough that the kill (after 6 rows, 20 ms polls) lands mid-run; 120 cost 20 s more
    for i in range(copies):
        # bytes after the end-of-image marker: another file, the same readable photo
        (collection / "extra" / f"copy{i:03d}.jpg").write_bytes(ok_jpeg + i.to_bytes(2, "big"))
    before = _checksums(collection)
    reference = tmp_path / "reference"
    clean(QCPipeline(weights), collection, reference, batch_size=2)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipelines.cli", "clean", str(collection), "-o", str(out), "--weights", str(weights),
           "--batch-size", "2", "--quarantine", str(tmp_path / "q")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, rows = time.time() + 120, 0
    while time.time() < deadline and rows < 6:
        time.sleep(0.02)
        if (out / "state.sqlite").exists():
            try:
                rows = sqlite3.connect(out / "state.sqlite").execute("SELECT count(*) FROM results").fetchone()[0]
            except sqlite3.OperationalError:
                rows = 0
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < rows < len(before), "the kill must land mid-run"
    assert not (out / "results.csv").exists()

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "already done" in resumed.stdout
    # off a terminal (cron, a log file) the progress is plain lines, not one bar frame at the end
    said = [line for line in resumed.stderr.splitlines() if line.startswith("clean: ")]
    assert said and said[-2].startswith(f"clean: {len(before)}/{len(before)} files (100.0%), "), resumed.stderr[-2000:]
    # and what it does after the last file: the duplicate search and exports had no word (an audit)
    assert said[-1] == "clean: every file has its row; finding duplicates and writing the results files"
    got = pd.read_csv(out / "results.csv", keep_default_na=False)
    want = pd.read_csv(reference / "results.csv", keep_default_na=False)
    assert got["path"].is_unique and len(got) == len(before)
    cols = ["path", "sha256", "label", "kind", "cervix_box", "error"]
    assert (want["cervix_box"] != "").sum() > copies and (want["kind"] != "").any()
    pd.testing.assert_frame_equal(got[cols], want[cols])
    assert _checksums(collection) == before


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ray_engine_on_a_local_ray_gives_the_local_engines_rows(weights, collection, tmp_path):
    """Both sides use the device JPEG decoder (the GPU setting), so the actor must get it too.
    The manifest holds what failed the Ray job on every retry while the local engine gave
    rows (a dangling link, a FIFO), a name that is not UTF-8, and an absolute path, which Ray
    stored under another key than the local engine and processed again on every run."""
    pytest.importorskip("ray")
    from pipelines.clean.inputs import list_inputs
    from pipelines.clean.ray_run import QCActor, clean_ray

    (collection / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(collection / "pipe.jpg")
    with open(os.fsencode(collection) + b"/Pe\xf1a.jpg", "wb") as f:
        f.write(fuzz_set()["ok.jpg"][0])
    paths = list_inputs(collection)
    k = next(i for i, path in enumerate(paths) if path.startswith("clinic_a/"))
    paths[k] = str(collection / paths[k])
    pd.DataFrame({"path": paths}).to_csv(collection / "manifest.csv", index=False)
    manifest = collection / "manifest.csv"
    actor = QCActor(str(weights), str(collection), {"jpeg_decoder": "torchvision", "runtime": "torch", "device": "cpu"})
    assert (actor.qc.cfg.jpeg_decoder, actor.qc.runtime) == ("torchvision", "torch")  # runtime was dropped
    said_local: list[str] = []
    said_ray: list[str] = []
    local = clean(QCPipeline(weights, QCConfig(jpeg_decoder="torchvision")), manifest, tmp_path / "local",
                  batch_size=4, on_note=said_local.append)
    on_ray = clean_ray(weights, manifest, tmp_path / "ray", quarantine=tmp_path / "q", batch_size=4,
                       jpeg_decoder="torchvision", on_note=said_ray.append,
                       # Logical CPUs: the actor holds one, read tasks need another; with only
                       # the 2 physical cores Ray Data once starved the read task in CI.
                       num_cpus=4, object_store_memory=256 * 1024**2)
    assert on_ray.total == local.total and on_ray.by_label == local.by_label
    # 10 readable photos: too few for a note on either engine; each stored batch went through
    # their NoteWatch (the CLI's test shows a note said mid-run)
    assert said_ray == said_local == []
    a = pd.read_csv(tmp_path / "local" / "results.csv", keep_default_na=False)
    b = pd.read_csv(tmp_path / "ray" / "results.csv", keep_default_na=False)
    cols = ["path", "sha256", "label", "kind", "cervix_box", "error"]
    assert (a["cervix_box"] != "").any() and (a["kind"] != "").any()
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert paths[k] in set(b["path"]) and "Pe\\xf1a.jpg" in set(b["path"])
    assert (tmp_path / "q" / "unreadable" / "pipe.jpg").is_file() is False  # a FIFO is never copied
    assert (tmp_path / "q" / "unreadable").is_dir()
    assert json.loads((tmp_path / "ray" / "summary.json").read_text())["total"] == len(paths)
    # the local engine resumes Ray's folder under the same keys: only the dangling link, which
    # the OS could not read, and the photo replaced since (Ray's actors stamped every file) are
    # tried again
    replaced = next(p for p in paths if p.endswith("/random.jpg"))
    (collection / replaced).write_bytes(fuzz_set()["ok.jpg"][0])
    rerun = clean(QCPipeline(weights, QCConfig(jpeg_decoder="torchvision")), manifest, tmp_path / "ray", batch_size=4)
    assert (rerun.processed_now, rerun.skipped_done) == (2, len(paths) - 2)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ray_actors_that_cannot_start_their_engine_fail_the_run_naming_why(weights, collection, tmp_path):
    """A node without the GPU asked for (or the weights, or the memory): the actors die in
    their constructor, and the run ended in a 240-line traceback without an error line or a
    word of resuming (an audit)."""
    pytest.importorskip("ray")
    import torch

    from pipelines.clean.ray_run import EngineFailed, clean_ray

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA: the actors must fail to take the GPU")
    with pytest.raises(EngineFailed) as failed:
        clean_ray(weights, collection, tmp_path / "out", batch_size=4, device="cuda", num_cpus=4,
                  object_store_memory=256 * 1024**2)
    said = str(failed.value)
    assert said.startswith("the Ray actors failed (ValueError: device cuda: no CUDA device"), said
    assert "run the same command again to resume" in said and "\n" not in said and "\x1b" not in said


def test_one_file_that_kills_its_actor_is_searched_for_not_taken_for_the_actors_failing():
    """A Ray run of 600 files has blocks of 75 (one actor): one file that killed its actor lost
    its block, 75 > 64 files read as "the actors died on most blocks", exit 1, and the search
    one file per block, which gives that file its own unreadable row, never ran (an audit)."""
    from pipelines.clean.ray_run import actors_failed

    assert not actors_failed(75, 600, per_block=75)  # one block
    assert actors_failed(150, 600, per_block=75)  # two of eight blocks: the actors
    assert not actors_failed(64, 100, per_block=16) and actors_failed(65, 100, per_block=16)
    assert not actors_failed(512, 10**6, per_block=512) and actors_failed(100_001, 10**6, per_block=512)


def test_a_manifest_without_paths_or_with_a_blank_one_is_refused_naming_its_rows(weights, collection, tmp_path):
    from typer.testing import CliRunner

    from pipelines.clean.inputs import list_inputs
    from pipelines.cli import app

    (collection / "no_path.csv").write_text("file,kind\na.jpg,regular\n")
    (collection / "blank.csv").write_text("path,kind\nclinic_a/ok.jpg,regular\n,green\n  ,iodine\n")
    (collection / "dotted.csv").write_text("path\n./clinic_a/ok.jpg\nclinic_a/ok.jpg\nclinic_a//zero.jpg\n")
    with pytest.raises(ValueError, match="no 'path' column \\(it has: file, kind\\)"):
        list_inputs(collection / "no_path.csv")
    with pytest.raises(ValueError, match="empty path on row 3, 4 \\(the header is row 1\\)"):
        list_inputs(collection / "blank.csv")
    assert list_inputs(collection / "dotted.csv") == ["clinic_a/ok.jpg", "clinic_a/zero.jpg"]  # one file, one row
    (collection / "nul.csv").write_bytes(b"path\nclinic_a/ok.jpg\nclinic_a/a\x00b.jpg\n")  # failed the job at run time
    with pytest.raises(ValueError, match="a path with a NUL character on row 3"):
        list_inputs(collection / "nul.csv")
    # written on Windows: each was a missing file, unreadable and retryable for good
    (collection / "windows.csv").write_text("Path\nclinic_a\\ok.jpg\nclinic_a/ok.jpg\nC:\\clinic_a\\zero.jpg\n"
                                            "C:/clinic_a/zero.jpg\n")  # a drive letter with / too (an audit)
    with pytest.raises(ValueError, match="a Windows path \\(\\\\ or a drive letter\\) on row 2, 4, 5 \\(the header is "
                                         "row 1\\), such as 'clinic_a\\\\\\\\ok.jpg': no such file"):
        list_inputs(collection / "windows.csv")
    r = CliRunner().invoke(app, ["clean", str(collection / "blank.csv"), "-o", str(tmp_path / "out"),
                                 "--weights", str(weights)])
    assert r.exit_code != 0 and "empty path on row 3, 4" in r.output and not (tmp_path / "out").exists()
    # not one listed file there: the models loaded and wrote a "No such file" row for each, exit 1, and the
    # note blamed documents and DICOM files (an audit); a clean's results.csv given as SRC, the same
    (tmp_path / "moved.csv").write_text("path\nclinic_a/ok.jpg\nclinic_a/zero.jpg\n")
    with pytest.raises(ValueError, match="not one of its 2 listed files is there .* moved away from its photos"):
        list_inputs(tmp_path / "moved.csv")
    r = CliRunner().invoke(app, ["clean", str(collection), "-o", str(tmp_path / "c"), "--weights", str(weights)])
    assert r.exit_code in (0, 1), r.output
    r = CliRunner().invoke(app, ["clean", str(tmp_path / "c" / "results.csv"), "-o", str(tmp_path / "out"),
                                 "--weights", str(weights)])
    assert r.exit_code == 2 and "it is a results table of `cervixqc clean`" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_a_name_that_is_not_utf8_or_of_251_bytes_gets_its_row_and_quarantine_copy_and_resumes(weights, collection,
                                                                                              tmp_path):
    """Latin-1 names (an archive from an old Windows PC) crashed the run at that file, and
    every resume again; a quarantined name of 251 bytes failed on its temporary name."""
    ok = fuzz_set()["ok.jpg"][0]
    raw = os.fsencode(collection / "clinic_a")
    with open(raw + b"/Pe\xf1a.jpg", "wb") as f:
        f.write(ok)
    with open(raw + b"/broken\xe9.jpg", "wb") as f:
        f.write(b"not a photo")
    long_name = "p" * 247 + ".jpg"
    (collection / "clinic_a" / long_name).write_bytes(b"not a photo either")
    out, quarantine = tmp_path / "out", tmp_path / "q"
    summary = clean(QCPipeline(weights), collection, out, quarantine, batch_size=2)
    rows = pd.read_csv(out / "results.csv", keep_default_na=False).set_index("path")
    assert summary.total == len(rows) == sum(summary.by_label.values())
    assert rows.loc["clinic_a/Pe\\xf1a.jpg", "sha256"] == hashlib.sha256(ok).hexdigest()
    for name in ("clinic_a/broken\\xe9.jpg", f"clinic_a/{long_name}"):
        assert rows.loc[name, "label"] == "unreadable"
        assert (quarantine / "unreadable" / name).is_file()
    assert not list(quarantine.rglob("*.tmp"))
    again = clean(QCPipeline(weights), collection, out, quarantine, batch_size=2)
    assert (again.processed_now, again.skipped_done) == (0, summary.total)


def test_a_results_folder_takes_one_source_and_one_run_and_shows_only_files_still_there(weights, collection, tmp_path):
    from pipelines.clean.state import ResultsFolderError, StateStore

    out = tmp_path / "out"
    first = clean(QCPipeline(weights), collection, out, batch_size=4)
    other = tmp_path / "other"
    (other / "clinic_a").mkdir(parents=True)
    (other / "clinic_a" / "ok.jpg").write_bytes(b"another site's file under a path the first one has")
    with pytest.raises(ResultsFolderError, match="holds the results of another source"):
        clean(QCPipeline(weights), other, out, batch_size=4)
    holder = StateStore(out / "state.sqlite", source=collection)
    try:
        with pytest.raises(ResultsFolderError, match="another clean is writing"):
            clean(QCPipeline(weights), collection, out, batch_size=4)
        from typer.testing import CliRunner

        from pipelines.cli import app

        # said before any model loads (18.6 s on a busy host: an audit): weights never looked at
        r = CliRunner().invoke(app, ["clean", str(collection), "-o", str(out), "--weights", str(tmp_path / "none")])
        assert r.exit_code == 2 and "another clean is writing" in r.output, r.output
    finally:
        holder.close()
    gone = sorted(p for p in collection.rglob("*.jpg"))[0]
    gone.unlink()
    again = clean(QCPipeline(weights), collection, out, batch_size=4)
    rows = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert (again.total, again.processed_now, len(rows)) == (first.total - 1, 0, first.total - 1)
    assert gone.relative_to(collection).as_posix() not in set(rows["path"])
    assert json.loads((out / "summary.json").read_text())["total"] == first.total - 1


def test_a_results_folder_that_holds_no_row_is_taken_by_the_next_run_of_any_source_or_policy(
        weights, collection, tmp_path):
    """A run that stored nothing (Ray could not start at --address, a kill before the first
    batch) tied the folder to its source and policy: the next run was refused, told of results
    of another source, or of labels decided otherwise, that the folder did not hold (an audit)."""
    from pipelines.clean.state import StateStore

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    StateStore(out / "state.sqlite", source=elsewhere, decision={"policy": "resnest", "models": {}}).close()
    first = clean(QCPipeline(weights, QCConfig(policy="deep_sad")), collection, out, batch_size=8)
    assert first.processed_now == first.total > 0 and first.decision["policy"] == "deep_sad"
    store = StateStore(out / "state.sqlite")  # and now it is this source's, with its rows
    try:
        assert store.db.execute("SELECT value FROM meta WHERE key = 'source'").fetchone()[0] == str(
            collection.resolve())
    finally:
        store.close()


def test_duplicates_of_a_clean_folder_leaves_out_the_photos_its_last_run_no_longer_found(
        weights, collection, tmp_path):
    """`cervixqc duplicates OUT` read every stored row: a photo deleted from the source since
    stayed in its groups, and the group numbers no longer matched results.csv's (an audit)."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    photo = fuzz_set()["ok.jpg"][0]
    for name in ("a.jpg", "a_copy.jpg", "b.jpg", "b_copy.jpg"):  # two exact pairs, b's after a's
        (collection / name).write_bytes(photo if name.startswith("a") else jpeg_bytes(textured_scene(3)))
    out = tmp_path / "out"
    clean(QCPipeline(weights), collection, out, batch_size=8)
    (collection / "a_copy.jpg").unlink()
    clean(QCPipeline(weights), collection, out, batch_size=8)
    r = CliRunner().invoke(app, ["duplicates", str(out), "-o", str(tmp_path / "d.csv")])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(tmp_path / "d.csv", keep_default_na=False)
    assert "a_copy.jpg" not in set(table["path"])
    assert (tmp_path / "d.csv").read_bytes() == (out / "duplicates.csv").read_bytes()  # clean's own table


def test_a_results_folder_keeps_the_decision_its_rows_were_labelled_under(weights, collection, tmp_path):
    """A rerun with another policy counted every row as done: results.csv kept the old labels,
    and nothing in the folder said which policy made them."""
    from pipelines.clean.state import ResultsFolderError
    from pipelines.engine.findings import SCORES_VERSION, FindingsCard
    from pipelines.engine.qc_result import FINDINGS

    out = tmp_path / "out"
    first = clean(QCPipeline(weights, QCConfig(policy="deep_sad")), collection, out, batch_size=8)
    assert first.decision["policy"] == "deep_sad" and set(first.decision["models"]) == {
        "detector", "deep_sad", "classifier"}
    assert json.loads((out / "summary.json").read_text())["decision"] == first.decision
    with pytest.raises(ResultsFolderError, match="policy deep_sad -> resnest.*pass --policy deep_sad to continue it"):
        clean(QCPipeline(weights, QCConfig(policy="resnest")), collection, out, batch_size=8)
    again = clean(QCPipeline(weights, QCConfig(policy="deep_sad")), collection, out, batch_size=8)
    assert again.skipped_done == first.total
    # the same networks with a threshold chosen again (`cervixqc calibrate-stage2`): the old
    # labels were kept under the sha256s alone
    moved = tmp_path / "moved"
    shutil.copytree(weights, moved)
    card = json.loads((moved / "deep_sad.json").read_text())
    card["thresholds"]["distance"] += 0.5
    (moved / "deep_sad.json").write_text(json.dumps(card))
    with pytest.raises(ResultsFolderError, match=r"decided otherwise \(deep_sad threshold\)"):
        clean(QCPipeline(moved, QCConfig(policy="deep_sad")), collection, out, batch_size=8)
    # a folder a cervixqc filled before thresholds were recorded: the same sha256s and policy
    # are this decision (thresholds moved only with the models then), and its record is completed
    db = sqlite3.connect(out / "state.sqlite")
    with db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'decision'",
                   (json.dumps({k: first.decision[k] for k in ("policy", "models")}),))
    db.close()
    assert clean(QCPipeline(weights, QCConfig(policy="deep_sad")), collection, out,
                 batch_size=8).skipped_done == first.total
    assert json.loads((out / "summary.json").read_text())["decision"] == first.decision
    # ... but not under thresholds a site chose since: which ones labelled the rows is unknown
    card["metrics"]["site_calibration"] = {"threshold_before": card["thresholds"]["distance"] - 0.5}
    (moved / "deep_sad.json").write_text(json.dumps(card))
    db = sqlite3.connect(out / "state.sqlite")
    with db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'decision'",
                   (json.dumps({k: first.decision[k] for k in ("policy", "models")}),))
    db.close()
    with pytest.raises(ResultsFolderError, match=r"thresholds chosen at the site since \(deep_sad\)"):
        clean(QCPipeline(moved, QCConfig(policy="deep_sad")), collection, out, batch_size=8)
    # a findings card added (or calibrated again) since: the rows kept their old flags and the
    # quarantine by finding went by them (an audit)
    carded = tmp_path / "carded"
    shutil.copytree(weights, carded)
    (carded / "findings.json").write_text(FindingsCard(thresholds=dict.fromkeys(FINDINGS, 0.5),
                                                       scores_version=SCORES_VERSION).model_dump_json())
    db = sqlite3.connect(out / "state.sqlite")
    with db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'decision'", (json.dumps(first.decision),))
    db.close()
    with pytest.raises(ResultsFolderError, match=r"decided otherwise \(quality findings' card \(findings.json\)\)"):
        clean(QCPipeline(carded, QCConfig(policy="deep_sad")), collection, out, batch_size=8)
    # ... while a record made before the card was part of the decision is taken as this one's
    db = sqlite3.connect(out / "state.sqlite")
    with db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'decision'",
                   (json.dumps({k: v for k, v in first.decision.items() if k != "findings"}),))
    db.close()
    assert clean(QCPipeline(weights, QCConfig(policy="deep_sad")), collection, out,
                 batch_size=8).skipped_done == first.total
    assert json.loads((out / "summary.json").read_text())["decision"] == first.decision
    # a folder an older cervixqc filled records no decision: its rows were taken as this run's
    db = sqlite3.connect(out / "state.sqlite")
    with db:
        db.execute("DELETE FROM meta WHERE key = 'decision'")
    db.close()
    with pytest.raises(ResultsFolderError, match="labelled by an older cervixqc that did not record"):
        clean(QCPipeline(weights, QCConfig(policy="deep_sad")), collection, out, batch_size=8)


def test_rows_flagged_under_another_findings_card_are_not_resumed_as_if_judged_under_this_one(weights, collection,
                                                                                              tmp_path):
    """A run an older cervixqc (which recorded no findings card in its decision) stopped, resumed
    under weights without its card: its rows kept their old flags beside rows without any, and
    summary.json recorded no card (an audit, 48 of 300 rows)."""
    from pipelines.clean.state import ResultsFolderError
    from pipelines.engine.findings import SCORES_VERSION, FindingsCard
    from pipelines.engine.qc_result import FINDINGS

    carded = tmp_path / "carded"
    shutil.copytree(weights, carded)
    (carded / "findings.json").write_text(FindingsCard(thresholds=dict.fromkeys(FINDINGS, 0.5),
                                                       scores_version=SCORES_VERSION).model_dump_json())
    out = tmp_path / "out"
    first = clean(QCPipeline(carded, QCConfig(policy="deep_sad")), collection, out, batch_size=8)

    def as_recorded_before_findings() -> None:
        db = sqlite3.connect(out / "state.sqlite")
        with db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'decision'",
                       (json.dumps({k: v for k, v in first.decision.items() if k != "findings"}),))
        db.close()

    as_recorded_before_findings()
    with pytest.raises(ResultsFolderError, match=r"decided otherwise \(quality findings' card \(findings.json\)\)"):
        clean(QCPipeline(weights, QCConfig(policy="deep_sad")), collection, out, batch_size=8)
    other = tmp_path / "other"  # another card's thresholds: refused too
    shutil.copytree(carded, other)
    (other / "findings.json").write_text(FindingsCard(thresholds=dict.fromkeys(FINDINGS, 0.25),
                                                      scores_version=SCORES_VERSION).model_dump_json())
    with pytest.raises(ResultsFolderError, match="quality findings' card"):
        clean(QCPipeline(other, QCConfig(policy="deep_sad")), collection, out, batch_size=8)
    # under the card its rows were judged by: resumed, and its record completed
    assert clean(QCPipeline(carded, QCConfig(policy="deep_sad")), collection, out,
                 batch_size=8).skipped_done == first.total
    assert json.loads((out / "summary.json").read_text())["decision"] == first.decision


def test_a_results_folder_written_by_a_newer_cervixqc_is_refused_and_left_as_it_was(tmp_path):
    """An older version failed its first insert into a newer state's table, mid-run."""
    from pipelines.clean.state import STATE_FORMAT, ResultsFolderError, StateStore

    src = tmp_path / "src"
    src.mkdir()
    store = StateStore(tmp_path / "out" / "state.sqlite", source=src)
    store.close()
    db = sqlite3.connect(tmp_path / "out" / "state.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == STATE_FORMAT
    with db:
        db.execute(f"PRAGMA user_version = {STATE_FORMAT + 1}")
        db.execute("ALTER TABLE results ADD COLUMN newer TEXT")
    db.close()
    with pytest.raises(ResultsFolderError, match=f"newer cervixqc \\(state format {STATE_FORMAT + 1}"):
        StateStore(tmp_path / "out" / "state.sqlite", source=src)
    db = sqlite3.connect(tmp_path / "out" / "state.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == STATE_FORMAT + 1
    db.close()
    with open(tmp_path / "out" / ".lock", "a") as lock:  # released with the refusal
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    from pipelines.data.duplicates import read_clean_state  # `cervixqc duplicates`/`split` read it too

    with pytest.raises(ValueError, match="newer cervixqc"):
        read_clean_state(tmp_path / "out")


def test_results_or_quarantine_inside_the_source_or_unwritable_are_refused_before_any_model_loads(weights, collection,
                                                                                                  tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    before = _checksums(collection)
    not_a_folder = tmp_path / "plain-file"
    not_a_folder.write_text("")
    (tmp_path / "q1").mkdir()
    (tmp_path / "q1" / ".cervixqc-source").write_text("/elsewhere")  # another run's quarantine
    inside = "is inside the source folder"
    for extra, messages in ((["-o", str(collection)], ("--out", inside)),
                            (["-o", str(tmp_path / "out"), "--quarantine", str(collection / "q")], ("--quarantine", inside)),
                            (["-o", str(tmp_path / "out"), "--quarantine", str(not_a_folder / "q")],
                             ("--quarantine", "plain-file is a file, so no folder can be made under it")),
                            (["-o", str(tmp_path / "out"), "--batch-size", "0"], ("--batch-size",)),
                            # both accepted (an audit)
                            (["-o", str(tmp_path / "out"), "--quarantine", str(tmp_path / "out")],
                             ("is the results folder",)),
                            (["-o", str(tmp_path / "q1")], ("is a quarantine (it holds .cervixqc-source)",))):
        r = CliRunner().invoke(app, ["clean", str(collection), "--weights", str(weights), *extra])
        assert r.exit_code != 0 and all(m in r.output for m in messages), (extra, r.output)
    assert _checksums(collection) == before
    assert not (tmp_path / "out").exists()  # nothing left made by a refusal (an empty -o was)
    r = CliRunner().invoke(app, ["clean", str(collection), "--weights", str(tmp_path / "no-weights"),
                                 "-o", str(tmp_path / "new" / "out"), "--quarantine", str(tmp_path / "newq" / "q")])
    assert r.exit_code == 2 and "no weights in" in r.output, r.output
    assert not (tmp_path / "new").exists() and not (tmp_path / "newq").exists()


def test_a_file_that_could_not_be_read_is_tried_again_by_the_next_run(weights, collection, tmp_path):
    """A manifest row whose file arrives later: `unreadable` (cannot read file) once, then its
    real row; a file that was read but is no image is not read again."""
    from pipelines.clean.inputs import list_inputs

    ok = fuzz_set()["ok.jpg"][0]
    not_an_image = next(p for p in list_inputs(collection) if p.endswith("/random.jpg"))
    (collection / "late.csv").write_text(f"path\nlater/photo.jpg\n{not_an_image}\n")
    out = tmp_path / "out"
    first = clean(QCPipeline(weights), collection / "late.csv", out)
    rows = pd.read_csv(out / "results.csv", keep_default_na=False).set_index("path")
    assert rows.loc["later/photo.jpg", "label"] == "unreadable" and "cannot read file" in rows.loc["later/photo.jpg", "error"]
    (collection / "later").mkdir()
    (collection / "later" / "photo.jpg").write_bytes(ok)
    again = clean(QCPipeline(weights), collection / "late.csv", out)
    assert (first.processed_now, again.processed_now, again.skipped_done) == (2, 1, 1)
    rows = pd.read_csv(out / "results.csv", keep_default_na=False).set_index("path")
    assert rows.loc["later/photo.jpg", "label"] != "unreadable" and len(rows) == 2


def test_a_photo_replaced_under_its_name_is_labelled_again_and_its_old_quarantine_copy_goes(weights, collection,
                                                                                                 tmp_path):
    """An archive re-exported over itself: the old label was kept for good, and the quarantine
    held the old photo. Rows written before stamps were kept (an upgrade) stay done."""
    from pipelines.clean.inputs import list_inputs

    out, quarantine = tmp_path / "out", tmp_path / "quarantine"
    clean(QCPipeline(weights), collection, out, quarantine, batch_size=4)
    replaced = next(p for p in list_inputs(collection) if p.endswith("/random.jpg"))
    assert (quarantine / "unreadable" / replaced).is_file()
    (collection / replaced).write_bytes(fuzz_set()["ok.jpg"][0])
    again = clean(QCPipeline(weights), collection, out, quarantine, batch_size=4)
    assert (again.processed_now, again.skipped_done) == (1, again.total - 1)
    row = pd.read_csv(out / "results.csv", keep_default_na=False).set_index("path").loc[replaced]
    assert row["label"] != "unreadable"
    assert row["sha256"] == hashlib.sha256(fuzz_set()["ok.jpg"][0]).hexdigest()
    assert not (quarantine / "unreadable" / replaced).exists()
    copy = quarantine / row["label"] / replaced
    assert copy.is_file() == (row["label"] != "regular")
    # touched again, same bytes: a new modification time is a change too (nothing is read to tell)
    os.utime(collection / replaced, ns=(1, 1))
    assert clean(QCPipeline(weights), collection, out, quarantine, batch_size=4).processed_now == 1
    assert copy.is_file() == (row["label"] != "regular")
    # a folder written before stamps were kept: its rows are not taken as changed
    with sqlite3.connect(out / "state.sqlite") as db:
        db.execute("UPDATE results SET stamp = NULL")
    db.close()
    os.utime(collection / replaced, ns=(2, 2))
    assert clean(QCPipeline(weights), collection, out, quarantine, batch_size=4).processed_now == 0


def test_a_listed_photo_away_for_a_rerun_keeps_its_row_and_its_quarantine_copy(weights, collection, tmp_path):
    """A manifest's photo on a share that is away when the run is repeated is not a changed
    photo: taken as one, its row became `unreadable` and its only quarantine copy was dropped
    (a mutation of the check passed every test)."""
    from pipelines.clean.inputs import list_inputs

    paths = list_inputs(collection)
    pd.DataFrame({"path": paths}).to_csv(tmp_path / "list.csv", index=False)
    for p in paths:  # the manifest's folder is its root: the photos beside it
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(collection / p, tmp_path / p)
    out, quarantine = tmp_path / "out", tmp_path / "quarantine"
    first = clean(QCPipeline(weights), tmp_path / "list.csv", out, quarantine, batch_size=4)
    away = next(p for p in paths if p.endswith("/random.jpg"))
    before = pd.read_csv(out / "results.csv", keep_default_na=False).set_index("path").loc[away]
    copy = quarantine / before["label"] / away
    assert before["label"] != "regular" and copy.is_file()
    (tmp_path / away).rename(tmp_path / "away.jpg")
    again = clean(QCPipeline(weights), tmp_path / "list.csv", out, quarantine, batch_size=4)
    assert (again.processed_now, again.skipped_done) == (0, first.total)
    after = pd.read_csv(out / "results.csv", keep_default_na=False).set_index("path").loc[away]
    assert (after["label"], after["sha256"]) == (before["label"], before["sha256"]) and copy.is_file()


def test_a_photo_replaced_while_a_run_had_no_quarantine_loses_its_old_copy_there_too(weights, collection, tmp_path,
                                                                                        caplog):
    """The old copy was dropped only from the quarantine of the run that relabelled the photo:
    relabelled by a run without one, the old photo's copy stayed for good, and the next run
    with the quarantine counted the new photo as not copied (an audit)."""
    from pipelines.clean.inputs import list_inputs

    out, quarantine = tmp_path / "out", tmp_path / "quarantine"
    clean(QCPipeline(weights), collection, out, quarantine, batch_size=4)
    replaced = next(p for p in list_inputs(collection) if p.endswith("/random.jpg"))
    (collection / replaced).write_bytes(fuzz_set()["ok.jpg"][0])
    assert clean(QCPipeline(weights), collection, out, batch_size=4).processed_now == 1  # no quarantine
    assert not (quarantine / "unreadable" / replaced).exists()
    with caplog.at_level("WARNING", logger="pipelines.clean.quarantine"):
        clean(QCPipeline(weights), collection, out, quarantine, batch_size=4)
    assert "could not be copied" not in caplog.text
    label = pd.read_csv(out / "results.csv", keep_default_na=False).set_index("path").loc[replaced, "label"]
    assert (quarantine / label / replaced).is_file() == (label != "regular")
    assert (label == "regular" or (quarantine / label / replaced).read_bytes() == fuzz_set()["ok.jpg"][0])


def test_a_changed_photos_old_copy_goes_but_a_copy_another_row_holds_under_that_name_stays(tmp_path):
    """Two sources sharing one quarantine (or `A.JPG` and `a.jpg` on exFAT): B's photo replaced
    since its row removed A's copy, which held the name."""
    import shutil

    from pipelines.clean.quarantine import drop_stale_copies
    from pipelines.clean.state import Stale, file_stamp

    src, q = tmp_path / "src", tmp_path / "q"
    src.mkdir()
    (src / "x.jpg").write_bytes(b"old photo")
    stamp = file_stamp(src / "x.jpg")
    (q / "no_cervix").mkdir(parents=True)
    shutil.copy2(src / "x.jpg", q / "no_cervix" / "x.jpg")  # this row's copy: the size and time it was read under
    (q / "blur").mkdir()
    (q / "blur" / "x.jpg").write_bytes(b"another source's photo")  # a copy another row holds
    os.utime(q / "blur" / "x.jpg", ns=(5, 5))
    (src / "x.jpg").write_bytes(b"the new photo, replaced")
    old = QCResult(path="x.jpg", label=Label.NO_CERVIX,
                   findings={"blur": {"score": 1.0, "threshold": 0.5, "flagged": True}})
    assert old.flags() == ["blur"]
    drop_stale_copies(src, q, [Stale(old, stamp)])
    assert not (q / "no_cervix" / "x.jpg").exists() and (q / "blur" / "x.jpg").read_bytes() == b"another source's photo"


def test_a_photo_changed_after_it_was_read_is_not_copied_as_the_photo_judged_and_its_cut_copy_goes(tmp_path):
    """A photo cut short (or replaced) between the engine's read and its batch's copies went into
    the quarantine as the photo labelled; put back whole, it was labelled again and the cut copy,
    neither the same file nor of the stamp it was read under, stayed for good (an audit)."""
    import hashlib

    from pipelines.clean.quarantine import ChangedSinceRead, drop_stale_copies, quarantine_copy, quarantine_results
    from pipelines.clean.state import Stale, file_stamp

    src, q = tmp_path / "src", tmp_path / "q"
    src.mkdir()
    whole = jpeg_bytes(textured_scene(3))
    (src / "x.jpg").write_bytes(whole)
    judged = QCResult(path="x.jpg", label=Label.NO_CERVIX, sha256=hashlib.sha256(whole).hexdigest())
    (src / "x.jpg").write_bytes(whole[: len(whole) // 2])  # cut short after the read
    for link in (True, False):
        with pytest.raises(ChangedSinceRead):
            quarantine_copy(src, "x.jpg", "no_cervix", q, link=link, sha256=judged.sha256)
    assert quarantine_results(src, [judged], q) == 1  # counted as not copied, as any file it could not copy
    assert not (q / "no_cervix").exists() or not any((q / "no_cervix").iterdir())  # nor a temporary file
    # read cut short: its row judged the cut bytes, and the copy is of them; then put back whole
    cut = whole[: len(whole) // 2]
    judged_cut = QCResult(path="x.jpg", label=Label.UNREADABLE, sha256=hashlib.sha256(cut).hexdigest())
    stamp = file_stamp(src / "x.jpg")
    quarantine_copy(src, "x.jpg", "unreadable", q, link=False, sha256=judged_cut.sha256)
    os.utime(q / "unreadable" / "x.jpg", ns=(7, 7))  # a copy whose time is not the stamp's
    (src / "x.jpg").unlink()
    (src / "x.jpg").write_bytes(whole)
    drop_stale_copies(src, q, [Stale(judged_cut, stamp + "-other")])  # neither its inode nor its stamp
    assert not (q / "unreadable" / "x.jpg").exists()


def test_copies_of_a_batch_killed_before_its_rows_were_stored_go_when_the_next_run_opens(weights, tmp_path):
    """A SIGKILL between a batch's copies and its rows' storing left copies no row owned: the
    photo, changed, was labelled again and the old one stayed under its old label (or, flagged
    again, was never copied: its name held, a warning at every run; an audit)."""
    import hashlib

    from pipelines.clean.quarantine import quarantine_results
    from pipelines.clean.run import open_run
    from pipelines.engine.qc import QCPipeline

    src, out, q = tmp_path / "src", tmp_path / "out", tmp_path / "q"
    src.mkdir()
    old = jpeg_bytes(textured_scene(5))
    (src / "x.jpg").write_bytes(old)
    qc = QCPipeline(weights)
    killed = [QCResult(path="x.jpg", label=Label.NO_CERVIX, sha256=hashlib.sha256(old).hexdigest(),
                       findings={"blur": {"score": 1.0, "threshold": 0.5, "flagged": True}})]
    store = open_run(src, out, q, qc.decision)
    store.copies_pending(killed, q)
    assert quarantine_results(src, killed, q, findings=["blur"]) == 0
    assert {p.relative_to(q).parts[0] for p in q.rglob("*.jpg")} == {"no_cervix", "blur"}
    store.close()  # killed here: no row stored
    (src / "x.jpg").unlink()
    new = jpeg_bytes(textured_scene(6))
    (src / "x.jpg").write_bytes(new)  # changed before the rerun
    summary = clean(qc, src, out, q)
    assert summary.quarantine_not_copied == 0
    label = pd.read_csv(out / "results.csv")["label"].item()
    copies = {p.relative_to(q).parts[0]: p.read_bytes() for p in q.rglob("*.jpg")}
    assert copies == ({label: new} if label != "regular" else {}), (label, list(copies))


def test_exports_streamed_in_chunks_are_the_files_of_one_chunk_with_fixed_parquet_types(weights, collection, tmp_path,
                                                                                        monkeypatch):
    """Built as one table (and two copies), the exports held 3-3.7 KB a row at once: about
    3.5 GB at the end of a 10^6-photo run. A column without a value was typed null in Parquet."""
    import pipelines.clean.exports as clean_module

    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    clean(QCPipeline(weights), collection, whole, batch_size=8)
    monkeypatch.setattr(clean_module, "EXPORT_CHUNK", 3)
    clean(QCPipeline(weights), collection, chunked, batch_size=8)
    assert (chunked / "results.csv").read_bytes() == (whole / "results.csv").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(chunked / "results.parquet"), pd.read_parquet(whole / "results.parquet"))
    schema = pyarrow.parquet.read_schema(whole / "results.parquet")
    assert str(schema.field("duplicate_group").type) == "int64" and str(schema.field("error").type) == "string"
    assert str(schema.field("cervix_box").type) == "list<element: double>"
    assert pd.read_parquet(whole / "results.parquet")["width"].dtype == "Int64"
    none = tmp_path / "none"  # a run of photos without an error or a duplicate: the same types
    (none / "a").mkdir(parents=True)
    (none / "a" / "one.jpg").write_bytes((collection / "clinic_a").glob("*.jpg").__next__().read_bytes())
    clean(QCPipeline(weights), none / "a", none / "out", batch_size=8)
    assert pyarrow.parquet.read_schema(none / "out" / "results.parquet").types == schema.types


def test_exports_fail_together_so_results_csv_and_parquet_never_disagree(weights, collection, tmp_path, monkeypatch):
    out = tmp_path / "out"
    clean(QCPipeline(weights), collection, out, batch_size=8)
    before = (out / "results.csv").read_bytes()
    sorted(collection.rglob("*.jpg"))[0].unlink()  # the next export has one row fewer

    def disk_full(*args, **kwargs):  # the Parquet write fails, as on a full disk
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(pyarrow.parquet.ParquetWriter, "write_table", disk_full)
        with pytest.raises(OSError):
            clean(QCPipeline(weights), collection, out, batch_size=8)
    assert (out / "results.csv").read_bytes() == before and not list(out.glob(".*.tmp"))
    clean(QCPipeline(weights), collection, out, batch_size=8)
    assert len(pd.read_csv(out / "results.csv")) == len(pd.read_parquet(out / "results.parquet")) == len(
        pd.read_csv(io.BytesIO(before))) - 1


def test_a_full_quarantine_stops_the_run_before_its_batch_is_stored_and_the_next_run_copies_it(
        weights, collection, tmp_path, monkeypatch):
    """Copies that failed for want of space were counted in a warning and their rows stored:
    the run said done, a rerun skipped them, and flagged photos stayed in the collection."""
    import shutil

    from pipelines.clean.quarantine import QuarantineUnwritable

    out, q = tmp_path / "out", tmp_path / "q"
    real_copy = shutil.copyfile

    def disk_full(src, dst, *a, **kw):  # the quarantine's disk, full after its first copy
        if any(p.parent != q for p in q.rglob("*.*")):  # a copy (the source's marker lies at the top)
            raise OSError(28, "No space left on device", str(dst))
        return real_copy(src, dst, *a, **kw)

    def other_disk(src, dst, *a, **kw):
        raise OSError(18, "Invalid cross-device link")

    with monkeypatch.context() as m:
        m.setattr(os, "link", other_disk)  # a quarantine on another disk: copies, not links
        m.setattr(shutil, "copyfile", disk_full)
        with pytest.raises(QuarantineUnwritable, match="this batch was not stored"):
            clean(QCPipeline(weights), collection, out, q, batch_size=4)
    with sqlite3.connect(out / "state.sqlite") as db:
        stored = db.execute("SELECT count(*) FROM results").fetchone()[0]
    assert stored < len(list(collection.rglob("*.*")))  # the failed batch is not among them
    summary = clean(QCPipeline(weights), collection, out, q, batch_size=4)
    rows = pd.read_csv(out / "results.csv")
    flagged = rows[rows["label"] != "regular"]
    copies = {str(p.relative_to(q)).split("/", 1)[1] for p in q.rglob("*") if p.is_file() and p.parent != q}
    assert summary.skipped_done == stored and set(flagged["path"]) <= copies and len(flagged) > 1


def test_a_quarantine_holds_one_sources_copies_and_another_source_is_refused_before_any_work(tmp_path):
    """Two clinics' field/IMG_0001.jpg met in one quarantine: the second's copy was skipped with
    a warning, the run said done, and the flagged photo stayed among those kept (an audit)."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0, presence_threshold=1.0)  # all no_cervix
    for site, seed in (("clinic_a", 0), ("clinic_b", 1)):
        (tmp_path / site / "field").mkdir(parents=True)
        (tmp_path / site / "field" / "IMG_0001.jpg").write_bytes(jpeg_bytes(textured_scene(seed)))
    q = tmp_path / "quarantine"

    def run(site: str, out: str, *extra: str):
        return CliRunner().invoke(app, ["clean", str(tmp_path / site), "-o", str(tmp_path / out), "--quarantine",
                                        str(q), "--weights", str(weights), "--runtime", "torch", *extra])

    r = run("clinic_a", "out_a")
    assert r.exit_code == 0 and (q / "no_cervix" / "field" / "IMG_0001.jpg").is_file(), r.output
    r = run("clinic_b", "out_b")
    assert r.exit_code == 2, r.output
    assert f"--quarantine {q} holds the copies of another source ({tmp_path / 'clinic_a'})" in r.output
    assert not (tmp_path / "out_b").exists()
    pd.DataFrame({"path": ["field/IMG_0001.jpg"]}).to_csv(tmp_path / "clinic_a" / "list.csv", index=False)
    r = CliRunner().invoke(app, ["clean", str(tmp_path / "clinic_a" / "list.csv"), "-o", str(tmp_path / "out_c"),
                                 "--quarantine", str(q), "--weights", str(weights), "--runtime", "torch"])
    assert r.exit_code == 0, r.output  # a manifest in clinic_a's folder names clinic_a's files: the same source


def test_the_quarantine_is_claimed_in_one_step_and_a_second_sources_claim_is_a_refusal(tmp_path):
    """Two sources' runs started together both passed check_outputs before either wrote the
    marker; the second's replaced the first's, or, when it lost, its refusal came after the
    models had loaded as a traceback, exit 1 (an audit). The claim now links a whole file
    into place, and losing it is OutputsRefused, which `clean` answers with exit 2."""
    from pipelines.clean.quarantine import QUARANTINE_SOURCE
    from pipelines.clean.run import OutputsRefused, claim_quarantine

    q, a, b = tmp_path / "q", tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    claim_quarantine(q, a)
    claim_quarantine(q, a)  # its own: taken again
    with pytest.raises(OutputsRefused, match=f"holds the copies of another source \\({a}\\)"):
        claim_quarantine(q, b)
    assert (q / QUARANTINE_SOURCE).read_text().strip() == str(a)
    assert [p.name for p in q.iterdir()] == [QUARANTINE_SOURCE]  # no claim file left behind


def test_a_flagged_photo_the_quarantine_could_not_take_is_said_and_copied_by_the_next_run(tmp_path):
    """Another file under its name in the quarantine: a log line alone, exit 0, nothing in the
    summary, and a rerun never tried again (an audit)."""
    import json

    from typer.testing import CliRunner

    from pipelines.cli import app

    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0, presence_threshold=1.0)  # all no_cervix
    (tmp_path / "site").mkdir()
    for i in range(2):
        (tmp_path / "site" / f"{i}.jpg").write_bytes(jpeg_bytes(textured_scene(i)))
    q = tmp_path / "q"
    (q / "no_cervix").mkdir(parents=True)
    (q / "no_cervix" / "0.jpg").write_bytes(b"someone else's file")

    def run():
        r = CliRunner().invoke(app, ["clean", str(tmp_path / "site"), "-o", str(tmp_path / "out"), "--quarantine",
                                     str(q), "--weights", str(weights), "--runtime", "torch"])
        assert r.exit_code == 0, r.output
        return r, json.loads((tmp_path / "out" / "summary.json").read_text())["quarantine_not_copied"]

    r, missed = run()
    assert missed == 1 and "warning: 1 flagged files could not be copied into the quarantine" in r.output, r.output
    assert (q / "no_cervix" / "0.jpg").read_bytes() == b"someone else's file"  # left as it was
    assert run()[1] == 1  # still in the way: said again
    (q / "no_cervix" / "0.jpg").unlink()
    r, missed = run()
    assert missed == 0 and "could not be copied" not in r.output
    assert (q / "no_cervix" / "0.jpg").read_bytes() == (tmp_path / "site" / "0.jpg").read_bytes()


def test_a_quarantine_replaced_by_a_file_stops_the_batch_not_counted_as_the_files_faults(tmp_path):
    """A quarantine that was no longer a folder failed every copy with ENOTDIR, counted as the
    files' own faults: the job ended `done` with its flagged photos left in place."""
    from pipelines.clean.quarantine import QuarantineUnwritable, quarantine_results

    src, q = tmp_path / "src", tmp_path / "q"
    src.mkdir()
    (src / "a.jpg").write_bytes(fuzz_set()["ok.jpg"][0])
    q.write_text("a file where the quarantine was")
    flagged = QCResult(path="a.jpg", label=Label.NO_CERVIX)
    with pytest.raises(QuarantineUnwritable):
        quarantine_results(src, [flagged], q)
    q.unlink()
    q.mkdir()
    (q / "no_cervix").write_text("a file where the label's folder was")
    with pytest.raises(QuarantineUnwritable):
        quarantine_results(src, [flagged], q)
    (q / "no_cervix").unlink()
    assert quarantine_results(src, [flagged], q) == 0 and (q / "no_cervix" / "a.jpg").is_file()


def test_an_original_that_fails_mid_copy_is_its_own_fault_not_the_quarantines(tmp_path, monkeypatch):
    """sendfile's error names the original and the copy: an original's bad sector (EIO) read as
    the quarantine's fault, its batch was not stored, and every resume stopped there (an audit).
    A share that drops the quarantine mid-copy is still the quarantine's fault."""
    import errno as errnos

    from pipelines.clean.quarantine import QuarantineUnwritable, quarantine_results

    src, q = tmp_path / "src", tmp_path / "q"
    src.mkdir()
    for name in ("bad.jpg", "ok.jpg", "dropped.jpg"):
        (src / name).write_bytes(bytes(range(256)) * 40)
    real_sendfile = os.sendfile

    def failing(out_fd, in_fd, offset, count):  # after the first 1,000 bytes of two of the photos
        name = os.path.basename(os.path.realpath(f"/proc/self/fd/{in_fd}"))
        if offset >= 1000 and name == "bad.jpg":  # the disk under the original
            raise OSError(errnos.EIO, "Input/output error")
        if offset >= 1000 and name == "dropped.jpg":  # the quarantine's share, gone
            shutil.rmtree(q)
            raise OSError(errnos.EIO, "Input/output error")
        return real_sendfile(out_fd, in_fd, offset, min(count, 1000))

    monkeypatch.setattr(os, "sendfile", failing)
    flagged = [QCResult(path=p, label=Label.NO_CERVIX) for p in ("bad.jpg", "ok.jpg")]
    assert quarantine_results(src, flagged, q, link=False) == 1  # counted as the file's, the batch stored
    assert sorted(p.name for p in (q / "no_cervix").iterdir()) == ["ok.jpg"]
    with pytest.raises(QuarantineUnwritable, match="this batch was not stored"):
        quarantine_results(src, [QCResult(path="dropped.jpg", label=Label.NO_CERVIX)], q, link=False)


def test_two_manifest_paths_that_would_share_a_quarantine_name_are_refused_before_any_work(weights, tmp_path):
    """`/abs/p.jpg` and `abs/p.jpg`, or `../x/a.jpg` and `__/x/a.jpg`, map to one quarantine
    name: the second flagged photo was never copied, counted in a warning, exit 0 (an audit)."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    (tmp_path / "m" / "abs").mkdir(parents=True)
    (tmp_path / "m" / "__" / "x").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    for p in (tmp_path / "m" / "abs" / "p.jpg", tmp_path / "x" / "a.jpg", tmp_path / "m" / "__" / "x" / "a.jpg"):
        p.write_bytes(fuzz_set()["ok.jpg"][0])
    absolute = str(tmp_path / "m" / "abs" / "p.jpg")
    for rows, said in (([absolute, absolute.removeprefix("/")], "would have one name in the quarantine"),
                       (["../x/a.jpg", "__/x/a.jpg"], "would have one name")):  # paths from the manifest's folder
        pd.DataFrame({"path": rows}).to_csv(tmp_path / "m" / "list.csv", index=False)
        r = CliRunner().invoke(app, ["clean", str(tmp_path / "m" / "list.csv"), "-o", str(tmp_path / "out"),
                                     "--quarantine", str(tmp_path / "q"), "--weights", str(weights)])
        assert r.exit_code == 2 and said in r.output, r.output
        assert not (tmp_path / "out").exists() and not (tmp_path / "q").exists()
    r = CliRunner().invoke(app, ["clean", str(tmp_path / "m" / "list.csv"), "-o", str(tmp_path / "out"),
                                 "--weights", str(weights), "--runtime", "torch"])
    assert r.exit_code == 0, r.output  # without a quarantine nothing is named twice


def test_links_to_folders_are_not_followed_but_counted_in_a_warning(collection, caplog):
    from pipelines.clean.inputs import list_inputs

    before = list_inputs(collection)
    (collection / "clinic_a" / "loop").symlink_to(collection)
    (collection / "elsewhere").symlink_to(collection.parent)
    with caplog.at_level("WARNING", logger="pipelines.clean.inputs"):
        assert list_inputs(collection) == before
    assert "2 links to folders not followed" in caplog.text and "clinic_a" not in caplog.text


def test_results_csv_never_hands_a_spreadsheet_a_formula_and_parquet_keeps_the_name(weights, collection, tmp_path):
    name = '=HYPERLINK("evil","y").jpg'
    (collection / name).write_bytes(b"not a photo")
    clean(QCPipeline(weights), collection, tmp_path / "out", batch_size=8)
    csv_paths = set(pd.read_csv(tmp_path / "out" / "results.csv", keep_default_na=False)["path"])
    assert "'" + name in csv_paths and name not in csv_paths
    assert name in set(pd.read_parquet(tmp_path / "out" / "results.parquet")["path"])


def test_a_manifest_naming_one_file_three_ways_lists_it_once_under_its_first_spelling(tmp_path):
    """`a.jpg`, `sub/../a.jpg` and its absolute path were three rows: the file was read, stored
    and counted three times."""
    from pipelines.clean.inputs import list_inputs

    (tmp_path / "sub").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "m.csv").write_text(f"path\nsub/../a.jpg\nb.jpg\n./a.jpg\n{tmp_path / 'a.jpg'}\n")
    assert list_inputs(tmp_path / "m.csv") == ["b.jpg", "sub/../a.jpg"]


def test_a_linked_photo_is_quarantined_as_the_photo_not_as_the_link(tmp_path):
    """The quarantine's hard link was made to the symlink itself: a relative link's entry
    dangled, an absolute one's led back to the original."""
    from pipelines.clean.quarantine import quarantine_copy

    (tmp_path / "master").mkdir()
    (tmp_path / "master" / "x.jpg").write_bytes(b"the photo")
    (tmp_path / "src" / "case1").mkdir(parents=True)
    (tmp_path / "src" / "case1" / "rel.jpg").symlink_to("../../master/x.jpg")
    (tmp_path / "src" / "abs.jpg").symlink_to(tmp_path / "master" / "x.jpg")
    for rel in ("case1/rel.jpg", "abs.jpg"):
        quarantine_copy(tmp_path / "src", rel, "unreadable", tmp_path / "q")
        entry = tmp_path / "q" / "unreadable" / rel
        assert not entry.is_symlink() and entry.read_bytes() == b"the photo", rel
        assert entry.stat().st_ino == (tmp_path / "master" / "x.jpg").stat().st_ino  # a link, no extra space


def test_a_manifests_missing_files_the_folder_holds_spelt_otherwise_are_named_with_their_spelling(weights, tmp_path):
    """`img_1.jpg` listed for `IMG_1.JPG` (a sheet typed on Windows, where case does not matter)
    was an unreadable row, "No such file", with no hint; `validate` named the spelling."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    (tmp_path / "IMG_1.JPG").write_bytes(fuzz_set()["ok.jpg"][0])
    (tmp_path / "b.jpg").write_bytes(fuzz_set()["ok.jpg"][0] + b"1")
    (tmp_path / "m.csv").write_text("path\nimg_1.jpg\nb.jpg\ngone.jpg\n")
    r = CliRunner().invoke(app, ["clean", str(tmp_path / "m.csv"), "-o", str(tmp_path / "out"),
                                 "--weights", str(weights)])
    assert r.exit_code == 0, r.output
    assert "1 missing listed files are in the folder under another spelling, e.g. 'img_1.jpg'; the folder has " \
           "'IMG_1.JPG'" in r.output
    assert "gone.jpg" not in r.output
    # the row says it too, as a service job's row does (one mechanism, `name_spellings`)
    rows = pd.read_csv(tmp_path / "out" / "results.csv", keep_default_na=False).set_index("path")
    assert "the folder has 'IMG_1.JPG'" in rows.loc["img_1.jpg", "error"] and "; " not in rows.loc["gone.jpg", "error"]


def test_a_manifest_path_keeps_spaces_a_file_is_named_with_and_loses_those_a_cell_picked_up(tmp_path):
    """`trailing space.jpg ` (a Samba share allows it), fed back from results.parquet, was
    stripped into a missing file (an audit); ` b.jpg` typed into a spreadsheet cell is b.jpg."""
    from pipelines.clean.inputs import list_inputs

    for name in ("trailing space.jpg ", "b.jpg"):
        (tmp_path / name).write_bytes(b"x")
    pd.DataFrame({"path": ["trailing space.jpg ", " b.jpg", "gone.jpg  "]}).to_parquet(tmp_path / "m.parquet")
    assert list_inputs(tmp_path / "m.parquet") == ["b.jpg", "gone.jpg", "trailing space.jpg "]


def test_file_server_thumbnails_and_recycle_bins_are_not_photos_of_the_collection(tmp_path):
    """A Synology share's `@eaDir` thumbnails became extra rows, near duplicates of every photo
    and quarantine copies; its recycle bin's photos were cleaned as the collection's; an
    iPhone's .AAE edit sidecars were `unreadable` rows among the damaged photos."""
    from pipelines.clean.inputs import list_inputs

    for rel in ("a.jpg", "sub/b.jpg", "@eaDir/a.jpg/SYNOPHOTO_THUMB_M.jpg", "#recycle/old.jpg",
                "$RECYCLE.BIN/S-1-5/$RABC123.jpg", "sub/Thumbs.db", "desktop.ini", "Icon\r", ".DS_Store",
                "sub/#snapshot/b.jpg", "thumbs_of_the_cervix.jpg", "IMG_0001.AAE", "sub/b.jpg.xmp",
                # Windows' recycle bin as C: spells it, XP's and FAT's; shortcuts, Picasa's notes and
                # slides (an audit: each a row, the bin's photo the live one's `duplicate_of`)
                "$Recycle.Bin/S-1-5-21/$RDEF456.jpg", "RECYCLER/S-1-5/Dc1.jpg", "Recycled/Dc2.jpg", "Photo 5.lnk",
                "link.url", "sub/.picasa.ini", "Picasa.ini", "report.pptx", "~$report.pptx"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert list_inputs(tmp_path) == ["a.jpg", "sub/b.jpg", "thumbs_of_the_cervix.jpg"]


def test_a_datasets_tables_and_notes_beside_its_photos_are_not_rows_and_are_counted(tmp_path, caplog):
    """A dataset folder's manifest.csv and coco.json were `unreadable` rows, quarantined among
    the damaged photos."""
    from pipelines.clean.inputs import list_inputs

    for rel in ("a.jpg", "manifest.csv", "coco.json", "sub/labels.XLSX", "README.md", "notes.txt", "b.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    with caplog.at_level("INFO", logger="pipelines.clean.inputs"):
        assert list_inputs(tmp_path) == ["a.jpg", "b.png"]
    assert "5 tables and notes skipped" in caplog.text
    for photo in ("a.jpg", "b.png"):
        (tmp_path / photo).unlink()
    from typer.testing import CliRunner

    from pipelines.cli import app

    r = CliRunner().invoke(app, ["clean", str(tmp_path), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "holds no files to clean" in r.output and "give a manifest itself" in r.output


def test_a_name_spelt_as_another_files_escaped_name_is_one_row_and_said(tmp_path, caplog):
    """`Pe\\xf1a.jpg` in Latin-1 is written `Pe\\xf1a.jpg`, as a file literally so named is: the
    run counted two files and stored one row, so the job's total never met its rows."""
    import os

    from pipelines.clean.inputs import list_inputs

    (tmp_path / "Pe\\xf1a.jpg").write_bytes(b"literal")
    with open(os.fsencode(tmp_path) + b"/Pe\xf1a.jpg", "wb") as f:
        f.write(b"latin-1")
    with caplog.at_level("WARNING", logger="pipelines.clean.inputs"):
        assert list_inputs(tmp_path) == ["Pe\\xf1a.jpg"]
    assert "1 files are spelt as another file's row" in caplog.text
    from pipelines.data.schema import on_disk

    # the row is the Latin-1 photo's, as the README says: the literal file took it (an audit)
    assert on_disk(tmp_path, "Pe\\xf1a.jpg").read_bytes() == b"latin-1"
    (tmp_path / "Pe\\xf2b.jpg").write_bytes(b"literal alone")  # no Latin-1 twin: the name itself
    assert on_disk(tmp_path, "Pe\\xf2b.jpg").read_bytes() == b"literal alone"


def test_a_quarantine_name_holding_another_file_is_counted_not_taken_as_the_copy(tmp_path):
    """On a quarantine that ignores letter case (exFAT, SMB, macOS), `A.JPG`'s copy stood for
    `a.jpg`: the second flagged photo was never copied, and nothing said so. A copy already
    there with the same bytes (a resumed batch) is still taken as done."""
    from pipelines.clean.quarantine import quarantine_results

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jpg").write_bytes(b"the second photo")
    (tmp_path / "src" / "b.jpg").write_bytes(b"copied before the kill")
    for name, data in (("a.jpg", b"the first photo, A.JPG"), ("b.jpg", b"copied before the kill")):
        (tmp_path / "q" / "unreadable").mkdir(parents=True, exist_ok=True)
        (tmp_path / "q" / "unreadable" / name).write_bytes(data)  # as the file system would show it
    rows = [QCResult(path=n, label=Label.UNREADABLE, error="not an image") for n in ("a.jpg", "b.jpg")]
    assert quarantine_results(tmp_path / "src", rows, tmp_path / "q") == 1
    assert (tmp_path / "q" / "unreadable" / "a.jpg").read_bytes() == b"the first photo, A.JPG"


def test_a_name_that_is_not_utf8_spelt_as_clean_spells_it_names_its_file_in_manifests_and_box_files(tmp_path):
    """Clean, the jobs and their exports write `Pe\\xf1a.jpg` for a Latin-1 name; `validate`
    called that row a missing file, and detector training opened no such file (or another one
    literally so named)."""
    from pipelines.data.coco import CocoCategory, CocoDataset, CocoImage, make_annotation
    from pipelines.data.detection import CocoDetection
    from pipelines.data.manifest import load_manifest
    from tests.qc_fixtures import jpeg_bytes, textured_scene

    raw = os.fsencode(tmp_path) + b"/Pe\xf1a.jpg"
    with open(raw, "wb") as f:
        f.write(jpeg_bytes(textured_scene(2)))
    (tmp_path / "m.csv").write_text("path,patient_id,source,device,kind\nPe\\xf1a.jpg,p1,s,d,regular\n")
    assert os.fsencode(load_manifest(tmp_path / "m.csv")["abspath"].iat[0]) == raw  # checked, and found
    from PIL import Image

    w, h = Image.open(raw).size
    coco = CocoDataset(images=[CocoImage(id=1, file_name="Pe\\xf1a.jpg", width=w, height=h)],
                       annotations=[make_annotation(1, 1, 1, [4, 4, 40, 40])],
                       categories=[CocoCategory(id=1, name="cervix")])
    image, target = CocoDetection(coco, tmp_path, None, 256, ["cervix"])[0]
    assert image.shape[0] == 3 and len(target["boxes"]) == 1  # decoded (at a DCT scale: 256 px asked)


def test_a_photo_given_as_the_source_is_named_as_one(collection):
    """It was read as a manifest and told to save itself as "CSV UTF-8" (an audit)."""
    from pipelines.clean.inputs import list_inputs

    photo = next(p for p in sorted(collection.rglob("*.jpg")) if p.read_bytes()[:2] == b"\xff\xd8")
    with pytest.raises(ValueError, match="is a photo, not a folder or manifest: give its folder"):
        list_inputs(photo)
    (collection / "empty.jpg").write_bytes(b"")  # named as one: "cannot read it as a table" (an audit)
    with pytest.raises(ValueError, match="empty.jpg is a photo, not a folder or manifest"):
        list_inputs(collection / "empty.jpg")


def test_a_run_that_calls_a_quarter_of_its_readable_photos_no_cervix_says_so_and_no_fewer():
    assert len(run_notes({"regular": 15, "no_cervix": 5})) == 1  # 5 of 20: a quarter
    [unreadable] = run_notes({"regular": 16, "no_cervix": 4, "unreadable": 30})  # 4 of 20 readable: no note of it
    assert unreadable.startswith("30 of 50 files (60%) could not be read as photos: the wrong folder")
    assert run_notes({"regular": 14, "no_cervix": 5}) == []  # 19 readable: too few to say
    assert run_notes({}) == []
    [note] = run_notes({"regular": 10, "non_regular": 5, "no_cervix": 10, "unreadable": 3})
    assert note.startswith("10 of 25 readable photos (40%) were called no_cervix") and "Site adaptation" in note
    assert run_notes({"regular": 15, "unreadable": 4}) == []  # 19 files
    assert len(run_notes({"regular": 15, "unreadable": 5})) == 1  # a quarter of 20
    assert run_notes({"regular": 16, "unreadable": 5}) == []  # under a quarter
    assert len(run_notes({"unreadable": 20, "no_cervix": 20})) == 2


def test_a_note_is_said_once_when_it_first_holds_and_a_resume_counts_the_rows_done_before():
    said: list[str] = []
    watch = NoteWatch(said.append, ["regular"] * 14)  # a resume's rows: 14 readable, too few
    watch.add(["no_cervix"] * 5)
    assert said == []  # 19 readable
    watch.add(["no_cervix"])
    assert len(said) == 1 and said[0].startswith("6 of 20 readable photos (30%) were called no_cervix")
    watch.add(["no_cervix"] * 40)
    assert len(said) == 1  # once
    watch.add(["unreadable"] * 40)
    assert len(said) == 2 and said[1].startswith("40 of 100 files (40%) could not be read")  # another note: said
    watch.add(["unreadable"] * 40)
    assert len(said) == 2
    said.clear()
    NoteWatch(said.append, ["no_cervix"] * 20)  # a resume past the share says so at its start
    assert len(said) == 1 and said[0].startswith("20 of 20")
    quiet = NoteWatch(None, ["no_cervix"] * 20)
    quiet.add(["no_cervix"] * 20)
    assert not quiet.counts  # nobody listens: nothing counted


def test_clean_says_when_a_site_gets_most_photos_called_no_cervix(tmp_path):
    """The bundled weights' first trial on another site's real photos called a third of its
    cervixes no_cervix without a word; the labels stand, the user is told to look, as soon as
    the rows so far show it (batches of 4: at the fifth, 20 photos), and again at the end."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from pipelines.cli import app

    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0, presence_threshold=1.0)  # stage 0 says no to all
    src = tmp_path / "site"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(28):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(src / f"{i:02d}.jpg")
    r = CliRunner().invoke(app, ["clean", str(src), "-o", str(tmp_path / "out"), "--weights", str(weights),
                                 "--runtime", "torch", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    assert "no_cervix 28" in r.output
    early = r.output.index("note, so far (the run goes on; Ctrl-C stops it, the same command resumes): 20 of 20 "
                           "readable photos (100%) were called no_cervix")
    assert early < r.output.index("28 files: 28 processed now") < r.output.index("note: 28 of 28 readable photos")
    assert r.output.count("note") == 2


def test_predicts_table_shows_control_characters_in_names_escaped(weights, tmp_path):
    """A line feed in a name split predict's row in two, and a carriage return wrote the name
    over the label on a terminal (an audit); --json keeps the name."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    names = ["new\nline.jpg", "x\r@SUM(1).jpg"]
    for name in names:
        (tmp_path / name).write_bytes(b"not a photo")
    r = CliRunner().invoke(app, ["predict", *(str(tmp_path / n) for n in names), "--weights", str(weights)])
    table = [line for line in r.stdout.splitlines() if "unreadable" in line]
    assert len(table) == 2 and table[0].endswith("new\\x0aline.jpg") and table[1].endswith("x\\x0d@SUM(1).jpg"), r.stdout
    r = CliRunner().invoke(app, ["predict", str(tmp_path / names[0]), "--weights", str(weights), "--json"])
    assert json.loads(r.stdout.splitlines()[0])["path"].endswith("new\nline.jpg")
