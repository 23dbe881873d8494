"""`make bench-grpc-cost`: what gRPC alone takes from the engine on this machine.

A stand-in server that only answers (each Translate call held for a fixed time, then its
texts sent back: gRPC, the messages and the event loop, no tokenizer, scheduler or engine)
runs beside the offline engine (2 lanes, the largest batch), and the load generator drives
it with 64 single-text clients at the call rate the issue's target needs: 85% of what the
offline engine translates alone just before (the hold sets the rate: clients / rate). The
offline engine's sentences/s with that traffic beside it, over its sentences/s alone (the
mean of just before and just after), is the most a server built on this gRPC stack could
deliver on these CPUs even if its own work and continuous batching cost nothing.

Writes bench/results/grpc-cost.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from bench.load import run_load
from bench.replicas import free_port, wait_until_serving
from bench.run import RESULTS, SETTLE_S, Worker, engine_job, lower_median, require_exported_package, run_meta, settings
from model.data import read_lines
from parley.v1 import translate_pb2 as pb
from parley.v1 import translate_pb2_grpc as pb_grpc
from server.app import GRPC_SERVER_OPTIONS

TARGET_SHARE = 0.85
CLIENTS = 64
# Traffic before the engine's measurement starts (connections made, the rate steady) and after
# the longest the engine might take beside it.
WARM_UP_S = 2.0


class AnsweringTranslator(pb_grpc.TranslatorServicer):
    """Answers every text with itself after `hold_s`: a Translate call's gRPC work, nothing else."""

    def __init__(self, hold_s: float):
        self.hold_s = hold_s

    async def Translate(self, request: pb.TranslateRequest, context) -> pb.TranslateResponse:
        await asyncio.sleep(self.hold_s)
        return pb.TranslateResponse(translations=[
            pb.Translation(hypotheses=[pb.Hypothesis(text=text, score=-1.0, token_count=len(text.split()))])
            for text in request.texts])


async def serve_answers(port: int, hold_s: float) -> None:
    server = grpc.aio.server(options=GRPC_SERVER_OPTIONS)
    pb_grpc.add_TranslatorServicer_to_server(AnsweringTranslator(hold_s), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def beside_traffic(reference: Worker, cell: dict, sources: list[str], rate: float, seconds_alone: float) -> dict:
    """The offline engine's measurement while the stand-in server answers `rate` calls/s, and
    the CPU (cores) the stand-in server and the load generator (this process) took meanwhile."""
    port = free_port()
    answering = subprocess.Popen([sys.executable, "-m", "bench.grpc_cost", "--answer", str(port), str(CLIENTS / rate)])
    try:
        wait_until_serving(port)
        traffic: dict = {}
        duration = WARM_UP_S + 3 * seconds_alone + WARM_UP_S
        load = threading.Thread(target=lambda: traffic.update(asyncio.run(
            run_load(f"127.0.0.1:{port}", sources, CLIENTS, requests=int(2 * rate * duration), duration_s=duration))))
        server_before, client_before = cpu_seconds(answering.pid), time.process_time()
        load.start()
        time.sleep(WARM_UP_S)
        engine = reference.ask(cell)
        load.join()
        server_cpu, client_cpu = cpu_seconds(answering.pid) - server_before, time.process_time() - client_before
    finally:
        answering.terminate()
        answering.wait(30)
    if traffic["errors"]:
        raise RuntimeError(f"the stand-in server failed calls: {traffic['errors']}")
    if engine["seconds"] > duration - WARM_UP_S:
        raise RuntimeError("the engine's measurement outlasted the traffic; raise WARM_UP_S")
    return {"engine": engine, "calls_per_s": traffic["sentences_per_s"],
            "server_cores": round(server_cpu / traffic["seconds"], 3),
            "load_generator_cores": round(client_cpu / traffic["seconds"], 3)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--answer", nargs=2, metavar=("PORT", "HOLD_S"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.answer:
        asyncio.run(serve_answers(int(args.answer[0]), float(args.answer[1])))
        return
    s = settings()
    require_exported_package(s)
    sources = read_lines(s["data_dir"] / "test_2016_flickr.en.gz")[: s["sentences"]]
    job = {**engine_job(s, sources, references=[]), "engine": "parley", "precision": "int8", "lanes": 2}
    reference = Worker("engine", job, None)
    records = []
    try:
        reference.wait_ready()
        for beam in s["beams"]:
            cell = {"beam_size": beam, "batch_size": max(s["batch_sizes"]), "score": False}
            rounds = []
            for r in range(s["rounds"]):
                print(f"beam {beam}, round {r + 1} of {s['rounds']} ...", flush=True)
                before = reference.ask(cell)
                time.sleep(SETTLE_S)
                rate = TARGET_SHARE * before["sentences_per_s"]
                beside = beside_traffic(reference, cell, sources, rate, before["seconds"])
                time.sleep(SETTLE_S)
                after = reference.ask(cell)
                # Against the engine alone just before and just after: the machine's drift over the
                # round moves both, and their mean, not one of them, is what the traffic slowed.
                alone = (before["sentences_per_s"] + after["sentences_per_s"]) / 2
                rounds.append({"alone_sentences_per_s": [before["sentences_per_s"], after["sentences_per_s"]],
                               "calls_per_s_asked": round(rate, 1), "calls_per_s": beside["calls_per_s"],
                               "beside_sentences_per_s": beside["engine"]["sentences_per_s"],
                               "share_left": round(beside["engine"]["sentences_per_s"] / alone, 3),
                               "server_cores": beside["server_cores"],
                               "load_generator_cores": beside["load_generator_cores"]})
            records.append({"beam_size": beam, "batch_size": cell["batch_size"], "clients": CLIENTS,
                            "share_left": lower_median([r["share_left"] for r in rounds]), "rounds": rounds})
        reference.finish()
    except BaseException:
        reference.kill()
        raise
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grpc-cost.json").write_text(json.dumps({"meta": run_meta(s), "records": records}, indent=1) + "\n")
    print(table(records))


def table(records: list[dict]) -> str:
    rows = ["| beam | engine alone before / after, sent/s | calls/s asked / served | engine beside them, sent/s | share left "
            "| CPU of the stand-in server / the load generator, cores |", "|---|---|---|---|---|---|"]
    for record in records:
        for r in record["rounds"]:
            before, after = r["alone_sentences_per_s"]
            rows.append(f"| {record['beam_size']} | {before:.0f} / {after:.0f} | {r['calls_per_s_asked']:.0f} / "
                        f"{r['calls_per_s']:.0f} | {r['beside_sentences_per_s']:.0f} | {r['share_left']:.2f} "
                        f"| {r['server_cores']:.2f} / {r['load_generator_cores']:.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
