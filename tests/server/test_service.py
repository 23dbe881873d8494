"""The Translator service end to end: a real server, a real gRPC client."""

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import server.app
import server.engine.session
import server.models
import server.requests
from bench.replicas import free_port, wait_until_serving
from parley.v1 import translate_pb2 as pb
from parley.v1 import translate_pb2_grpc as pb_grpc
from server.app import ParleyServer
from server.metrics import Metrics
from server.models import load_models
from tests.server.conftest import RunningServer, request, server_config, wait_until

TEXTS = ["A man is riding a bike.", "Two dogs play in the snow.", "A woman in a red dress walks down a busy street."]


def test_one_and_many_texts_in_request_order(running):
    stub = running.stub()
    together = stub.Translate(request(*TEXTS, "", beam_size=2, num_hypotheses=2))
    assert together.model == "tiny"
    assert [t.index for t in together.translations] == [0, 1, 2, 3]
    for i, text in enumerate(TEXTS):
        alone = stub.Translate(request(text, beam_size=2, num_hypotheses=2)).translations[0]
        assert [h.text for h in together.translations[i].hypotheses] == [h.text for h in alone.hypotheses]
        scores = [h.score for h in alone.hypotheses]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True)
        assert all(h.token_count > 0 for h in alone.hypotheses)
    empty = together.translations[3].hypotheses
    assert [(h.text, h.token_count) for h in empty] == [("", 0)]


def test_concurrent_clients_get_sequential_results_and_are_batched(running):
    stub = running.stub()
    texts = [TEXTS[i % 3] + " ok" * (i % 4) for i in range(64)]
    sequential = [stub.Translate(request(t, beam_size=1 + i % 3)).translations[0].hypotheses[0].text
                  for i, t in enumerate(texts)]
    before = step_totals(running)
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        calls = [pool.submit(running.stub().Translate, request(t, beam_size=1 + i % 3)) for i, t in enumerate(texts)]
        concurrent_results = [c.result().translations[0].hypotheses[0].text for c in calls]
    assert concurrent_results == sequential
    steps, rows, timed_steps, seconds = (a - b for a, b in zip(step_totals(running), before))
    assert rows / steps > 4, f"{rows} rows over {steps} engine steps: concurrent calls were not batched"
    assert timed_steps == steps and 0 < seconds / steps < 1.0  # every step timed too


def step_totals(server):
    """Engine steps and their rows so far, and the steps timed and their seconds."""
    text = server.metrics_text()
    return [float(re.search(rf'parley_{metric}_{part}\{{model="tiny"\}} (\S+)', text).group(1))
            for metric in ("batch_size", "step_duration_seconds") for part in ("count", "sum")]


def test_stream_sends_every_text_once_as_it_finishes(running):
    stub = running.stub()
    texts = TEXTS + ["", "Hello."]
    unary = stub.Translate(request(*texts, beam_size=2))
    streamed = list(stub.TranslateStream(request(*texts, beam_size=2)))
    assert all(len(r.translations) == 1 for r in streamed)
    by_index = {r.translations[0].index: r.translations[0] for r in streamed}
    assert sorted(by_index) == list(range(len(texts)))
    for t in unary.translations:
        assert by_index[t.index].hypotheses[0].text == t.hypotheses[0].text
    assert streamed[0].translations[0].index == 3  # the empty text is answered first


def test_list_models(running):
    models = running.stub().ListModels(pb.ListModelsRequest()).models
    assert [(m.name, m.is_default, m.precision, m.device) for m in models] == [("tiny", True, "int8", "cpu")]
    assert models[0].max_input_tokens == 63 and models[0].max_output_tokens == 63


