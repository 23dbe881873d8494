"""Wiring: models, schedulers, the gRPC server (Translator, Health, reflection), metrics, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.config import ServerConfig
from server.metrics import Metrics
from server.models import ModelRegistry, load_models
from server.servicer import SERVICE_NAME, TranslatorServicer, add_to_server

log = logging.getLogger("parley.server")

# After the grace period: time for the calls whose texts were just failed to send their answers.
ANSWER_GRACE_S = 1.0
# gRPC turns SO_REUSEPORT on by default on Linux, so a second server on a busy port would
# silently share its calls instead of failing to start.
GRPC_SERVER_OPTIONS = [("grpc.so_reuseport", 0)]


def connection_age_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC's server-side connection ageing (its A9 proposal): clients reconnect, which makes a
    round_robin client resolve the Service's DNS name again; without it a client keeps the
    replicas it first found, and the ones an autoscaler adds get none of its calls. The
    grace for calls in flight stays gRPC's default, unlimited: ageing never cuts a call."""
    if not config.max_connection_age_s:
        return []
    return [("grpc.max_connection_age_ms", max(1, round(config.max_connection_age_s * 1000)))]


def client_ping_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Clients keep idle connections open through proxies and NAT with keepalive pings (e.g.
    every 30 s). gRPC's server counts a ping sooner than 5 minutes after the last, or any while
    no call is in flight, as a strike and answers the third with a GOAWAY (too_many_pings),
    which drops the connection those pings were keeping. This setting permits them."""
    if not config.min_client_ping_interval_s:
        return []
    return [("grpc.http2.min_ping_interval_without_data_ms", max(1, round(config.min_client_ping_interval_s * 1000))),
            ("grpc.keepalive_permit_without_calls", 1)]


class ParleyServer:
    """Start: load and warm up every model, then serve. Stop: drain, then exit."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.registry: ModelRegistry | None = None
        self.health = health.aio.HealthServicer()
        self.grpc_server: grpc.aio.Server | None = None
        self.servicer: TranslatorServicer | None = None
        self.metrics_http = None
        self.port: int | None = None
        self._stopping = False
        self._grace_over = asyncio.Event()
        self._stopped = asyncio.Event()
        self._health_update: asyncio.Future | None = None  # held: the loop keeps only weak references to tasks

    async def start(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.grpc_server = grpc.aio.server(
            options=GRPC_SERVER_OPTIONS + connection_age_options(self.config) + client_ping_options(self.config))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.grpc_server)
        address = f"{self.config.host}:{self.config.port}"
        try:
            self.port = (self.grpc_server.add_secure_port(address, self._credentials()) if self.config.tls_cert
                         else self.grpc_server.add_insecure_port(address))
        except RuntimeError:  # gRPC's own message points at GRPC_VERBOSITY; its log line above has the cause
            raise RuntimeError(f"cannot serve gRPC on {address}: the port is in use or the host is not an address "
                               "of this machine (set --port, --host)") from None
        self.servicer = TranslatorServicer(None, self.config, self.metrics)
        add_to_server(self.servicer, self.grpc_server)
        if self.config.metrics_port:  # before the models load: a port that is taken fails at once
            try:
                self.metrics_http = self.metrics.serve(self.config.metrics_port)
            except OSError as error:
                await self.grpc_server.stop(0)
                raise RuntimeError(f"cannot serve metrics on port {self.config.metrics_port}: {error.strerror} "
                                   "(set --metrics-port, or 0 for none)") from None
        # The port opens first: while models load and warm up, health answers NOT_SERVING
        # (startup probes wait) and translate calls get UNAVAILABLE.
        await self.grpc_server.start()
        try:
            self.registry = await asyncio.to_thread(load_models, self.config, self.metrics)
            if self._stopping:  # stopped while the models loaded (a signal during start-up): they never serve
                for model in self.registry:
                    model.engine.close()
                return
            for model in self.registry:  # the lanes warmed up as they loaded
                model.scheduler.on_lanes_lost = self._lanes_lost
                model.scheduler.start()
        except BaseException:
            await self.grpc_server.stop(0)
            if self.metrics_http:
                self.metrics_http.shutdown()
            raise
        self.servicer.registry = self.registry
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"port": self.port, "models": [m.name for m in self.registry],
                                   "default_model": self.registry.default, "tls": bool(self.config.tls_cert)})

    def _lanes_lost(self, model: str) -> None:
        """A model without lanes answers every call UNAVAILABLE: health says so, for readiness
        probes to take this replica out of rotation and liveness probes to replace it."""
        log.error("model has no running decode lane; health is NOT_SERVING", extra={"model": model})
        self._health_update = asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    def _credentials(self) -> grpc.ServerCredentials:
        key, cert = self.config.tls_key.read_bytes(), self.config.tls_cert.read_bytes()
        client_ca = self.config.tls_client_ca.read_bytes() if self.config.tls_client_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)

    async def stop(self, now: bool = False) -> None:
        """Graceful: NOT_SERVING, refuse new calls (UNAVAILABLE), let in-flight ones finish within the grace period.

        The port stays open while in-flight calls finish, so health checks see NOT_SERVING
        and load balancers move traffic away. Texts still unfinished when the grace period
        ends are answered UNAVAILABLE by their schedulers, then the gRPC server stops.
        now: end the grace period at once (an operator's second SIGTERM or Ctrl-C).
        """
        if now and not self._grace_over.is_set():
            self._grace_over.set()
            if self._stopping and not self._stopped.is_set():
                log.warning("stopping now: a second signal ended the grace period")
        if self._stopping:
            return await self._stopped.wait()
        self._stopping = True
        log.info("draining", extra={"grace_period_s": self.config.grace_period_s})
        await self.health.enter_graceful_shutdown()
        if self.servicer:
            self.servicer.draining = True
        for model in self.registry or []:
            model.scheduler.stop_accepting()
        deadline = time.monotonic() + self.config.grace_period_s
        while (self.servicer and self.servicer.active_calls and time.monotonic() < deadline
               and not self._grace_over.is_set()):
            await asyncio.sleep(0.05)
        for model in self.registry or []:  # what is left is answered, with the reason, before gRPC stops
            await model.scheduler.stop()
        if self.grpc_server:
            await self.grpc_server.stop(ANSWER_GRACE_S)
        if self.metrics_http:
            self.metrics_http.shutdown()
        self._stopped.set()
        log.info("stopped")

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(config: ServerConfig) -> None:
    server = ParleyServer(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # The first signal drains; a second one ends the grace period at once.
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop(now=server.stopping)))
    await server.start()
    await server.wait()
