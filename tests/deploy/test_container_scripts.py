"""The images' build and run steps, exercised outside Docker."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from export.package import ModelPackage
from tests.server.conftest import RunningServer, server_config

DOCKER = Path(__file__).resolve().parents[2] / "deploy" / "docker"


def threads_for(tmp_path, files: dict, **env) -> str:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    result = subprocess.run([str(DOCKER / "entrypoint.sh")], capture_output=True, text=True, check=True,
                            env={**os.environ, "CGROUP_ROOT": str(tmp_path), "PARLEY_PRINT_THREADS": "1", **env})
    return result.stdout.strip()


def test_threads_follow_the_cgroup_v2_quota(tmp_path):
    assert threads_for(tmp_path, {"cpu.max": "150000 100000\n"}) == "2"
    assert threads_for(tmp_path, {"cpu.max": "400000 100000\n"}) == "4"


def test_threads_follow_the_cgroup_v1_quota(tmp_path):
    assert threads_for(tmp_path, {"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}) == "3"


def test_no_quota_means_every_core_and_an_explicit_setting_wins(tmp_path):
    assert threads_for(tmp_path, {"cpu.max": "max 100000\n"}) == str(os.cpu_count())
    assert threads_for(tmp_path, {"cpu.max": "150000 100000\n"}, PARLEY_THREADS="7") == "7"


def test_build_script_exports_the_default_package(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PRECISIONS": "int8"}
    result = subprocess.run([str(DOCKER / "build-package.sh"), str(tmp_path)], capture_output=True, text=True,
                            env=env, cwd=DOCKER.parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    package = ModelPackage.load(tmp_path / "multi30k-en-de")
    assert package.precisions == ["int8"] and package.variant("int8").settings["int8_weight_bits"] == 7
    assert package.variant("int8").settings["activation_scales"] == "static"  # calibrated on Multi30k train


def test_health_check_script(tiny_package):
    server = RunningServer(server_config(tiny_package))
    try:
        env = {**os.environ, "PARLEY_PORT": str(server.server.port)}
        assert subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], env=env).returncode == 0
    finally:
        server.close()
    stopped = subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], env=env, capture_output=True, text=True)
    assert stopped.returncode != 0 and "unhealthy" in stopped.stderr
