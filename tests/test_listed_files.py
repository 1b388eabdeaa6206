"""Listed public photos come out of local git snapshots byte for byte, checked by sha256."""

import csv
import hashlib
import subprocess

from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.data.listed_files import extract_listed

runner = CliRunner()


def _snapshot(tmp_path):
    """A bare-ish snapshot at MIRRORS/owner+name/repo with one file whose committed name has a
    stray U+0092 (as the colposcopy atlas's Lugol file names do)."""
    work = tmp_path / "work"
    (work / "imgs").mkdir(parents=True)
    files = {"imgs/a.jpg": b"\xff\xd8 one", "imgs/4_After_Lugol\u0092s_iodine.jpg": b"\xff\xd8 two"}
    for name, data in files.items():
        (work / name).write_bytes(data)
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    mirror = tmp_path / "mirrors" / "owner+name"
    mirror.mkdir(parents=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(mirror / "repo")], check=True)
    return tmp_path / "mirrors", commit, files


def _listing(path, commit, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "repo", "commit", "path_in_repo", "sha256"])
        w.writeheader()
        for file, in_repo, data in rows:
            w.writerow({"file": file, "repo": "owner/name", "commit": commit[:7], "path_in_repo": in_repo,
                        "sha256": hashlib.sha256(data).hexdigest()})


def test_listed_files_are_copied_exactly_even_with_a_stray_control_character(tmp_path):
    mirrors, commit, files = _snapshot(tmp_path)
    _listing(tmp_path / "list.csv", commit, [("x/a.jpg", "imgs/a.jpg", files["imgs/a.jpg"]),
                                             ("x/l.jpg", "imgs/4_After_Lugols_iodine.jpg",
                                              files["imgs/4_After_Lugol\u0092s_iodine.jpg"])])
    report = extract_listed(tmp_path / "list.csv", mirrors, tmp_path / "out")
    assert (report.written, report.problems) == (2, [])
    assert (tmp_path / "out/x/l.jpg").read_bytes() == b"\xff\xd8 two"
    assert extract_listed(tmp_path / "list.csv", mirrors, tmp_path / "out").present == 2  # reruns are free


def test_a_listed_name_with_spaces_around_it_is_written_under_the_name_that_was_checked(tmp_path):
    mirrors, commit, files = _snapshot(tmp_path)
    _listing(tmp_path / "list.csv", commit, [(" x/a.jpg ", "imgs/a.jpg", files["imgs/a.jpg"])])
    assert extract_listed(tmp_path / "list.csv", mirrors, tmp_path / "out").written == 1
    assert [p.name for p in (tmp_path / "out" / "x").iterdir()] == ["a.jpg"]


def test_a_changed_file_or_a_missing_snapshot_is_reported_and_not_written(tmp_path):
    mirrors, commit, files = _snapshot(tmp_path)
    _listing(tmp_path / "list.csv", commit, [("x/a.jpg", "imgs/a.jpg", b"other bytes"),
                                             ("x/b.jpg", "imgs/b.jpg", b"")])
    r = runner.invoke(app, ["extract-listed", str(tmp_path / "list.csv"), "--mirrors", str(mirrors),
                            "-o", str(tmp_path / "out")])
    assert r.exit_code == 1
    assert "x/a.jpg: sha256 differs" in r.output and "x/b.jpg: not in the snapshot" in r.output
    assert not (tmp_path / "out/x/a.jpg").exists()
    # no snapshots: one line per repository, and a --mirrors that is not there is one error line
    # (each listed file was a line of its own, 540 for the real photos, and exit 1)
    (tmp_path / "empty").mkdir()
    report = extract_listed(tmp_path / "list.csv", tmp_path / "empty", tmp_path / "out")
    assert len(report.problems) == 1 and "no snapshot under" in report.problems[0] and "2 listed files" in \
        report.problems[0]
    r = runner.invoke(app, ["extract-listed", str(tmp_path / "list.csv"), "--mirrors", str(tmp_path / "nowhere"),
                            "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "no such folder" in r.output, r.output


def test_a_listed_name_outside_the_output_blank_or_twice_is_refused_and_nothing_is_overwritten(tmp_path):
    mirrors, commit, files = _snapshot(tmp_path)
    victim = tmp_path / "victim.jpg"
    victim.write_bytes(b"someone else's file")
    a = files["imgs/a.jpg"]
    _listing(tmp_path / "list.csv", commit, [("../victim.jpg", "imgs/a.jpg", a), (str(victim), "imgs/a.jpg", a),
                                             ("", "imgs/a.jpg", a), ("x/a.jpg", "imgs/a.jpg", a),
                                             ("x//a.jpg", "imgs/a.jpg", a)])
    report = extract_listed(tmp_path / "list.csv", mirrors, tmp_path / "out")
    assert report.written == 1 and (tmp_path / "out/x/a.jpg").read_bytes() == a
    assert victim.read_bytes() == b"someone else's file" and (tmp_path / "out").is_dir()
    assert [p.split(":")[0] for p in report.problems] == ["line 2", "line 3", "line 4", "line 6"]
    assert "listed twice" in report.problems[-1] and "not a path inside the output folder" in report.problems[0]


def test_extract_listed_without_git_says_so(tmp_path, monkeypatch):
    """On a machine with python3 and make only, the snapshots' reader was missing and the
    command ended in a traceback (FileNotFoundError: 'git')."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    (tmp_path / "list.csv").write_text("file,repo,commit,path_in_repo,sha256\na.jpg,o/r,abc,a.jpg," + "0" * 64 + "\n")
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    r = CliRunner().invoke(app, ["extract-listed", str(tmp_path / "list.csv"), "--mirrors", str(tmp_path),
                                 "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "with git, which is not installed" in r.output and "Traceback" not in r.output


def test_a_listing_that_is_missing_not_utf8_or_without_its_columns_is_one_error_line(tmp_path):
    """Exit 1 with the OS's words, a codec error naming no file, and "line 2: file '' is not a
    path inside the output folder" for a listing without its columns (an audit)."""
    mirrors, commit, files = _snapshot(tmp_path)
    latin1 = "file,repo,commit,path_in_repo,sha256\nPe\xf1a.jpg,r,c,p,s\n"
    (tmp_path / "latin1.csv").write_bytes(latin1.encode("latin-1"))
    (tmp_path / "cols.csv").write_text("name,sha\na.jpg,0\n")
    for listing, said in (("nope.csv", "nope.csv: no such file"), ("latin1.csv", "latin1.csv: not UTF-8"),
                          ("cols.csv", "no file, repo, commit, path_in_repo, sha256 column (it has: name, sha)")):
        r = runner.invoke(app, ["extract-listed", str(tmp_path / listing), "--mirrors", str(mirrors),
                                "-o", str(tmp_path / "out")])
        assert r.exit_code == 2 and said in r.output and r.output.count("\n") == 1, r.output
