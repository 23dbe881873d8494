import dataclasses
import filecmp
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from bench.load import main as load_main
from bench.load import parser as load_parser
from export.cli import parser as export_parser
from model.evaluate import parser as evaluate_parser
from model.train import parser as train_parser
from parley.v1 import translate_pb2 as pb
from server.client import parser as client_parser
from server.client import stream_all
from server.config import ServerConfig, env_name, parse_config
from server.proto_build import ROOT, generate
from tests.server.conftest import RunningServer, server_config


def test_flags_override_environment_which_overrides_defaults():
    config = parse_config(["--port", "6000"], {"PARLEY_PORT": "5000", "PARLEY_MAX_BATCH_ROWS": "16",
                                               "PARLEY_MODEL_REPOSITORY": "/srv/models", "PARLEY_DEVICE": "cpu"})
    assert (config.port, config.max_batch_rows, config.model_repository, config.device) == \
        (6000, 16, Path("/srv/models"), "cpu")
    assert parse_config([], {}).port == 50051 and parse_config([], {}).metrics_port == 8000


def test_help_gives_each_flags_default_and_what_its_environment_variable_holds_now(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"], {"PARLEY_PORT": "50099", "PARLEY_MODEL_REPOSITORY": "/srv/100%"})
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "gRPC port, default 50051 [PARLEY_PORT=50099]" in text
    assert "directory of model packages, default models [PARLEY_MODEL_REPOSITORY=/srv/100%]" in text
    assert "Prometheus /metrics port (0: off), default 8000 [PARLEY_METRICS_PORT]" in text
    assert "PEM private key [PARLEY_TLS_KEY]" in text  # no default to give


@pytest.mark.parametrize("parser", [client_parser, export_parser, train_parser, evaluate_parser, load_parser],
                         ids=["client", "export", "train", "evaluate", "load"])
def test_every_argument_of_the_command_line_tools_says_what_it_does(parser):
    assert [action.dest for action in parser()._actions if not action.help] == []


@pytest.mark.parametrize("environ,message", [
    ({"PARLEY_PORT": "http"}, "PARLEY_PORT='http' is not a valid port"),
    ({"PARLEY_PORT": "tcp://10.96.0.12:50051"}, "PARLEY_PORT='tcp://10.96.0.12:50051' is not a valid port; "
                                                "Kubernetes sets it for a Service named parley (service links): "
                                                "set enableServiceLinks: false in the pod spec"),
    ({"PARLEY_DEVICE": "tpu"}, "device must be auto, cpu or cuda"),
    ({"PARLEY_TLS_CERT": "cert.pem"}, "tls_cert and tls_key go together"),
    ({"PARLEY_TLS_CERT": "/no/cert.pem", "PARLEY_TLS_KEY": "/no/key.pem"}, "tls_cert /no/cert.pem is not a file"),
    ({"PARLEY_PORT": "70000"}, "port must be between 0 and 65535, got 70000"),
    ({"PARLEY_METRICS_PORT": "-1"}, "metrics_port must be between 0 and 65535, got -1"),
    ({"PARLEY_PORT": "9000", "PARLEY_METRICS_PORT": "9000"}, "port and metrics_port must differ, both are 9000"),
    ({"PARLEY_THREADS": "-2"}, "threads must be >= 0, got -2"),
    ({"PARLEY_GRACE_PERIOD_S": "-1"}, "grace_period_s must be >= 0, got -1.0"),
    ({"PARLEY_MAX_QUEUE_DELAY_MS": "-5"}, "max_queue_delay_ms must be >= 0, got -5.0"),
    ({"PARLEY_LOG_LEVEL": "verbose"}, "log_level must be debug, info, warning or error, got 'verbose'"),
])
def test_bad_configuration_is_explained(environ, message, capsys):
    with pytest.raises(SystemExit):
        parse_config([], environ)
    assert message in capsys.readouterr().err


def test_every_setting_has_an_environment_variable():
    help_text = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True, text=True).stdout
    for name in ("PARLEY_HOST", "PARLEY_PORT", "PARLEY_METRICS_PORT", "PARLEY_MODEL_REPOSITORY",
                 "PARLEY_DEFAULT_MODEL", "PARLEY_DEVICE", "PARLEY_PRECISION", "PARLEY_MAX_BATCH_ROWS",
                 "PARLEY_MAX_BATCH_TOKENS", "PARLEY_MAX_QUEUE_DELAY_MS", "PARLEY_QUEUE_LIMIT",
                 "PARLEY_MAX_TEXTS_PER_REQUEST", "PARLEY_MAX_TOKENS_PER_TEXT", "PARLEY_TLS_CERT", "PARLEY_TLS_KEY",
                 "PARLEY_TLS_CLIENT_CA"):
        assert name in help_text


