"""A container's CPU quota becomes torch's thread count (pipelines/cpu_quota.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipelines.cpu_quota import quota_cpus, quota_threads


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_v2_quota_is_the_tightest_of_the_cgroup_and_its_ancestors(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1/c1\n")
    root = tmp_path / "fs"
    _write(root / "cpu.max", "max 100000\n")
    _write(root / "kubepods" / "cpu.max", "400000 100000\n")
    _write(root / "kubepods" / "pod1" / "c1" / "cpu.max", "150000 100000\n")
    assert quota_cpus(proc, root) == 1.5 and quota_threads(1.5) == 2
    _write(root / "kubepods" / "pod1" / "c1" / "cpu.max", "max 100000\n")
    assert quota_cpus(proc, root) == 4.0


def _v1(tmp_path: Path, cgroup: str, quota_us: int) -> tuple[Path, Path]:
    """/proc/self/cgroup and a v1 cpu controller whose mount root holds `quota_us`."""
    proc = tmp_path / "cgroup"
    proc.write_text(cgroup)
    root = tmp_path / "fs"
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", f"{quota_us}\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    return proc, root


def test_a_v1_container_reads_its_quota_at_the_mounts_root_when_the_hosts_path_is_not_there(tmp_path):
    proc, root = _v1(tmp_path, "11:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n", 200000)
    assert quota_cpus(proc, root) == 2.0 and quota_threads(2.0) == 2


def test_no_quota_or_no_cgroup_files_leave_the_thread_count_alone(tmp_path):
    proc, root = _v1(tmp_path, "4:cpu,cpuacct:/\n", -1)
    assert quota_cpus(proc, root) is None and quota_threads(None) is None
    assert quota_cpus(tmp_path / "missing", root) is None
    proc.write_text("0::/\n")  # a file that says nothing we can read: no quota, no failed import
    _write(root / "cpu.max", "abc 100000\n")
    assert quota_cpus(proc, root) is None


V1_CPU = Path("/sys/fs/cgroup/cpu")


@pytest.mark.skipif(not (os.access(V1_CPU, os.W_OK) and (V1_CPU / "cpu.cfs_quota_us").exists()
                         and len(os.sched_getaffinity(0)) >= 2),
                    reason="needs a writable cgroup v1 cpu controller (root) and two cores")
def test_a_process_under_a_one_cpu_quota_runs_torch_on_one_thread():
    group = V1_CPU / f"cervixqc-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cpu.cfs_quota_us").write_text(str(int((V1_CPU / "cpu.cfs_period_us").read_text())))
        probe = "import pipelines, torch; print(torch.get_num_threads())"
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        inside = subprocess.run(["sh", "-c", f'echo $$ > {group}/tasks && exec "$0" -c "$1"', sys.executable, probe],
                                capture_output=True, text=True, env=env, timeout=120)
        outside = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
        assert inside.stdout.strip() == "1", inside.stderr[-2000:]
        assert int(outside.stdout.strip()) >= 2, outside.stderr[-2000:]
        given = subprocess.run(["sh", "-c", f'echo $$ > {group}/tasks && exec "$0" -c "$1"', sys.executable, probe],
                               capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "2"}, timeout=120)
        assert given.stdout.strip() == "2"  # the environment's own setting wins
    finally:
        group.rmdir()