@pytest.mark.parametrize("bad,code,message", [
    (request(), "INVALID_ARGUMENT", "texts is empty"),
    (request(*["x"] * 65), "INVALID_ARGUMENT", "65 texts in one request; the limit is 64"),
    (request("word " * 80), "INVALID_ARGUMENT", "text 0 has"),
    (request("x", beam_size=9), "INVALID_ARGUMENT", "beam_size 9 exceeds the maximum of 8"),
    (request("x", beam_size=2, num_hypotheses=3), "INVALID_ARGUMENT", "num_hypotheses 3 exceeds beam_size 2"),
    (request("x", length_penalty=-1.0), "INVALID_ARGUMENT", "length_penalty must be between 0 and 10"),
    (request("x", length_penalty=float("nan")), "INVALID_ARGUMENT", "length_penalty"),
    (request("x", max_output_tokens=1000), "INVALID_ARGUMENT", "max_output_tokens 1000 exceeds the limit of 63"),
    (request("x", max_output_tokens=5, min_output_tokens=6), "INVALID_ARGUMENT", "min_output_tokens 6 exceeds"),
    (request("x", model="klingon"), "NOT_FOUND", "no model named 'klingon'; this server has: tiny"),
    (pb.TranslateRequest(texts=["x"], source_language="fr", target_language="de"), "NOT_FOUND",
     "no model translates fr->de"),
    (pb.TranslateRequest(texts=["x"], model="tiny", source_language="fr"), "INVALID_ARGUMENT",
     "model 'tiny' translates en->de, not fr->*"),
])
def test_bad_requests_get_a_clear_status(running, bad, code, message):
    with pytest.raises(grpc.RpcError) as error:
        running.stub().Translate(bad)
    assert error.value.code().name == code
    assert message in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        list(running.stub().TranslateStream(bad))
    assert error.value.code().name == code


@pytest.mark.parametrize("method,data,message", [
    ("Translate", b"\x0a\x03\xff\xfe\xfd", "parley.v1.TranslateRequest: Error parsing message"),  # texts[0] not UTF-8
    ("TranslateStream", b"\xff\xff\xff", "parley.v1.TranslateRequest"),
    ("ListModels", b"\x0a", "parley.v1.ListModelsRequest"),
])
def test_a_request_that_does_not_parse_is_invalid_argument(start_server, method, data, message):
    server = start_server()
    channel = grpc.insecure_channel(server.address)
    call = (channel.unary_stream if method == "TranslateStream" else channel.unary_unary)(f"/parley.v1.Translator/{method}")
    with pytest.raises(grpc.RpcError) as error:
        response = call(data)
        list(response) if method == "TranslateStream" else response
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details() and "strings must be UTF-8" in error.value.details()
    assert f'parley_requests_total{{code="INVALID_ARGUMENT",method="{method}",model="unknown"}} 1.0' in server.metrics_text()
    assert server.stub().Translate(request("A dog.")).translations  # the server goes on


