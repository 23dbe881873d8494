"""How many CPUs this process may use, which sizes ONNX Runtime's thread pools when no
thread count is set.

os.cpu_count() is the machine's count. A process confined by CPU affinity (taskset,
cpusets) or by a cgroup CPU quota (docker --cpus, a Kubernetes CPU limit, systemd's
CPUQuota) that sized its pools from it would run more spinning threads than it has CPUs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_budget(cgroup_root: Path = CGROUP_ROOT, own_cgroups: Path = Path("/proc/self/cgroup")) -> int | None:
    """The CPUs this process may use, or None where nothing limits it below the machine's."""
    limits = [len(os.sched_getaffinity(0))]
    quota = cgroup_quota(cgroup_root, own_cgroups)
    if quota is not None:
        limits.append(quota)
    budget, machine = min(limits), os.cpu_count()
    return budget if machine is None or budget < machine else None


def oversubscription_warning(lanes: int, threads_per_lane: int, device: str) -> str | None:
    """What to tell an operator whose lanes and threads outnumber the CPUs this process may use:
    they take turns on them (measured, 2 CPUs, greedy offline: 3 or 4 single-thread lanes 481
    and 422 sentences/s against 785 for 2)."""
    cpus = cpu_budget() or os.cpu_count()
    if device != "cpu" or not cpus or lanes * threads_per_lane <= cpus:
        return None
    return (f"{lanes} lanes x {threads_per_lane} = {lanes * threads_per_lane} decode threads on {cpus} CPUs: they "
            f"take turns and decode slower than {cpus} would; set --lanes and --threads so that lanes x threads "
            f"<= {cpus}")


def cgroup_quota(root: Path, own_cgroups: Path) -> int | None:
    """The tightest CPU quota on this process's cgroup and its ancestors, in whole CPUs
    rounded up (1.5 CPUs: 2); None without one. cgroup v2: cpu.max ("max" or "QUOTA
    PERIOD"); v1: cpu.cfs_quota_us (-1 for none) over cpu.cfs_period_us."""
    quotas = []
    for directory in _own_directories(root, own_cgroups):
        quota, period = _read_quota(directory)
        if quota is not None and quota > 0 and period:
            quotas.append(math.ceil(quota / period))
    return max(1, min(quotas)) if quotas else None


def _own_directories(root: Path, own_cgroups: Path) -> list[Path]:
    """This process's cgroup directories that can hold a CPU quota, from its own up to the
    root of each hierarchy (in a container with its own cgroup namespace, the container's;
    where a listed directory is not mounted, the walk still reaches the root)."""
    try:
        lines = own_cgroups.read_text().splitlines()
    except OSError:
        lines = []
    leaves = [(root, "/"), (root / "cpu", "/")]
    for line in lines:  # "0::/system.slice/x.service" (v2), "4:cpu,cpuacct:/docker/abc" (v1)
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            leaves.append((root, path))
        elif "cpu" in controllers.split(","):
            leaves.append((root / "cpu", path))
    directories = []
    for base, path in leaves:
        parts = PurePosixPath(path).parts[1:]
        for depth in range(len(parts), -1, -1):
            directory = base.joinpath(*parts[:depth])
            if directory not in directories:
                directories.append(directory)
    return directories


def _read_quota(directory: Path) -> tuple[int | None, int | None]:
    try:
        quota, period = (directory / "cpu.max").read_text().split()
        return (None if quota == "max" else int(quota)), int(period)
    except (OSError, ValueError):
        pass
    try:
        return int((directory / "cpu.cfs_quota_us").read_text()), int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None, None
