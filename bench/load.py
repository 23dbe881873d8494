"""gRPC load generator: concurrent clients, bounded in requests and time.

    python -m bench.load --address localhost:50051 --concurrency 64 --requests 1000 [--beam 1,4]
                         [--texts-per-request 1,8] [--duration 120]

Each client sends requests back to back, texts drawn in turn from the sentences. The
request mix: every request picks its beam size and its number of texts at random (seeded)
from the comma-separated lists. Reports throughput, latency percentiles and errors by
code. Only ever point it at your own server (loopback by default).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import time
from typing import Awaitable, Callable, Sequence

import grpc
import numpy as np

from parley.v1 import translate_pb2 as pb
from parley.v1 import translate_pb2_grpc as pb_grpc
from server.client import at_least


async def closed_loop(call: Callable[[int], Awaitable[bool]], concurrency: int, requests: int,
                      duration_s: float = math.inf) -> tuple[float, list[float]]:
    """`concurrency` clients send requests 0 .. requests-1 back to back (none after duration_s);
    call(n) sends request n and says whether it was answered. Returns the seconds taken and
    the latency of every answered request."""
    latencies: list[float] = []
    counter = iter(range(requests))
    deadline = time.monotonic() + duration_s

    async def client() -> None:
        for n in counter:
            if time.monotonic() > deadline:
                return
            started = time.perf_counter()
            if await call(n):
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def latency_percentiles(latencies: Sequence[float]) -> dict:
    return {f"latency_p{q}_ms": round(1000 * float(np.percentile(latencies, q)), 2) if latencies else None
            for q in (50, 99)}


async def run_load(address: str, sentences: Sequence[str], concurrency: int, requests: int,
                   beam_sizes: Sequence[int] = (1,), texts_per_request: Sequence[int] = (1,),
                   duration_s: float = 300.0, seed: int = 0) -> dict:
    """Send `requests` requests from `concurrency` clients (stopping early after duration_s)."""
    rng = np.random.default_rng(seed)
    mix = [(int(rng.choice(beam_sizes)), int(rng.choice(texts_per_request))) for _ in range(requests)]
    errors: collections.Counter = collections.Counter()
    translated = generated_tokens = 0

    # Several addresses (ipv4:host:port,host:port) are balanced per call, as replicas behind DNS would be.
    options = [("grpc.lb_policy_name", "round_robin")]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.TranslatorStub(channel)

        async def translate(n: int) -> bool:
            nonlocal translated, generated_tokens
            beam_size, count = mix[n]
            texts = [sentences[(n * max(texts_per_request) + j) % len(sentences)] for j in range(count)]
            request = pb.TranslateRequest(texts=texts, options=pb.DecodingOptions(beam_size=beam_size))
            try:
                response = await stub.Translate(request, timeout=60)
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
                return False
            translated += len(texts)
            generated_tokens += sum(t.hypotheses[0].token_count for t in response.translations)
            return True

        seconds, latencies = await closed_loop(translate, concurrency, requests, duration_s)
    return {
        "clients": concurrency, "requests": len(latencies) + sum(errors.values()), "seconds": round(seconds, 3),
        "sentences_per_s": round(translated / seconds, 2), "tokens_per_s": round(generated_tokens / seconds, 1),
        **latency_percentiles(latencies), "errors": dict(errors),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--address", default="127.0.0.1:50051",
                   help="the server, host:port (several, comma-separated after ipv4:, are balanced per call)")
    p.add_argument("--sentences", default="../shared/data/multi30k/test_2016_flickr.en.gz",
                   help="texts to send, one a line (plain or .gz), in turn")
    p.add_argument("--concurrency", type=at_least(1), default=16,
                   help="clients, each sending its requests back to back")
    p.add_argument("--requests", type=at_least(1), default=500, help="requests in all")
    p.add_argument("--duration", type=float, default=120.0, help="stop after this many seconds")
    p.add_argument("--beam", default="1", help="beam sizes to mix, e.g. 1,4")
    p.add_argument("--texts-per-request", default="1", help="texts per request to mix, e.g. 1,8")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from model.data import read_lines

    p = parser()
    args = p.parse_args(argv)
    mixes = {}
    for flag, text in (("--beam", args.beam), ("--texts-per-request", args.texts_per_request)):
        try:
            mixes[flag] = [int(value) for value in text.split(",")]
        except ValueError:
            p.error(f"{flag}: expected comma-separated whole numbers, e.g. 1,4; got {text!r}")
        if min(mixes[flag]) < 1:
            p.error(f"{flag}: every value must be >= 1, got {text!r}")
    if args.duration <= 0:
        p.error(f"--duration must be positive, got {args.duration}")
    result = asyncio.run(run_load(args.address, read_lines(args.sentences), args.concurrency, args.requests,
                                  mixes["--beam"], mixes["--texts-per-request"], args.duration))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
