"""`make bench-scale`: gRPC throughput against the number of replicas, on this machine.

Starts N Parley processes on loopback (threads split evenly over the cores), drives them
through one channel with round_robin balancing, and reports sentences/s, latency and
errors per replica count. On a 2-core machine this shows the balancing and the per-process
overhead, not scale-out: the replicas share the same two cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from bench.load import run_load
from bench.replicas import replicas, round_robin_target
from bench.run import RESULTS, settings
from model.data import read_lines
from server.config import ServerConfig


def measure(count: int, s: dict, sentences: list[str], clients: int, requests: int) -> dict:
    threads = max((os.cpu_count() or 1) // count, 1)
    lanes = min(threads, ServerConfig.lanes)  # one thread per lane, at most the server's default lanes
    with replicas(s["package"], count, threads, "--precision", "int8", "--lanes", str(lanes)) as ports:
        result = asyncio.run(run_load(round_robin_target(ports), sentences, clients, requests))
    return {"replicas": count, "threads_per_replica": threads, "lanes_per_replica": lanes, **result}


def main() -> None:
    s = settings()
    if not (s["package"] / "manifest.json").is_file():
        sys.exit(f"no model package at {s['package']}: run `make export` first")
    sentences = read_lines(Path(s["data_dir"]) / "test_2016_flickr.en.gz")
    records = [measure(n, s, sentences, clients=64, requests=s["grpc_requests"]) for n in (1, 2)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(records, indent=1) + "\n")
    print("| replicas | threads each | lanes each | clients | sent/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['replicas']} | {r['threads_per_replica']} | {r['lanes_per_replica']} | {r['clients']} | "
              f"{r['sentences_per_s']:.1f} | "
              f"{r['latency_p50_ms']:.1f} | {r['latency_p99_ms']:.1f} | {r['errors'] or 0} |")


if __name__ == "__main__":
    main()
