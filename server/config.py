"""Server configuration: one typed object, built once from flags and PARLEY_* environment variables."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from server.tls import pem_problems


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(default="[::]", metadata={"help": "address to bind the gRPC server to"})
    port: int = field(default=50051, metadata={"help": "gRPC port"})
    metrics_port: int = field(default=8000, metadata={"help": "Prometheus /metrics port (0: off)"})
    model_repository: Path = field(default=Path("models"), metadata={"help": "directory of model packages"})
    default_model: str = field(default="", metadata={"help": "model used when a request names none "
                                                              "(default: the only or first model)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    precision: str = field(default="auto", metadata={"help": "auto (int8 on CPU, fp16 on CUDA), fp32, int8, fp16"})
    threads: int = field(default=0, metadata={"help": "ONNX Runtime intra-op threads, shared by the lanes (0: the "
                                                     "CPUs this process may use, by affinity and cgroup quota)"})
    lanes: int = field(default=2, metadata={"help": "decode lanes per model: worker processes with their own batch "
                                                    "and ONNX Runtime sessions, sharing the threads"})
    max_batch_rows: int = field(default=256, metadata={"help": "decoder rows (texts x beams) per engine step"})
    max_batch_tokens: int = field(default=8192, metadata={"help": "source tokens x beams per engine step"})
    # 0: with continuous batching a text that arrives later joins at the next step anyway, so waiting
    # only adds latency (measured: single-request p50 16 -> 10.5 ms, 64-client throughput unchanged).
    max_queue_delay_ms: float = field(default=0.0, metadata={"help": "how long an idle engine waits to fill a batch"})
    queue_limit: int = field(default=2048, metadata={"help": "texts waiting per model before RESOURCE_EXHAUSTED"})
    max_texts_per_request: int = field(default=64, metadata={"help": "texts in one request"})
    max_tokens_per_text: int = field(default=200, metadata={"help": "subword tokens in one text"})
    max_beam_size: int = field(default=8, metadata={"help": "largest beam a request may ask for"})
    default_beam_size: int = field(default=4, metadata={"help": "beam size when a request says 0"})
    max_output_tokens: int = field(default=256, metadata={"help": "hard cap on generated tokens per text"})
    grace_period_s: float = field(default=20.0, metadata={"help": "how long in-flight calls may finish on shutdown"})
    max_connection_age_s: float = field(default=0.0, metadata={
        "help": "close each client connection after about this long (a GOAWAY; its calls in flight finish), so "
                "that clients balancing over DNS resolve again and reach new replicas (0: never)"})
    min_client_ping_interval_s: float = field(default=0.0, metadata={
        "help": "let clients send keepalive pings this often, with or without calls in flight (0: gRPC's policy, "
                "one every 5 minutes and only during calls; a client that pings more often is disconnected with "
                "GOAWAY too_many_pings)"})
    tls_cert: Path | None = field(default=None, metadata={"help": "PEM certificate chain (enables TLS)"})
    tls_key: Path | None = field(default=None, metadata={"help": "PEM private key"})
    tls_client_ca: Path | None = field(default=None, metadata={"help": "PEM CA bundle: require client certs (mTLS)"})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning, error"})
    log_format: str = field(default="json", metadata={"help": "json (one object a line) or text"})

    def __post_init__(self) -> None:
        problems = []
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in ("auto", "fp32", "int8", "fp16"):
            problems.append(f"precision must be auto, fp32, int8 or fp16, got {self.precision!r}")
        for name in ("lanes", "max_batch_rows", "max_batch_tokens", "queue_limit", "max_texts_per_request",
                     "max_tokens_per_text", "max_beam_size", "max_output_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if not 1 <= self.default_beam_size <= self.max_beam_size:
            problems.append(f"default_beam_size must be between 1 and max_beam_size ({self.max_beam_size})")
        if self.max_beam_size > self.max_batch_rows:
            problems.append("max_beam_size must not exceed max_batch_rows")
        if self.max_tokens_per_text * self.max_beam_size > self.max_batch_tokens:
            problems.append(f"max_batch_tokens ({self.max_batch_tokens}) must hold one text of max_tokens_per_text "
                            f"x max_beam_size ({self.max_tokens_per_text * self.max_beam_size})")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("tls_client_ca needs tls_cert and tls_key")
        missing = [name for name in ("tls_cert", "tls_key", "tls_client_ca")
                   if getattr(self, name) and not getattr(self, name).is_file()]
        problems += [f"{name} {getattr(self, name)} is not a file" for name in missing]
        if self.tls_cert and self.tls_key and not missing:
            problems += pem_problems({"tls_cert": self.tls_cert, "tls_client_ca": self.tls_client_ca},
                                     ("tls_key", self.tls_key))
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                problems.append(f"{name} must be between 0 and 65535, got {getattr(self, name)}")
        if self.port and self.port == self.metrics_port:
            problems.append(f"port and metrics_port must differ, both are {self.port}")
        for name in ("threads", "max_queue_delay_ms", "grace_period_s", "max_connection_age_s",
                     "min_client_ping_interval_s"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            problems.append(f"log_level must be debug, info, warning or error, got {self.log_level!r}")
        if self.log_format not in ("json", "text"):
            problems.append("log_format must be json or text")
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))


def env_name(field_name: str) -> str:
    return "PARLEY_" + field_name.upper()


def flag_help(f: dataclasses.Field, environ) -> str:
    """A flag's help: what it sets, its default, and its environment variable (with the value
    that variable has now, which the flag would override)."""
    default = "" if f.default in (None, "") else f", default {f.default}"
    variable = env_name(f.name)
    setting = f"{variable}={environ[variable]}" if variable in environ else variable
    return f"{f.metadata['help']}{default} [{setting}]".replace("%", "%%")  # argparse formats help with %


def unknown_variables(environ) -> list[str]:
    """PARLEY_* variables that name no setting (a typo the server would otherwise ignore),
    each with the setting it most likely meant."""
    known = [env_name(f.name) for f in dataclasses.fields(ServerConfig)]
    named = []
    for name in sorted(k for k in environ if k.startswith("PARLEY_") and k not in known):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
        named.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return named


def service_link_hint(value: str) -> str:
    """Kubernetes gives every pod PARLEY_PORT=tcp://IP:PORT (and PARLEY_SERVICE_HOST, ...) for a
    Service named parley in its namespace, unless the pod spec turns service links off."""
    if not value.startswith(("tcp://", "udp://", "sctp://")):
        return ""
    return ("; Kubernetes sets it for a Service named parley (service links): "
            "set enableServiceLinks: false in the pod spec")


def parse_config(argv: Sequence[str] | None = None, environ: dict | None = None) -> ServerConfig:
    """Flags win over PARLEY_<FLAG> environment variables, which win over defaults."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="parley-server", description="Serve Parley model packages over gRPC.")
    for f in dataclasses.fields(ServerConfig):
        kind = {"int": int, "float": float}.get(str(f.type), str)
        if "Path" in str(f.type):
            kind = Path
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, type=kind, default=None, help=flag_help(f, environ))
    args = parser.parse_args(argv)
    values = {}
    for f in dataclasses.fields(ServerConfig):
        value = getattr(args, f.name)
        if value is None and env_name(f.name) in environ:
            raw = environ[env_name(f.name)]
            try:
                value = parser._option_string_actions["--" + f.name.replace("_", "-")].type(raw)
            except ValueError:
                parser.error(f"{env_name(f.name)}={raw!r} is not a valid {f.name}" + service_link_hint(raw))
        if value is not None:
            values[f.name] = value
    try:
        return ServerConfig(**values)
    except ValueError as error:
        parser.error(str(error))
