"""Files written whole: what a killed writer leaves behind is swept, and only that."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from models.io import ModelCard, load_weights, save_weights
from pipelines.outputs import sweep_temporaries, write_atomically, write_together


def test_a_killed_writers_temporary_files_are_swept_but_a_live_writers_and_others_files_are_not(tmp_path):
    q = tmp_path / "quarantine" / "non_regular" / "clinic"
    q.mkdir(parents=True)
    left = q / ".92b39367e20e1461.tmp"  # as a SIGKILL mid-copy left one, 23 MB, for good
    left.write_bytes(b"half a photo")
    kept = [q / "photo.jpg", q / ".notes.tmp", q / ".92b39367e20e146.tmp"]
    for path in kept:
        path.write_bytes(b"x")
    assert sweep_temporaries(tmp_path) == 0 and left.exists()  # written just now: a live writer's
    assert sweep_temporaries(tmp_path, older_than_s=-1) == 1 and not left.exists()
    assert all(path.exists() for path in kept)


def test_a_killed_conversions_work_folder_is_swept_but_a_live_one_is_not(tmp_path):
    import os
    import time

    from pipelines.engine.openvino_runtime import _sweep_stale_work

    killed, live = tmp_path / ".converting-ab12cd", tmp_path / ".converting-ef34gh"
    for work in (killed, live):
        work.mkdir()
        (work / "classifier.openvino.bin").write_bytes(b"half a model")
    an_hour_ago = time.time() - 3700
    os.utime(killed, (an_hour_ago, an_hour_ago))
    _sweep_stale_work(tmp_path)
    assert not killed.exists() and live.exists()


def _loop_ext4(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A small ext4 that drops to read-only on an error, as a failing disk does; skipped where
    this host cannot mount one (not root, no loop devices)."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4") or not shutil.which("e2fsck"):
        pytest.skip("needs root, mkfs.ext4 and e2fsck")
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(32 * 2**20)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    if subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a loop device here")
    device = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mnt)], capture_output=True, text=True).stdout.strip()
    trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
    if not trigger.exists():
        subprocess.run(["umount", str(mnt)], check=True)
        pytest.skip("this kernel has no ext4 trigger_fs_error")
    return image, mnt, trigger


def test_files_written_whole_survive_the_disk_failing_a_moment_later(tmp_path):
    """Renamed into place before their bytes reached the disk, every quarantine copy and export
    of a run that had exited 0 was 0 bytes after the disk dropped to read-only a second later
    (as after a power cut), and the run's state had them done (an audit: 26 of 26 copies)."""
    image, mnt, trigger = _loop_ext4(tmp_path)
    data = os.urandom(200_000)
    try:
        (mnt / "q").mkdir()
        for i in range(10):
            write_atomically(mnt / "q" / f"{i}.jpg", lambda tmp: tmp.write_bytes(data))
        write_together({mnt / "results.csv": lambda tmp: tmp.write_bytes(data[:5000]),
                        mnt / "summary.json": lambda tmp: tmp.write_text("{}")})
        save_weights({"w": torch.arange(50_000.0)}, mnt / "model", ModelCard(name="m", architecture="m"))
        time.sleep(0.5)
        trigger.write_text("1")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        sizes = {p.name: p.stat().st_size for p in [*(mnt / "q").iterdir(), mnt / "results.csv", mnt / "summary.json"]}
        for name in ("model.json", "model.safetensors"):  # loaded off the disk: safetensors maps the file
            shutil.copy(mnt / name, tmp_path / name)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert sizes == {**{f"{i}.jpg": 200_000 for i in range(10)}, "results.csv": 5000, "summary.json": 2}
    assert torch.equal(load_weights(tmp_path / "model.json")[0]["w"], torch.arange(50_000.0))  # and the weights
