"""A real Parley server on a loopback port, in a thread with its own event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Callable

import grpc
import pytest

from parley.v1 import translate_pb2 as pb
from parley.v1 import translate_pb2_grpc as pb_grpc
from server.app import ParleyServer
from server.config import ServerConfig


class RunningServer:
    def __init__(self, config: ServerConfig):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ParleyServer(config)
        self.call(self.server.start(), timeout=60)
        self.address = f"127.0.0.1:{self.server.port}"

    def call(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop_soon(self):
        """Begin a graceful stop; returns a concurrent future for its end."""
        return asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop)

    def stub(self) -> pb_grpc.TranslatorStub:
        return pb_grpc.TranslatorStub(grpc.insecure_channel(self.address))

    def scheduler(self):
        return next(iter(self.server.registry)).scheduler

    def metrics_text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.server.metrics.registry).decode()

    def close(self):
        self.call(self.server.stop(), timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def wait_until(condition: Callable[[], object], failure: str, seconds: float = 10) -> None:
    """Poll until condition() holds; fail the test with `failure` if it does not within `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.005)


def server_config(package, **overrides) -> ServerConfig:
    values = dict(host="127.0.0.1", port=0, metrics_port=0, model_repository=package, log_format="text",
                  max_queue_delay_ms=20.0, grace_period_s=10.0, default_beam_size=1)
    values.update(overrides)
    return ServerConfig(**values)


@pytest.fixture(scope="module")
def running(tiny_package):
    server = RunningServer(server_config(tiny_package))
    yield server
    server.close()


@pytest.fixture
def start_server(tiny_package):
    """Start a server with particular settings; stopped at the end of the test."""
    started = []

    def start(**overrides) -> RunningServer:
        started.append(RunningServer(server_config(tiny_package, **overrides)))
        return started[-1]

    yield start
    for server in started:
        server.close()


def request(*texts, **options) -> pb.TranslateRequest:
    model = options.pop("model", "")
    return pb.TranslateRequest(texts=list(texts), model=model, options=pb.DecodingOptions(**options))


def dataclass_replace(config, **changes):
    return dataclasses.replace(config, **changes)
