"""Settings refuse what would leave a screening site open or misconfigured."""

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_no_api_key_is_refused_unless_auth_is_switched_off_explicitly(monkeypatch):
    monkeypatch.delenv("CERVIXQC_API_KEYS", raising=False)
    with pytest.raises(ValidationError, match="no API key"):
        Settings()
    assert Settings(auth_disabled=True).api_keys == []


@pytest.mark.parametrize("key", ["changeme", "short-key"])
def test_placeholder_and_short_keys_are_refused(key):
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings(api_keys=key)


def test_a_short_key_is_blamed_on_the_variable_or_the_file_line_it_came_from(monkeypatch, tmp_path):
    """A short key in CERVIXQC_API_KEYS_FILE was blamed on CERVIXQC_API_KEYS, which the site had
    not set (an audit)."""
    key_file = tmp_path / "keys"
    key_file.write_text("# site keys\nfile-key-0123456789abcdef\nshort\n")
    key_file.chmod(0o600)
    monkeypatch.setenv("CERVIXQC_API_KEYS_FILE", str(key_file))
    with pytest.raises(ValidationError, match=f"CERVIXQC_API_KEYS_FILE {key_file} \\(line 3\\): keys must be"):
        Settings()
    with pytest.raises(ValidationError, match="CERVIXQC_API_KEYS: keys must be"):
        Settings(api_keys="short")


def test_lists_come_comma_separated_from_the_environment(monkeypatch, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# site keys\nfile-key-0123456789abcdef\n")
    monkeypatch.setenv("CERVIXQC_API_KEYS", "env-key-0123456789abcdef, env-key-fedcba9876543210")
    monkeypatch.setenv("CERVIXQC_API_KEYS_FILE", str(key_file))
    monkeypatch.setenv("CERVIXQC_DATA_ROOTS", f"{tmp_path}/a,{tmp_path}/b")
    key_file.chmod(0o600)
    s = Settings()
    assert s.api_keys == ["env-key-0123456789abcdef", "env-key-fedcba9876543210", "file-key-0123456789abcdef"]
    assert s.data_roots == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]