def test_the_readme_documents_every_setting_with_its_flag_and_variable():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("### Batching")]
    undocumented = [name for f in dataclasses.fields(ServerConfig)
                    for name in (f"--{f.name.replace('_', '-')}", env_name(f.name)) if f"`{name}`" not in table]
    assert undocumented == [], "missing from the README's configuration table"


def test_generated_code_matches_the_proto(tmp_path):
    generate(tmp_path)
    for generated in (tmp_path / "parley" / "v1").iterdir():
        assert filecmp.cmp(generated, ROOT / "parley" / "v1" / generated.name, shallow=False), generated.name


def test_server_refuses_an_empty_repository_and_names_variables_it_ignores(tmp_path):
    environ = {**os.environ, "PARLEY_MAX_BATCH_ROW": "16", "PARLEY_COLOUR": "blue"}
    result = subprocess.run([sys.executable, "-m", "server", "--model-repository", str(tmp_path), "--port", "0",
                             "--metrics-port", "0", "--log-format", "text"], capture_output=True, text=True,
                            timeout=60, env=environ)
    assert result.returncode != 0 and "no model packages in" in result.stderr and "make export" in result.stderr
    assert "ignoring environment variables that name no setting: PARLEY_COLOUR, " \
           "PARLEY_MAX_BATCH_ROW (did you mean PARLEY_MAX_BATCH_ROWS?)" in result.stderr
    configuration = next(line for line in result.stderr.splitlines() if "parley.config: configuration" in line)
    assert f"model_repository={tmp_path} " in configuration and " max_batch_rows=256 " in configuration


def test_server_refuses_a_metrics_port_in_use_before_loading_models(tiny_package):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "server", "--model-repository", str(tiny_package), "--port", "0",
                                 "--metrics-port", str(port)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"parley-server: cannot serve metrics on port {port}: " \
                                                     "Address already in use (set --metrics-port, or 0 for none)"
    assert "loaded model" not in result.stderr


def test_server_refuses_a_grpc_port_in_use_before_loading_models(tiny_package):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "server", "--model-repository", str(tiny_package), "--port",
                                 str(port), "--metrics-port", "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"parley-server: cannot serve gRPC on [::]:{port}: the port is " \
                                                     "in use or the host is not an address of this machine (set " \
                                                     "--port, --host)"
    assert "loaded model" not in result.stderr


