"""Every Prometheus metric Parley exports, in one place, on a registry of its own.

The engine never imports this module: the scheduler and servicer record what the
engine returns.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("parley_requests", "RPCs answered, by final status code.",
                                ["model", "method", "code"], registry=r)
        self.request_duration = Histogram("parley_request_duration_seconds", "RPC latency, receipt to answer.",
                                          ["model", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_duration = Histogram("parley_queue_duration_seconds",
                                        "Time a text waited before joining a decode batch.", ["model"],
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("parley_batch_size", "Decoder rows (texts x beams) per engine step.",
                                    ["model"], buckets=ROW_BUCKETS, registry=r)
        self.padding_ratio = Histogram("parley_padding_ratio",
                                       "Share of padded source positions per engine step.", ["model"],
                                       buckets=RATIO_BUCKETS, registry=r)
        self.step_duration = Histogram("parley_step_duration_seconds",
                                       "Time of one engine step (a decoder run and the search's choice) in a lane.",
                                       ["model"], buckets=STEP_BUCKETS, registry=r)
        self.input_tokens = Counter("parley_input_tokens", "Source subword tokens translated.", ["model"],
                                    registry=r)
        self.generated_tokens = Counter("parley_generated_tokens", "Target subword tokens returned (best hypothesis).",
                                        ["model"], registry=r)
        self.inflight = Gauge("parley_inflight_requests", "RPCs being handled.", ["model"], registry=r)
        self.queue_depth = Gauge("parley_queue_depth", "Texts waiting to join a decode batch.", ["model"],
                                 registry=r)
        self.lane_failures = Counter("parley_lane_failures", "Decode lane processes that stopped unexpectedly "
                                     "(their texts fail with INTERNAL; the lane is restarted).", ["model"],
                                     registry=r)
        self.running_lanes = Gauge("parley_running_lanes", "Decode lanes taking texts; fewer than configured while "
                                   "one restarts or after one could not.", ["model"], registry=r)
        self.model_info = Gauge("parley_model_info", "Loaded models; the value is always 1.",
                                ["model", "variant", "precision", "device"], registry=r)

    def serve(self, port: int, host: str = "0.0.0.0"):
        """Expose /metrics over HTTP on its own thread; returns the HTTP server (to shut down)."""
        http_server, _ = start_http_server(port, addr=host, registry=self.registry)
        return http_server
