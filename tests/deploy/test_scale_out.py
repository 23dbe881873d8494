"""Several Parley processes behind one gRPC channel with client-side round_robin balancing."""

import re
import urllib.request

import grpc
import pytest

from bench.replicas import replicas, round_robin_target
from parley.v1 import translate_pb2 as pb
from parley.v1 import translate_pb2_grpc as pb_grpc

REPLICAS = 3


@pytest.fixture
def ports(tiny_package):
    with replicas(tiny_package, REPLICAS, threads=1) as started:
        yield started


def translated_by(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    match = re.search(r'parley_requests_total\{code="OK",method="Translate",model="tiny"\} (\S+)', text)
    return float(match.group(1)) if match else 0.0


def test_round_robin_spreads_load_over_replicas(ports):
    channel = grpc.insecure_channel(round_robin_target(ports), options=[("grpc.lb_policy_name", "round_robin")])
    stub = pb_grpc.TranslatorStub(channel)
    calls = 30
    for i in range(calls):
        stub.Translate(pb.TranslateRequest(texts=[f"A dog number {i}."], options=pb.DecodingOptions(beam_size=1)),
                       timeout=30)
    served = [translated_by(metrics_port) for _, metrics_port in ports]
    assert sum(served) == calls
    assert min(served) >= calls / REPLICAS - 2, f"load was not spread: {served}"
