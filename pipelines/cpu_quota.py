"""The CPUs a container's CFS quota grants this process (`docker run --cpus`, compose `cpus:`,
Kubernetes CPU limits), from its cgroup: v2's cpu.max, v1's cpu.cfs_quota_us / period.

Why: torch (and OpenVINO, which the engine gives torch's count) starts one thread per core it
can be scheduled on, and a quota does not narrow that. A container given 2 CPUs on a 32-core
host ran 32 threads that the kernel throttled in turn. Measured on this 2-core machine in a
cgroup v1 with a quota of one CPU, the bundled weights over 96 synthetic photos (best of 3
rounds, two runs each): torch's own 2 threads 3.25 / 3.11 s, `--threads 1` 1.90 / 2.03 s,
and with this module's default 1.89 / 2.25 s. Standard library only: it runs before torch
loads (pipelines/__init__.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path


def quota_cpus(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The tightest quota of the process's cgroup and its ancestors, in CPUs; None without one
    (or where the files cannot be read)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    found: list[float] = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":  # v2
            found += _up_from(root, path, _v2)
        elif "cpu" in controllers.split(","):  # v1: mounted under the controllers' names
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if mount.is_dir():
                    found += _up_from(mount, path, _v1)
                    break
    return min(found) if found else None


def quota_threads(cpus: float | None) -> int | None:
    """Threads for a quota of `cpus` (1.5 CPUs: 2), None without one."""
    return None if cpus is None else max(1, math.ceil(cpus - 1e-9))


def _up_from(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The quota at each level from the process's cgroup up to the mount's root. In a container
    the mount's root is the container's own cgroup while /proc/self/cgroup may name the host's
    path, which is then not there: the root's file still holds the container's quota."""
    parts = [p for p in path.split("/") if p and p != ".."]
    return [q for i in range(len(parts), -1, -1) if (q := read(mount.joinpath(*parts[:i]))) is not None]


def _v2(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" or int(period) <= 0 else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period
