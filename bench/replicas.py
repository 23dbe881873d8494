"""Parley server processes on loopback, for benchmarks and scale-out tests."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.cpus import pinned_to


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(port: int, timeout: float = 120.0) -> None:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server on port {port} did not become SERVING within {timeout:.0f} s")


@contextlib.contextmanager
def replicas(repository: Path, count: int, threads: int, *flags: str,
             cpus: list[int] | None = None) -> Iterator[list[tuple[int, int]]]:
    """Start `count` servers (on `cpus`; None: any); yields their (gRPC port, metrics port)
    pairs once all are SERVING."""
    ports = [(free_port(), free_port()) for _ in range(count)]
    processes = [subprocess.Popen([sys.executable, "-m", "server", "--model-repository", str(repository),
                                   "--host", "127.0.0.1", "--port", str(grpc_port), "--metrics-port", str(metrics_port),
                                   "--threads", str(threads), "--log-level", "warning", *flags],
                                  preexec_fn=pinned_to(cpus))
                 for grpc_port, metrics_port in ports]
    try:
        for grpc_port, _ in ports:
            wait_until_serving(grpc_port)
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(60)


def round_robin_target(ports: list[tuple[int, int]]) -> str:
    return "ipv4:" + ",".join(f"127.0.0.1:{grpc_port}" for grpc_port, _ in ports)