def _damaged_stores(tmp_path) -> list[tuple]:
    """Job stores as a failing disk or a bad copy leaves them, each with what SQLite calls it."""
    import sqlite3

    from pipelines.engine.qc_result import Label, QCResult
    from service.jobs.store import JobStore

    good = tmp_path / "state-good"
    store = JobStore(good / "jobs.sqlite")
    job = store.create("src", None, "resnest", good / "jobs")
    store.add_items(job.id, [QCResult(path=f"{i}.jpg", label=Label.REGULAR) for i in range(3000)])
    store.close()
    data = (good / "jobs.sqlite").read_bytes()
    page = sqlite3.connect(good / "jobs.sqlite").execute("PRAGMA page_size").fetchone()[0]
    assert len(data) > 100 * page
    cases = {"truncated": (data[: len(data) // 2], "database disk image is malformed"),
             "not-sqlite": (b"jobs,rows\n" * 100, "file is not a database"),
             "bad-page": (data[: 99 * page] + bytes(range(256)) * (page // 256) + data[100 * page:], "")}
    out = []
    for name, (content, why) in cases.items():
        (tmp_path / f"state-{name}").mkdir()
        (tmp_path / f"state-{name}" / "jobs.sqlite").write_bytes(content)
        out.append((tmp_path / f"state-{name}", why, content))
    return out


def test_serve_refuses_bad_settings_and_a_damaged_weights_card_naming_each_before_it_starts(monkeypatch, tmp_path):
    """Each used to be a traceback and "Application startup failed", an error without the
    variable's name, or a service that reported ready and then failed every job."""
    from typer.testing import CliRunner

    import json
    import socket
    import sqlite3

    from service import state_lock
    from service.cli import app
    from tests.qc_fixtures import tiny_weights

    weights = tiny_weights(tmp_path / "w", 0.0)
    damaged = tiny_weights(tmp_path / "w2", 0.0)
    (damaged / "classifier.json").write_text((damaged / "classifier.json").read_text()[:40])
    other_detector = tiny_weights(tmp_path / "w4", 0.0, presence_threshold=0.5)
    card = json.loads((other_detector / "presence.json").read_text())  # a detector retrained since the head
    card["config"]["detector_sha256"] = "0" * 64
    (other_detector / "presence.json").write_text(json.dumps(card))
    bad_findings = tiny_weights(tmp_path / "w3", 0.0)
    (bad_findings / "findings.json").write_text("{")  # an optional card: failed inside the startup
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    (tmp_path / "short-secret").write_text("operator-chosen-secret")
    (tmp_path / "latin1-keys").write_bytes("clé-0123456789abcdefghij\n".encode("latin-1"))
    (jobs_a_file := tmp_path / "state-jobs-a-file").mkdir()
    (jobs_a_file / "jobs").write_text("")
    held = tmp_path / "state-held"
    lock = state_lock.hold(held)  # as a running service holds it
    (newer := tmp_path / "state-newer").mkdir()
    db = sqlite3.connect(newer / "jobs.sqlite")
    db.execute("PRAGMA user_version = 99")  # a later cervixqc's store, before a downgrade
    db.close()
    damaged_stores = _damaged_stores(tmp_path)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    monkeypatch.setenv("CERVIXQC_API_KEYS", "test-key-0123456789abcdef")
    monkeypatch.setenv("CERVIXQC_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CERVIXQC_WEIGHTS_DIR", str(weights))  # serve sets it for uvicorn: restored after the test
    inner = tmp_path / "state" / "photos"
    inner.mkdir(parents=True)
    cases = [({"CERVIXQC_MAX_BATCH_SIZE": "0"}, weights, "CERVIXQC_MAX_BATCH_SIZE: Input should be greater"),
             ({"CERVIXQC_PORT": "-1"}, weights, "CERVIXQC_PORT"),
             ({"CERVIXQC_DEVICE": "gpu0"}, weights, "CERVIXQC_DEVICE: 'gpu0' is not a device"),
             ({"CERVIXQC_MAX_QUEUE_BYTES": "2048"}, weights, "CERVIXQC_MAX_QUEUE_BYTES (2048) must be at least"),
             ({"CERVIXQC_STATE_DIR": str(a_file)}, weights, "CERVIXQC_STATE_DIR"),
             ({"CERVIXQC_DATA_ROOTS": str(tmp_path / "nowhere")}, weights, "CERVIXQC_DATA_ROOTS"),
             ({"CERVIXQC_QUARANTINE_ROOT": str(a_file)}, weights, "CERVIXQC_QUARANTINE_ROOT"),
             # a job over the root read its own quarantine copies back: each flagged photo counted twice
             ({"CERVIXQC_DATA_ROOTS": str(tmp_path / "data"), "CERVIXQC_QUARANTINE_ROOT": str(tmp_path / "data/q")},
              weights, "CERVIXQC_QUARANTINE_ROOT " + str(tmp_path / "data/q") + " and the data root"),
             ({"CERVIXQC_DATA_ROOTS": str(tmp_path)}, weights, "CERVIXQC_STATE_DIR " + str(tmp_path / "state")
              + " and the data root " + str(tmp_path) + " lie one inside the other"),
             # and the other way: a data root inside the state folder (a mutation no test caught)
             ({"CERVIXQC_DATA_ROOTS": str(inner)}, weights, "CERVIXQC_STATE_DIR " + str(tmp_path / "state")
              + " and the data root " + str(inner) + " lie one inside the other"),
             ({"CERVIXQC_SESSION_SECRET_FILE": str(tmp_path / "short-secret")}, weights, "needs at least 32"),
             ({"CERVIXQC_API_KEYS_FILE": str(tmp_path / "latin1-keys")}, weights,
              "CERVIXQC_API_KEYS_FILE " + str(tmp_path / "latin1-keys") + ": cannot read it (not UTF-8 text)"),
             ({}, damaged, "classifier.json: not a readable model card"),
             ({}, bad_findings, "findings.json"),
             # no card: the service started and no job ever flagged a photo by a finding (an audit)
             ({"CERVIXQC_QUARANTINE_FINDINGS": "blur"}, weights, "CERVIXQC_QUARANTINE_FINDINGS: " + str(weights)
              + " has no findings.json"),
             ({}, other_detector, "presence.json was trained on the features of another detector"),
             # "inf" seconds overflowed SQLite's timeout, and every sign-in was a 500
             ({"CERVIXQC_STORE_BUSY_TIMEOUT_S": "inf"}, weights, "CERVIXQC_STORE_BUSY_TIMEOUT_S"),
             ({"CERVIXQC_SESSION_MAX_AGE_S": "inf"}, weights, "CERVIXQC_SESSION_MAX_AGE_S"),
             ({"CERVIXQC_STATE_DIR": str(jobs_a_file)}, weights, "its jobs/ folder, the jobs' results"),
             ({"CERVIXQC_STATE_DIR": str(held)}, weights, "another cervixqc service (pid"),
             ({"CERVIXQC_STATE_DIR": str(newer)}, weights, "written by a newer cervixqc (schema v99"),
             # a damaged page said ready and failed every job on it; a truncated file or one that is
             # no SQLite was a 60-line traceback naming neither (an audit)
             *[({"CERVIXQC_STATE_DIR": str(folder)}, weights, f"CERVIXQC_STATE_DIR: {folder / 'jobs.sqlite'} is "
                f"damaged ({why}") for folder, why, _ in damaged_stores],
             ({"CERVIXQC_PORT": str(taken.getsockname()[1])}, weights, f"CERVIXQC_PORT (or --port) "
                                                                       f"{taken.getsockname()[1]} on 127.0.0.1"),
             ({"CERVIXQC_HOST": "256.1.1.1"}, weights, "CERVIXQC_HOST (or --host) '256.1.1.1'"),
             # it goes into links, a cookie's path and Location headers as it is
             ({"CERVIXQC_ROOT_PATH": "cervixqc"}, weights, "CERVIXQC_ROOT_PATH: 'cervixqc' is not a path prefix"),
             ({"CERVIXQC_ROOT_PATH": '/a"b'}, weights, "CERVIXQC_ROOT_PATH")]
    for env, folder, message in cases:
        r = CliRunner().invoke(app, ["serve", "--weights", str(folder)], env=env)
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, (env, r.output)
    assert (tmp_path / "short-secret").read_text() == "operator-chosen-secret"  # refused, not replaced
    for folder, _, content in damaged_stores:  # refused as they were: no upgrade, no backup of the damage
        assert (folder / "jobs.sqlite").read_bytes() == content and not list(folder.glob("*.bak")), folder
    lock.close()
    taken.close()


def test_serve_on_a_full_state_disk_names_the_folder(monkeypatch, tmp_path):
    """It said "error: No space left on device", naming no folder or variable (an audit)."""
    from typer.testing import CliRunner

    from service.cli import app
    from tests.qc_fixtures import tiny_weights
    from tests.small_disk import fill, small_tmpfs

    weights = tiny_weights(tmp_path / "w", 0.0)
    with small_tmpfs(tmp_path / "state", "1m") as state:
        (state / "jobs").mkdir()
        fill(state)
        monkeypatch.setenv("CERVIXQC_API_KEYS", "test-key-0123456789abcdef")
        monkeypatch.setenv("CERVIXQC_WEIGHTS_DIR", str(weights))
        r = CliRunner().invoke(app, ["serve", "--weights", str(weights)], env={"CERVIXQC_STATE_DIR": str(state)})
        assert r.exit_code == 2 and f"CERVIXQC_STATE_DIR {state}: cannot write its lock file" in r.output, r.output


def test_a_key_file_others_can_read_is_warned_about(monkeypatch, tmp_path, caplog):
    key_file = tmp_path / "keys"
    key_file.write_text("file-key-0123456789abcdef\n")
    for mode, warned in ((0o644, True), (0o600, False)):
        key_file.chmod(mode)
        caplog.clear()
        with caplog.at_level("WARNING", logger="service.settings"):
            Settings(api_keys_file=key_file)
        assert ("readable by other users" in caplog.text) == warned, mode


def test_a_misspelt_setting_is_warned_about_not_silently_ignored(monkeypatch, caplog):
    """CERVIXQC_POLICI=both ran the service on the default policy, without a word."""
    monkeypatch.setenv("CERVIXQC_API_KEYS", "test-key-0123456789abcdef")
    monkeypatch.setenv("CERVIXQC_POLICI", "both")
    monkeypatch.setenv("CERVIXQC_CACHE", "/tmp/elsewhere")  # the engine's, not a setting: no warning
    with caplog.at_level("WARNING", logger="service.settings"):
        Settings()
    assert "CERVIXQC_POLICI: no such setting, ignored" in caplog.text and "CERVIXQC_CACHE" not in caplog.text


def test_a_setting_renamed_since_an_older_release_names_its_successor(monkeypatch, caplog):
    """CERVIXQC_UPLOAD_TIMEOUT_S from an older site's .env was warned of as a misspelling."""
    monkeypatch.setenv("CERVIXQC_API_KEYS", "test-key-0123456789abcdef")
    monkeypatch.setenv("CERVIXQC_UPLOAD_TIMEOUT_S", "1800")
    with caplog.at_level("WARNING", logger="service.settings"):
        settings = Settings()
    assert "CERVIXQC_UPLOAD_TIMEOUT_S: renamed CERVIXQC_UPLOAD_IDLE_TIMEOUT_S" in caplog.text
    assert "no such setting" not in caplog.text and settings.upload_idle_timeout_s != 1800


def test_the_start_check_keeps_the_state_folder_for_the_service_this_process_starts(tmp_path):
    """`serve` checked the folder's lock and let it go; two services started together both
    passed the check, and the later one failed in its startup with uvicorn's traceback (an
    audit). The check now holds the lock until this process's service takes it over."""
    import subprocess
    import sys

    from service.state_lock import hold, let_go, take

    def another_process_takes_it() -> str:
        r = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                            "from service.state_lock import take; print(take(Path(sys.argv[1])))", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
        return r.stdout.strip()

    assert take(tmp_path) is None
    assert "another cervixqc service" in another_process_takes_it()  # between the check and the start
    lock = hold(tmp_path)  # handed over to this process's service
    assert "another cervixqc service" in another_process_takes_it()
    lock.close()
    assert another_process_takes_it() == "None"
    assert take(tmp_path) is None
    let_go(tmp_path)  # a start that did not happen
    assert another_process_takes_it() == "None"