def test_large_requests_are_tokenized_off_the_event_loop(running, monkeypatch):
    import server.servicer

    threads = []

    def validate(*args):
        threads.append(threading.current_thread() is running.thread)
        return server.requests.validate(*args)

    monkeypatch.setattr(server.servicer, "validate", validate)
    small = running.stub().Translate(request("A dog."))
    padded = "A dog." + " " * (server.servicer.OFF_LOOP_CHARS // 4)  # whitespace adds no tokens
    large = running.stub().Translate(request(*[padded] * 8))
    assert threads == [True, False]  # on the event loop's thread, then on another
    assert [t.hypotheses[0].text for t in large.translations] == [small.translations[0].hypotheses[0].text] * 8


def test_debug_logs_one_line_per_call(running, caplog):
    with caplog.at_level("DEBUG", logger="parley.rpc"):
        running.stub().Translate(request("A dog."))
        with pytest.raises(grpc.RpcError):
            running.stub().Translate(request())
    calls = [(r.method, r.model, r.code) for r in caplog.records if r.name == "parley.rpc" and r.message == "call"]
    assert calls == [("Translate", "tiny", "OK"), ("Translate", "unknown", "INVALID_ARGUMENT")]


def test_over_limit_message_names_the_limit(running):
    with pytest.raises(grpc.RpcError) as error:
        running.stub().Translate(request("fine", "word " * 80))
    assert re.search(r"text 1 has \d+ tokens; the limit is 63 tokens per text", error.value.details())


def test_language_pair_selects_the_model(running):
    response = running.stub().Translate(pb.TranslateRequest(texts=["A dog."], source_language="en",
                                                            target_language="de"))
    assert response.model == "tiny"


def test_a_repository_whose_names_clash_or_lack_the_default_is_refused_before_any_lane_starts(
        tiny_package, tmp_path, monkeypatch):
    def no_engine(*args, **kwargs):
        raise AssertionError("an engine started before the repository was checked")

    monkeypatch.setattr(server.models, "LaneEngine", no_engine)
    for directory in ("a", "b"):
        shutil.copytree(tiny_package, tmp_path / "twins" / directory)
    with pytest.raises(ValueError, match="model names must be unique in .*twins: 'tiny' names a and b"):
        load_models(server_config(tmp_path / "twins"), Metrics())
    with pytest.raises(ValueError, match="default model 'fr-en' is not in .* \\(has tiny\\)"):
        load_models(server_config(tiny_package, default_model="fr-en"), Metrics())


def test_a_repository_of_two_models_serves_each_by_name_language_and_default(tiny_package, tmp_path):
    repository = tmp_path / "models"
    for name, source, target in (("en-de", "en", "de"), ("de-en", "de", "en")):
        shutil.copytree(tiny_package, repository / name)
        manifest = json.loads((repository / name / "manifest.json").read_text())
        manifest.update(name=name, source_language=source, target_language=target)
        (repository / name / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="default model 'fr-en' is not in .* \\(has de-en, en-de\\)"):
        RunningServer(server_config(repository, lanes=1, default_model="fr-en"))
    server = RunningServer(server_config(repository, lanes=1, default_model="en-de"))
    try:
        stub = server.stub()
        models = stub.ListModels(pb.ListModelsRequest()).models
        assert sorted((m.name, m.source_language, m.is_default) for m in models) == \
            [("de-en", "de", False), ("en-de", "en", True)]
        served_by = [stub.Translate(pb.TranslateRequest(texts=["Ein Hund."], **fields)).model for fields in (
            {}, {"model": "de-en"}, {"source_language": "de"}, {"target_language": "en"}, {"target_language": "de"})]
        assert served_by == ["en-de", "de-en", "de-en", "de-en", "en-de"]
        with pytest.raises(grpc.RpcError) as error:
            stub.Translate(pb.TranslateRequest(texts=["x"], model="de-en", target_language="de"))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "model 'de-en' translates de->en, not *->de" in error.value.details()
    finally:
        server.close()


def long_request(n=8, beam_size=4):
    return request(*[f"{TEXTS[2]} {i}" for i in range(n)], beam_size=beam_size, min_output_tokens=60,
                   max_output_tokens=63)


def wait_until_idle(server, failure: str, seconds: float = 10) -> None:
    scheduler = server.scheduler()
    wait_until(lambda: not scheduler.texts_in_flight, failure, seconds)


def test_deadline_frees_the_batch(start_server):
    server = start_server()
    with pytest.raises(grpc.RpcError) as error:
        server.stub().Translate(long_request(64, beam_size=8), timeout=0.05)  # 512 rows: several batches
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until_idle(server, "rows of an expired request are still decoding")
    assert server.stub().Translate(request("Still here.")).translations[0].hypotheses
    assert 'parley_requests_total{code="DEADLINE_EXCEEDED",method="Translate",model="tiny"} 1.0' in \
        server.metrics_text()  # gRPC ends an expired call as it ends a cancelled one: counted as expired


def test_queued_texts_whose_deadline_passes_are_dropped(start_server):
    server = start_server(lanes=1, max_batch_rows=8)  # one lane takes one beam-8 text at a time
    with pytest.raises(grpc.RpcError) as error:  # 64 texts, one after the other: seconds of work
        server.stub().Translate(long_request(64, beam_size=8), timeout=0.1)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until_idle(server, "texts of an expired request are still queued or decoding")
    assert 'code="DEADLINE_EXCEEDED"' in server.metrics_text()
    assert server.stub().Translate(request("Still here.")).translations[0].hypotheses


def test_cancellation_frees_the_batch(running):
    call = running.stub().Translate.future(long_request(64, beam_size=8))  # 512 rows: several batches
    # cancelled once the server works on it
    wait_until(lambda: running.scheduler().texts_in_flight, "the request never reached the scheduler")
    assert call.cancel()
    wait_until_idle(running, "rows of a cancelled request are still decoding")
    assert 'code="CANCELLED",method="Translate"' in running.metrics_text()


def test_a_stream_the_client_cancels_frees_the_batch_and_is_counted_cancelled(start_server, caplog):
    server = start_server()
    stream = server.stub().TranslateStream(long_request(64, beam_size=8))  # 512 rows: several batches
    next(stream)  # the first text's answer; most others still waiting or decoding
    stream.cancel()
    wait_until_idle(server, "rows of a cancelled stream are still decoding")
    counted = 'parley_requests_total{code="CANCELLED",method="TranslateStream",model="tiny"} 1.0'
    # the handler sees the cancellation at its next step
    wait_until(lambda: counted in server.metrics_text(), "the stream's cancellation was never counted")
    assert 'code="INTERNAL"' not in server.metrics_text()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_full_queue_is_resource_exhausted(start_server):
    server = start_server(queue_limit=4, max_texts_per_request=8)
    with pytest.raises(grpc.RpcError) as error:
        server.stub().Translate(request(*["a b c"] * 5))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit 4" in error.value.details()


def connectivity_states(channel: grpc.Channel) -> list:
    """The channel's connectivity states from now on, as gRPC reports them."""
    seen = []
    channel.subscribe(seen.append)
    return seen


def test_connections_are_closed_after_the_max_age_without_failing_a_call(start_server, running):
    aged = start_server(max_connection_age_s=0.3)
    for server, recycled in ((aged, True), (running, False)):
        with grpc.insecure_channel(server.address) as channel:
            states = connectivity_states(channel)
            stub = pb_grpc.TranslatorStub(channel)
            assert stub.Translate(request("A dog runs."), timeout=30).translations[0].hypotheses
            wait_until(lambda: grpc.ChannelConnectivity.READY in states, "the channel never connected")
            time.sleep(1.5)
            # The server's GOAWAY sends the client back to IDLE: its next call connects anew,
            # and a round_robin client resolves the Service's name again first.
            assert (grpc.ChannelConnectivity.IDLE in states[states.index(grpc.ChannelConnectivity.READY):]) \
                == recycled
            assert stub.Translate(request("A dog runs."), timeout=30).translations[0].hypotheses


def test_clients_keepalive_pings_are_permitted_when_configured(start_server, running):
    permitting = start_server(min_client_ping_interval_s=0.2)
    # An idle client keeping its connection open with a ping a second (gRPC's shortest interval).
    pinging = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]
    channels = {permitted: grpc.insecure_channel(server.address, options=pinging)
                for server, permitted in ((permitting, True), (running, False))}
    states = {permitted: connectivity_states(channel) for permitted, channel in channels.items()}
    for channel in channels.values():
        assert pb_grpc.TranslatorStub(channel).Translate(request("A dog runs."), timeout=30).translations
    for seen in states.values():
        wait_until(lambda: grpc.ChannelConnectivity.READY in seen, "the channel never connected")
    time.sleep(4.5)
    for permitted, seen in states.items():
        # gRPC's default policy answers the third early ping (~3 s) with GOAWAY too_many_pings:
        # the connection the pings kept open drops to IDLE.
        dropped = grpc.ChannelConnectivity.IDLE in seen[seen.index(grpc.ChannelConnectivity.READY):]
        assert dropped != permitted, f"permitted {permitted}: {seen}"
        channels[permitted].close()


