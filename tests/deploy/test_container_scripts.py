"""The images' build and run steps, exercised outside Docker."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from export.package import ModelPackage
from tests.server.conftest import RunningServer, server_config

DOCKER = Path(__file__).resolve().parents[2] / "deploy" / "docker"


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
