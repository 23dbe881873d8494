"""`make bench-scale`: gRPC throughput against the number of replicas, on this machine.

Starts N Parley processes on loopback (threads split evenly over the cores) for each N,
all at once, drives each set through one channel with round_robin balancing, the sets
taking turns in BENCH_ROUNDS rounds (as `make bench`'s engines do: bench.run), and reports
the median round's sentences/s, latency and errors per replica count. On a 2-core machine
this shows the balancing and the per-process overhead, not scale-out: the replicas share
the same two cores.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import ExitStack
from pathlib import Path

from bench.load import run_load
from bench.replicas import replicas, round_robin_target
from bench.run import RESULTS, median_round, require_exported_package, settings, turns
from model.data import read_lines
from server.config import ServerConfig


def layout(count: int, cores: int) -> tuple[int, int]:
    """Threads and lanes of each of `count` replicas: the cores split evenly, one thread per
    lane, at most the server's default lanes."""
    threads = max(cores // count, 1)
    return threads, min(threads, ServerConfig.lanes)


def main() -> None:
    s = settings()
    require_exported_package(s)
    sentences = read_lines(Path(s["data_dir"]) / "test_2016_flickr.en.gz")
    layouts = {count: layout(count, s["threads"]) for count in (1, 2)}  # s["threads"]: the cores to use
    runs = {count: [] for count in layouts}
    with ExitStack() as stack:
        targets = {}
        for count, (threads, lanes) in layouts.items():
            ports = stack.enter_context(replicas(s["package"], count, threads, "--precision", "int8",
                                                 "--lanes", str(lanes)))
            targets[count] = round_robin_target(ports)
        counts = list(layouts)
        for r, turn in enumerate(turns([s["rounds"]] * len(counts))):
            print(f"round {r + 1} of {s['rounds']} ...", flush=True)
            for count in (counts[i] for i in turn):
                runs[count].append(asyncio.run(run_load(targets[count], sentences, 64, s["grpc_requests"])))
    records = [{"replicas": count, "threads_per_replica": threads, "lanes_per_replica": lanes,
                **median_round(runs[count])} for count, (threads, lanes) in layouts.items()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(records, indent=1) + "\n")
    print("| replicas | threads each | lanes each | clients | sent/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['replicas']} | {r['threads_per_replica']} | {r['lanes_per_replica']} | {r['clients']} | "
              f"{r['sentences_per_s']:.1f} | "
              f"{r['latency_p50_ms']:.1f} | {r['latency_p99_ms']:.1f} | {r['errors'] or 0} |")
    print("rounds (sentences/s): " + ", ".join(f"{r['replicas']} replica(s) {r['round_sentences_per_s']}"
                                               for r in records))


if __name__ == "__main__":
    main()