def test_health_and_graceful_shutdown_drain_in_flight_work(start_server):
    server = start_server()
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    for service in ("", "parley.v1.Translator"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    stub = server.stub()
    in_flight = [stub.Translate.future(long_request(16)) for _ in range(32)]  # 2,048 rows: several batches per lane
    wait_until_accepted(server.metrics_text, 32)
    assert not all(call.done() for call in in_flight)
    stopping = server.stop_soon()
    wait_until(lambda: server.server.servicer.draining, "the server never began to drain")
    with pytest.raises(grpc.RpcError) as error:
        server.stub().Translate(request("too late"))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    for call in in_flight:
        assert len(call.result(timeout=30).translations) == 16
    stopping.result(30)


def wait_until_accepted(metrics_text, calls: int, seconds: float = 10):
    """Until the server has accepted `calls` calls (in flight or answered): a call sent but not
    yet accepted when the server starts to stop is rightly refused."""
    def accepted() -> float:
        samples = [sample for family in text_string_to_metric_families(metrics_text()) for sample in family.samples]
        return sum(value for name, labels, value, *_ in samples if labels.get("model") == "tiny" and
                   name in ("parley_inflight_requests", "parley_requests_total"))

    wait_until(lambda: accepted() >= calls, f"{calls} calls were not all accepted within {seconds} s", seconds)


@pytest.mark.parametrize("ending", ["grace period over", "second stop"])
def test_calls_cut_off_by_the_end_of_the_grace_period_are_answered_unavailable_with_the_reason(start_server,
                                                                                               ending):
    server = start_server(grace_period_s=0.0 if ending == "grace period over" else 60.0)
    stub = server.stub()
    in_flight = [stub.Translate.future(long_request(16)) for _ in range(32)]
    wait_until_accepted(server.metrics_text, 32)
    started = time.monotonic()
    stopping = server.stop_soon()
    if ending == "second stop":
        time.sleep(0.1)
        server.call(server.server.stop(now=True))
    stopping.result(30)
    assert time.monotonic() - started < 20  # far less than the 60 s grace period
    codes = []
    for call in in_flight:
        try:
            codes.append(("OK", len(call.result(timeout=10).translations)))
        except grpc.RpcError as error:
            codes.append((error.code().name, error.details()))
    unavailable = [c for c in codes if c[0] == "UNAVAILABLE"]
    assert unavailable and set(codes) - set(unavailable) <= {("OK", 16)}
    assert {details for _, details in unavailable} == {"the server stopped before this text was translated; "
                                                       "retry on another replica"}


def test_the_log_says_how_many_threads_each_lane_got(start_server, caplog):
    with caplog.at_level(logging.INFO, logger="parley.models"):
        start_server(lanes=2, threads=4)
    loaded = next(r for r in caplog.records if r.getMessage() == "loaded model")
    assert (loaded.lanes, loaded.threads_per_lane) == (2, 2)


def test_a_lane_that_dies_fails_its_texts_and_is_restarted(start_server):
    server = start_server(lanes=1)
    stub, scheduler = server.stub(), server.scheduler()
    lane = scheduler.engine.lanes[0]
    dead_pid = lane.process.pid
    os.kill(dead_pid, signal.SIGSTOP)  # frozen: the text is sent to it and stays there
    call = stub.Translate.future(request("Lost in a crash."), timeout=30)
    wait_until(lambda: scheduler._active[0], "the text never reached the lane")
    os.kill(dead_pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as error:
        call.result()
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert "decode lane stopped unexpectedly" in error.value.details()
    assert stub.Translate(request("Served again."), timeout=30).translations[0].hypotheses  # after the restart
    assert lane.process.pid != dead_pid and lane.process.is_alive()
    metrics = server.metrics_text()
    assert 'parley_lane_failures_total{model="tiny"} 1.0' in metrics
    assert 'parley_running_lanes{model="tiny"} 1.0' in metrics


def test_a_lane_that_stops_reading_never_blocks_the_server(start_server):
    server = start_server(lanes=1, max_batch_rows=4096, max_batch_tokens=400_000)
    stub, scheduler = server.stub(), server.scheduler()
    lane = scheduler.engine.lanes[0]
    os.kill(lane.process.pid, signal.SIGSTOP)  # hung: its pipe fills with texts it does not read
    try:
        calls = [stub.Translate.future(long_request(64, beam_size=1), timeout=3) for _ in range(40)]
        wait_until(lambda: scheduler._pipes[0].unsent, "the pipe to the lane never filled")
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
        started = time.monotonic()
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert stub.ListModels(pb.ListModelsRequest(), timeout=2).models
        assert time.monotonic() - started < 2
    finally:
        os.kill(lane.process.pid, signal.SIGCONT)
    for call in calls:  # each ends, one way or the other
        with contextlib.suppress(grpc.RpcError):
            call.result(timeout=30)
    wait_until_idle(server, "texts are still queued or decoding", 30)
    assert stub.Translate(request("Still here.")).translations[0].hypotheses


def test_a_lane_that_cannot_restart_leaves_the_model_unavailable(tiny_package, tmp_path):
    shutil.copytree(tiny_package, tmp_path / "tiny")
    server = RunningServer(server_config(tmp_path / "tiny", lanes=1))
    try:
        lane = server.scheduler().engine.lanes[0]
        (tmp_path / "tiny" / "int8" / "decoder_step.onnx").write_bytes(b"replaced")  # the restart fails its checksums
        lane.process.kill()
        lane.process.join(10)
        wait_until(lambda: server.scheduler()._lane_states[0] == "failed",
                   "the lane was neither restarted nor given up", 30)
        with pytest.raises(grpc.RpcError) as error:
            server.stub().Translate(request("Nobody to decode this."), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no running decode lane" in error.value.details()
        metrics = server.metrics_text()
        assert 'parley_lane_failures_total{model="tiny"} 1.0' in metrics
        assert 'parley_running_lanes{model="tiny"} 0.0' in metrics
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
        for service in ("", "parley.v1.Translator"):  # readiness takes the replica out, liveness replaces it
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.close()


@pytest.mark.parametrize("stop_signal,signals", [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGINT, 2)],
                         ids=["SIGINT", "SIGTERM", "SIGINT twice"])
def test_a_signal_to_the_process_group_drains_in_flight_work_before_the_lanes_stop(tiny_package, stop_signal,
                                                                                    signals):
    """Ctrl-C (SIGINT), `timeout` and systemd (SIGTERM) signal the server's lane processes too.
    A second signal ends the grace period: what is unfinished is answered UNAVAILABLE."""
    grpc_port, metrics_port = free_port(), free_port()
    process = subprocess.Popen([sys.executable, "-m", "server", "--model-repository", str(tiny_package),
                                "--host", "127.0.0.1", "--port", str(grpc_port), "--metrics-port", str(metrics_port),
                                "--log-level", "warning", "--default-beam-size", "1", "--grace-period-s", "60"],
                               start_new_session=True)
    try:
        wait_until_serving(grpc_port)
        stub = pb_grpc.TranslatorStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
        calls = 8 * signals  # enough work to outlast the second signal
        in_flight = [stub.Translate.future(long_request(16), timeout=60) for _ in range(calls)]
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        wait_until_accepted(lambda: urllib.request.urlopen(metrics_url, timeout=5).read().decode(), calls)
        started = time.monotonic()
        os.killpg(process.pid, stop_signal)
        assert not all(call.done() for call in in_flight)
        if signals == 2:
            time.sleep(0.1)
            os.killpg(process.pid, stop_signal)
        answers = []
        for call in in_flight:
            try:
                answers.append(len(call.result().translations))
            except grpc.RpcError as error:
                answers.append(error.code())
        assert process.wait(60) == 0
        if signals == 1:
            assert answers == [16] * calls
        else:
            assert grpc.StatusCode.UNAVAILABLE in answers and set(answers) <= {16, grpc.StatusCode.UNAVAILABLE}
            assert time.monotonic() - started < 30
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_metrics_count_what_happened(start_server):
    server = start_server()
    stub = server.stub()
    stub.Translate(request("One.", "Two."))
    with pytest.raises(grpc.RpcError):
        stub.Translate(request())
    text = server.metrics_text()
    assert 'parley_requests_total{code="OK",method="Translate",model="tiny"} 1.0' in text
    assert 'parley_requests_total{code="INVALID_ARGUMENT",method="Translate",model="unknown"} 1.0' in text
    assert 'parley_queue_duration_seconds_count{model="tiny"} 2.0' in text
    assert 'parley_model_info{device="cpu",model="tiny",precision="int8",variant="tiny/int8"} 1.0' in text
    input_tokens = float(re.search(r'parley_input_tokens_total\{model="tiny"\} (\S+)', text).group(1))
    assert input_tokens >= 2
    assert 'parley_inflight_requests{model="tiny"} 0.0' in text
    assert 'parley_queue_depth{model="tiny"} 0.0' in text


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (.ci/run installs it)")
def test_metrics_pass_promtool(start_server, tmp_path):
    server = start_server()
    server.stub().Translate(request("One."))
    result = subprocess.run(["promtool", "check", "metrics"], input=server.metrics_text(), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@dataclasses.dataclass
class StartingServer:
    """A server whose start is held in its model load until `release` is set."""

    parley: ParleyServer
    loop: asyncio.AbstractEventLoop
    release: threading.Event
    starting: concurrent.futures.Future

    def run(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)


@pytest.fixture
def starting_server(tiny_package, monkeypatch):
    release = threading.Event()
    real_load = server.app.load_models
    monkeypatch.setattr(server.app, "load_models", lambda *args: (release.wait(30), real_load(*args))[1])
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    parley = ParleyServer(server_config(tiny_package))
    started = StartingServer(parley, loop, release, asyncio.run_coroutine_threadsafe(parley.start(), loop))
    try:
        # the port is open, the models loading
        wait_until(lambda: parley.port is not None and parley.servicer is not None, "the server never opened its port")
        yield started
    finally:
        release.set()
        started.run(parley.stop())
        loop.call_soon_threadsafe(loop.stop)


def test_not_serving_while_models_load(starting_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{starting_server.parley.port}")
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
        health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as error:
        pb_grpc.TranslatorStub(channel).Translate(request("Too early."), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        pb_grpc.TranslatorStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in error.value.details()
    starting_server.release.set()
    starting_server.starting.result(60)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    assert pb_grpc.TranslatorStub(channel).Translate(request("Now."), timeout=10).translations


def test_a_stop_while_models_load_leaves_nothing_running(starting_server):
    parley = starting_server.parley
    starting_server.run(parley.stop(), timeout=30)  # SIGTERM during the load
    starting_server.release.set()
    starting_server.starting.result(60)
    lanes = [lane.process for model in parley.registry or [] for lane in model.engine.lanes]
    assert lanes and all(not process.is_alive() for process in lanes)
    channel = grpc.insecure_channel(f"127.0.0.1:{parley.port}")
    with pytest.raises(grpc.RpcError):  # the port is closed: nothing serves
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)


def test_reflection_lists_the_services(running):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    database = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(running.address))
    services = set(database.get_services())
    assert {"parley.v1.Translator", "grpc.health.v1.Health"} <= services
    methods = [m.name for m in database.FindFileContainingSymbol("parley.v1.Translator").service[0].method]
    assert methods == ["Translate", "TranslateStream", "ListModels"]


@pytest.mark.parametrize("weight_bits,warned", [(8, True), (7, False)])
def test_8_bit_int8_weights_on_a_cpu_without_vnni_are_warned_about(tiny_package, tmp_path, monkeypatch, caplog,
                                                                    weight_bits, warned):
    package = tmp_path / "tiny"
    shutil.copytree(tiny_package, package)
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["variants"]["int8"]["settings"]["int8_weight_bits"] = weight_bits
    (package / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(server.engine.session, "int8_gemm_can_saturate", lambda: True)
    with caplog.at_level("WARNING", logger="parley"):
        RunningServer(server_config(package, precision="int8", lanes=1)).close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "VNNI" in r.getMessage()]
    assert len(warnings) == warned
    assert all("--int8-weight-bits 7" in w and "--precision fp32" in w for w in warnings)
