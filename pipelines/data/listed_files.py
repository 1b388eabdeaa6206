"""Files listed by (repository, commit, path, sha256), copied out of local git snapshots.

Public photos that are not ours to redistribute never enter the project: the project keeps
the list, each site fetches the repositories, and this copies the exact bytes out and checks
each against its sha256, so a changed upstream file can never slip into training unnoticed.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.outputs import write_atomically


@dataclass
class ExtractReport:
    listed: int = 0
    written: int = 0
    present: int = 0
    problems: list[str] = field(default_factory=list)


def _git_dir(mirrors: Path, repo: str) -> Path | None:
    base = mirrors / repo.replace("/", "+") / "repo"
    for g in (base / ".git", base):
        if (g / "HEAD").is_file():
            return g
    return None


def _blob(git_dir: Path, commit: str, path: str) -> bytes | None:
    """The file at `commit` (abbreviated ids are fine); None when git does not have it."""
    r = subprocess.run(["git", "--git-dir", str(git_dir), "cat-file", "blob", f"{commit}:{path}"],
                       capture_output=True)
    return r.stdout if r.returncode == 0 else None


def _blob_by_id(git_dir: Path, blob: str) -> bytes:
    return subprocess.run(["git", "--git-dir", str(git_dir), "cat-file", "blob", blob], capture_output=True).stdout


def _c1_free(name: str) -> str:
    """Names with C1 control characters removed: a stray U+0092 (a Windows-1252 apostrophe
    decoded as Latin-1) sits in some committed file names but not in the lists made from them."""
    return "".join(ch for ch in name if not 0x80 <= ord(ch) <= 0x9F)


def _tree_by_clean_name(git_dir: Path, commit: str) -> dict[str, str]:
    out = subprocess.run(["git", "--git-dir", str(git_dir), "ls-tree", "-r", "-z", commit],
                         capture_output=True).stdout
    names = {}
    for entry in out.split(b"\0"):
        if entry:
            meta, name = entry.split(b"\t", 1)
            names[_c1_free(name.decode("utf-8", "replace"))] = meta.split()[2].decode()
    return names


def _safe_targets(rows: list[dict], out: Path, report: ExtractReport) -> list[dict]:
    """The rows whose `file` names a new file inside `out`. A listing is data from elsewhere:
    `../x.jpg` or an absolute path was written outside `out`, over whatever was there; a
    blank name wrote the photo over `out` itself; two rows with one name both counted as
    written while the second replaced the first. Those rows are problems, never written."""
    root, seen, kept = out.resolve(), set(), []
    for k, r in enumerate(rows, start=2):  # the header is line 1
        name = (r.get("file") or "").strip()
        target = (out / name).resolve()
        if not name or not target.is_relative_to(root) or target == root:
            report.problems.append(f"line {k}: file {name!r} is not a path inside the output folder; not written")
        elif target in seen:
            report.problems.append(f"line {k}: file {name!r} is listed twice; not written again")
        else:
            seen.add(target)
            kept.append(r | {"file": name})  # the name checked is the name written ("x.jpg " wrote "x.jpg ")
    return kept


LISTING_COLUMNS = ("file", "repo", "commit", "path_in_repo", "sha256")


def extract_listed(listing: str | Path, mirrors: str | Path, out: str | Path) -> ExtractReport:
    """The listed files out of the snapshots, each checked by its sha256. Needs git (the
    snapshots are bare repositories): a ValueError saying so where it is missing, which was
    a traceback (FileNotFoundError: 'git')."""
    if shutil.which("git") is None:
        raise ValueError("extract-listed reads the repository snapshots with git, which is not installed "
                         "(Debian: apt-get install git)")
    mirrors, out = Path(mirrors), Path(out)
    if not mirrors.is_dir():  # each listed file was a line of its own, 540 for the real photos (an audit)
        raise ValueError(f"--mirrors {mirrors}: no such folder; fetch the listed repositories' snapshots into it "
                         "first, one per repository as owner+name/repo (weights/recipe.sh says how)")
    if not Path(listing).is_file():  # exit 1 with the OS's words (an audit)
        raise ValueError(f"{listing}: no such file")
    try:
        with open(listing, newline="", encoding="utf-8-sig") as f:  # -sig: a header saved with a BOM
            reader = csv.DictReader(f)
            rows = list(reader)
    except UnicodeDecodeError as e:  # "'utf-8' codec can't decode ..." named no file (an audit)
        raise ValueError(f"{listing}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 CSV") from None
    # a listing without these columns was "line 2: file '' is not a path inside the output folder" (an audit)
    missing = [c for c in LISTING_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        have = ", ".join(reader.fieldnames or []) or "none"
        raise ValueError(f"{listing}: no {', '.join(missing)} column (it has: {have})")
    if not rows:  # "0 written ... of 0 listed", exit 0 (an audit)
        raise ValueError(f"{listing}: lists no files")
    report = ExtractReport(listed=len(rows))
    by_repo: dict[str, list[dict]] = defaultdict(list)
    for r in _safe_targets(rows, out, report):
        by_repo[r["repo"]].append(r)
    for repo, items in sorted(by_repo.items()):
        git_dir = _git_dir(mirrors, repo)
        if git_dir is None:  # one line for the repository, not one per file
            report.problems.append(f"{repo}: no snapshot under {mirrors} ({len(items)} listed files not written)")
            continue
        trees: dict[str, dict[str, str]] = {}
        for r in items:
            dst = out / r["file"]
            if dst.is_file() and hashlib.sha256(dst.read_bytes()).hexdigest() == r["sha256"].strip().lower():
                report.present += 1
                continue
            data = _blob(git_dir, r["commit"], r["path_in_repo"])
            if data is None:
                tree = trees.setdefault(r["commit"], _tree_by_clean_name(git_dir, r["commit"]))
                blob = tree.get(_c1_free(r["path_in_repo"]))
                data = _blob_by_id(git_dir, blob) if blob else None
            if data is None:
                report.problems.append(f"{r['file']}: not in the snapshot of {repo} at {r['commit'][:12]}")
                continue
            if hashlib.sha256(data).hexdigest() != r["sha256"].strip().lower():
                report.problems.append(f"{r['file']}: sha256 differs from the list; not written")
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(dst, lambda tmp: tmp.write_bytes(data))  # noqa: B023 - called at once
            report.written += 1
    return report