def test_client_translates_and_reports_errors(tiny_package):
    server = RunningServer(server_config(tiny_package))
    try:
        client = [sys.executable, "-m", "server.client", "--address", server.address]
        ok = subprocess.run(client + ["--json", "--beam", "2", "--n-best", "2", "A dog runs."], capture_output=True,
                            text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert '"index": 0' in ok.stdout and ok.stdout.count('"score"') == 2
        long = subprocess.run(client + ["--json", "--beam", "1", "--min-output-tokens", "12", "A dog runs."],
                              capture_output=True, text=True, timeout=60)
        assert long.returncode == 0, long.stderr
        assert json.loads(long.stdout)["hypotheses"][0]["tokens"] >= 12
        streamed = subprocess.run(client + ["--stream"], input="One.\nTwo.\n", capture_output=True, text=True,
                                  timeout=60)
        assert streamed.returncode == 0 and len(streamed.stdout.splitlines()) == 2
        listed = subprocess.run(client + ["--list-models"], capture_output=True, text=True, timeout=60)
        assert "tiny (default): en->de int8 on cpu" in listed.stdout
        bad = subprocess.run(client + ["--beam", "99", "x"], capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "INVALID_ARGUMENT: beam_size 99 exceeds the maximum of 8" in bad.stderr
        negative = subprocess.run(client + ["--beam", "-1", "x"], capture_output=True, text=True, timeout=60)
        assert negative.returncode == 2 and "argument --beam: must be >= 0, got -1" in negative.stderr
        no_ca = subprocess.run(client + ["--tls-ca", "/no/ca.pem", "x"], capture_output=True, text=True, timeout=60)
        assert no_ca.returncode == 2 and "cannot read /no/ca.pem: No such file or directory" in no_ca.stderr
        nothing = subprocess.run(client, input="", capture_output=True, text=True, timeout=60)
        assert nothing.returncode == 2 and "no texts: give them as arguments, or one a line" in nothing.stderr
    finally:
        server.close()


def test_client_sends_a_file_in_requests_and_prints_it_in_order(tiny_package):
    """More lines than one request may hold (the server's max_texts_per_request) go in several,
    some in flight together; the translations come out in the file's order."""
    server = RunningServer(server_config(tiny_package, max_texts_per_request=3))
    try:
        client = [sys.executable, "-m", "server.client", "--address", server.address, "--json", "--beam", "1"]
        lines = [f"A dog runs {i} times." for i in range(11)]
        whole = subprocess.run(client, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=60)
        assert whole.returncode == 1  # one request of the default 64 texts at most: the server takes 3
        assert whole.stderr.strip() == "error: INVALID_ARGUMENT: 11 texts in one request; the limit is 3 (split the " \
                                       "request) (lower --texts-per-request)"
        for flags in (["--texts-per-request", "3", "--parallel", "2"], ["--texts-per-request", "3", "--stream"]):
            result = subprocess.run(client + flags, input="\n".join(lines) + "\n", capture_output=True, text=True,
                                    timeout=60)
            assert result.returncode == 0, result.stderr
            printed = [json.loads(line) for line in result.stdout.splitlines()]
            assert sorted((p["index"], p["source"]) for p in printed) == list(enumerate(lines))
            if "--stream" not in flags:
                assert [p["index"] for p in printed] == list(range(11))

        too_long = lines[:4] + [" ".join(["dog"] * 400)] + lines[5:]
        failed = subprocess.run(client + ["--texts-per-request", "3"], input="\n".join(too_long) + "\n",
                                capture_output=True, text=True, timeout=60)
        assert failed.returncode == 1
        assert "error: texts 3-5 (one request): INVALID_ARGUMENT: text 1 has" in failed.stderr
        assert [json.loads(line)["index"] for line in failed.stdout.splitlines()] == [0, 1, 2]
        zero = subprocess.run(client + ["--parallel", "0", "x"], capture_output=True, text=True, timeout=60)
        assert zero.returncode == 2 and "argument --parallel: must be >= 1, got 0" in zero.stderr
    finally:
        server.close()


class FakeStream:
    """A streaming call's answer: one translation per text of its chunk, or an error."""

    def __init__(self, chunk: range, wait: threading.Barrier | threading.Event | None = None, error: bool = False):
        self.chunk, self.wait, self.error, self.cancelled = chunk, wait, error, False

    def __iter__(self):
        if self.wait:
            self.wait.wait()
        if self.error:
            raise FakeRpcError()
        for index in range(len(self.chunk)):
            yield pb.TranslateResponse(translations=[pb.Translation(index=index)])

    def cancel(self):
        self.cancelled = True


class FakeRpcError(grpc.RpcError):
    pass


def test_client_streams_parallel_requests_at_once_and_shows_every_text():
    chunks = [range(0, 2), range(2, 4), range(4, 5)]
    both_open = threading.Barrier(2, timeout=10)  # the first two answer only once both are open
    shown = []
    failure = stream_all(chunks, lambda chunk: FakeStream(chunk, both_open if chunk.start < 4 else None), 2,
                         lambda chunk, translation: shown.append(chunk.start + translation.index))
    assert failure is None and sorted(shown) == [0, 1, 2, 3, 4]


def test_client_stops_streaming_at_the_first_failed_request_and_cancels_the_others():
    chunks = [range(0, 2), range(2, 4), range(4, 5)]
    calls = {}
    hold = threading.Event()

    def open_stream(chunk):  # the first stream is still open when the second fails
        calls[chunk.start] = FakeStream(chunk, wait=hold if chunk.start == 0 else None, error=chunk.start == 2)
        return calls[chunk.start]

    failure = stream_all(chunks, open_stream, 2, lambda chunk, translation: None)
    hold.set()
    assert failure[0] == range(2, 4) and isinstance(failure[1], FakeRpcError)
    assert calls[0].cancelled and 4 not in calls  # the third request is never sent


@pytest.mark.parametrize("flags,message", [
    (["--concurrency", "0"], "argument --concurrency: must be >= 1, got 0"),
    (["--requests", "-1"], "argument --requests: must be >= 1, got -1"),
    (["--texts-per-request", "1,0"], "--texts-per-request: every value must be >= 1, got '1,0'"),
    (["--beam", "1,x"], "--beam: expected comma-separated whole numbers, e.g. 1,4; got '1,x'"),
    (["--duration", "0"], "--duration must be positive, got 0.0"),
])
def test_load_generator_refuses_what_it_cannot_send(flags, message, capsys):
    with pytest.raises(SystemExit):
        load_main(flags)
    assert message in capsys.readouterr().err
