"""make bench-grpc-cost's stand-in server: a Translate call's gRPC work and nothing else."""

import subprocess
import sys
import time

import grpc

from bench.grpc_cost import cpu_seconds
from bench.replicas import free_port, wait_until_serving
from parley.v1 import translate_pb2 as pb
from parley.v1 import translate_pb2_grpc as pb_grpc


def test_the_stand_in_holds_each_call_then_answers_every_text_with_itself():
    port, hold_s = free_port(), 0.3
    server = subprocess.Popen([sys.executable, "-m", "bench.grpc_cost", "--answer", str(port), str(hold_s)])
    try:
        wait_until_serving(port, timeout=60)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            started = time.monotonic()
            response = pb_grpc.TranslatorStub(channel).Translate(
                pb.TranslateRequest(texts=["A dog runs.", "", "Two men talk."]), timeout=30)
            assert time.monotonic() - started >= hold_s
        assert [t.hypotheses[0].text for t in response.translations] == ["A dog runs.", "", "Two men talk."]
        assert cpu_seconds(server.pid) > 0
    finally:
        server.terminate()
        server.wait(30)
