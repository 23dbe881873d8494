from pathlib import Path

import pytest

import server.engine.cpu_budget as cpu_budget_module
import server.engine.lanes
from export.package import ModelPackage
from server.engine.cpu_budget import cgroup_quota, cpu_budget, oversubscription_warning
from server.engine.lanes import LaneEngine


def cgroups(root: Path, files: dict[str, str], own: str = "0::/\n") -> tuple[Path, Path]:
    """A cgroup tree under root with these files, and a /proc/self/cgroup naming `own`."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "self-cgroup").write_text(own)
    return root, root / "self-cgroup"


@pytest.mark.parametrize("files,own,cpus", [
    ({"cpu.max": "150000 100000\n"}, "0::/\n", 2),  # 1.5 CPUs round up
    ({"cpu.max": "400000 100000\n"}, "0::/\n", 4),
    ({"cpu.max": "max 100000\n"}, "0::/\n", None),
    # systemd: the service's own cgroup has no quota, its slice has
    ({"system.slice/cpu.max": "300000 100000\n", "system.slice/x.service/cpu.max": "max 100000\n"},
     "0::/system.slice/x.service\n", 3),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, "4:cpu,cpuacct:/\n", 3),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "4:cpu,cpuacct:/\n", None),
    ({}, "0::/\n", None),
])
def test_the_cgroup_quota_is_read_in_whole_cpus(tmp_path, files, own, cpus):
    assert cgroup_quota(*cgroups(tmp_path, files, own)) == cpus


def test_the_budget_is_the_tightest_of_affinity_and_quota_and_none_when_nothing_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_budget_module.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(cpu_budget_module.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cpu_budget(*cgroups(tmp_path / "none", {"cpu.max": "max 100000\n"})) is None
    assert cpu_budget(*cgroups(tmp_path / "quota", {"cpu.max": "200000 100000\n"})) == 2
    monkeypatch.setattr(cpu_budget_module.os, "sched_getaffinity", lambda pid: {0, 1, 2})  # taskset -c 0-2
    assert cpu_budget(*cgroups(tmp_path / "none", {})) == 3
    assert cpu_budget(*cgroups(tmp_path / "quota", {})) == 2


def test_lanes_share_the_budget_when_no_thread_count_is_set(tiny_package, monkeypatch):
    monkeypatch.setattr(server.engine.lanes, "cpu_budget", lambda: 5)
    engine = LaneEngine(ModelPackage.load(tiny_package), precision="int8", device="cpu", lanes=2)
    try:
        assert [lane.spec.threads for lane in engine.lanes] == [2, 2]
    finally:
        engine.close()
    for threads, expected in ((0, 5), (3, 3)):  # a thread count that is set wins
        engine = LaneEngine(ModelPackage.load(tiny_package), precision="int8", device="cpu", threads=threads, lanes=1)
        try:
            assert engine.lanes[0].spec.threads == expected
        finally:
            engine.close()


def test_lanes_and_threads_beyond_the_cpus_are_named(monkeypatch):
    monkeypatch.setattr(cpu_budget_module, "cpu_budget", lambda: 2)
    assert oversubscription_warning(2, 1, "cpu") is None
    assert oversubscription_warning(1, 0, "cpu") is None  # ONNX Runtime's default: a thread per core
    assert oversubscription_warning(4, 1, "cuda") is None  # the lanes' threads wait on the device
    assert oversubscription_warning(3, 1, "cpu") == (
        "3 lanes x 1 = 3 decode threads on 2 CPUs: they take turns and decode slower than 2 would; set --lanes and "
        "--threads so that lanes x threads <= 2")
    monkeypatch.setattr(cpu_budget_module, "cpu_budget", lambda: None)  # nothing limits the process: the machine
    monkeypatch.setattr(cpu_budget_module.os, "cpu_count", lambda: 16)
    assert oversubscription_warning(2, 8, "cpu") is None and "on 16 CPUs" in oversubscription_warning(2, 9, "cpu")
