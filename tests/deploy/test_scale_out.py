"""Several Parley processes behind one gRPC channel with client-side round_robin balancing."""

import re
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from parley.v1 import translate_pb2 as pb
from parley.v1 import translate_pb2_grpc as pb_grpc

REPLICAS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(port: int, timeout: float = 60.0) -> None:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            time.sleep(0.2)
    raise TimeoutError(f"replica on port {port} did not become SERVING")


@pytest.fixture
def replicas(tiny_package):
    ports = [(free_port(), free_port()) for _ in range(REPLICAS)]
    processes = [subprocess.Popen([sys.executable, "-m", "server", "--model-repository", str(tiny_package),
                                   "--host", "127.0.0.1", "--port", str(grpc_port), "--metrics-port", str(metrics_port),
                                   "--threads", "1", "--log-level", "warning"])
                 for grpc_port, metrics_port in ports]
    try:
        for grpc_port, _ in ports:
            wait_serving(grpc_port)
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)


def translated_by(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    match = re.search(r'parley_requests_total\{code="OK",method="Translate",model="tiny"\} (\S+)', text)
    return float(match.group(1)) if match else 0.0


def test_round_robin_spreads_load_over_replicas(replicas):
    target = "ipv4:" + ",".join(f"127.0.0.1:{grpc_port}" for grpc_port, _ in replicas)
    channel = grpc.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")])
    stub = pb_grpc.TranslatorStub(channel)
    calls = 30
    for i in range(calls):
        stub.Translate(pb.TranslateRequest(texts=[f"A dog number {i}."], options=pb.DecodingOptions(beam_size=1)),
                       timeout=30)
    served = [translated_by(metrics_port) for _, metrics_port in replicas]
    assert sum(served) == calls
    assert min(served) >= calls / REPLICAS - 2, f"load was not spread: {served}"
