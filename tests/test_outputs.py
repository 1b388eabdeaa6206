"""Files written whole: what a killed writer leaves behind is swept, and only that."""

from pipelines.outputs import sweep_temporaries


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
