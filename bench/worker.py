"""One engine's measurements, in a process of its own (so peak RSS is that engine's).

    python -m bench.worker SPEC_JSON              KV cache against full recomputation: one JSON object
    python -m bench.worker --engine SPEC_JSON     an engine that stays loaded and measures the cells
                                                  it is sent, one at a time (bench.run.Worker)
    python -m bench.worker --scheduler SPEC_JSON  the same for the server's scheduler without gRPC

Every engine runs with the malloc settings the Parley server applies to itself
(server.engine.memory): CTranslate2 gains from them too, so the comparison stays even.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import sacrebleu

from decoding.tokenizer import Tokenizer
from server.engine.memory import keep_freed_memory


def build(spec: dict, tokenizer: Tokenizer):
    from bench.engines import CTranslate2Engine, ParleyEngine, PyTorchEngine

    if spec["engine"] == "parley":
        return ParleyEngine(Path(spec["package"]), spec["precision"], spec["threads"], spec["lanes"])
    if spec["engine"] == "ctranslate2":
        return CTranslate2Engine(Path(spec["ct2_model"]), spec["precision"], spec["threads"], tokenizer, spec["lanes"])
    return PyTorchEngine(Path(spec["checkpoint"]), spec["threads"])


# Lines of the engine worker's protocol start with this, so that anything else a library
# prints to stdout cannot be taken for one.
PROTOCOL = "@bench "


def serve_engine(spec: dict) -> None:
    """Load the engine, say ready, then measure each cell read from stdin ({"beam_size",
    "batch_size", "score"}) until stdin ends; last, the peak RSS of the engine's processes."""
    tokenizer = Tokenizer(Path(spec["checkpoint"]) / "spm.model")
    sources = tokenizer.encode(spec["sources"])
    engine = build(spec, tokenizer)
    engine.translate(sources[:8], 1)  # warm-up: first-run allocations and thread start-up
    say({"ready": True})
    for line in sys.stdin:
        cell = json.loads(line)
        say(measure_cell(spec, engine, tokenizer, sources, cell["beam_size"], cell["batch_size"], cell["score"]))
    say({"peak_rss_mb": peak_rss_mb(getattr(engine, "worker_pids", []))})


def say(message: dict) -> None:
    print(PROTOCOL + json.dumps(message), flush=True)


def measure_cell(spec: dict, engine, tokenizer: Tokenizer, sources: list[list[int]], beam: int, batch_size: int,
                 score: bool) -> dict:
    """All the sources in batches of batch_size, after one untimed batch (the engine may have
    idled while others ran: Parley's lanes return their freed memory after a lull); with score,
    the BLEU and the translations too (the same in every round: an engine's output does not
    depend on timing)."""
    engine.translate(sources[:batch_size], beam)
    outputs, latencies = [], []
    started = time.perf_counter()
    for i in range(0, len(sources), batch_size):
        t = time.perf_counter()
        outputs += engine.translate(sources[i : i + batch_size], beam)
        latencies.append(time.perf_counter() - t)
    seconds = time.perf_counter() - started
    record = {
        "engine": spec["engine"], "precision": spec["precision"], "beam_size": beam,
        "batch_size": batch_size, "threads": spec["threads"], "lanes": spec["lanes"], "sentences": len(sources),
        "seconds": round(seconds, 3),
        "sentences_per_s": round(len(sources) / seconds, 2),
        "tokens_per_s": round(sum(len(o) for o in outputs) / seconds, 1),
        "latency_p50_ms": round(1000 * float(np.percentile(latencies, 50)), 2),
        "latency_p95_ms": round(1000 * float(np.percentile(latencies, 95)), 2),
    }
    if score:
        texts = tokenizer.decode(outputs)
        record["bleu"] = round(sacrebleu.corpus_bleu(texts, [spec["references"]]).score, 2)
        record["outputs"] = texts
    return record


def peak_rss_mb(worker_pids: list[int]) -> float:
    """The peak resident memory of this process and its live worker processes, MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return round(own + sum(peak_rss_of(pid) for pid in worker_pids), 1)


def peak_rss_of(pid: int) -> float:
    """A live process's peak resident memory (Linux /proc), MB: Parley's lane processes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def kv_cache_speedup(spec: dict) -> dict:
    """KV-cache decoding against full recomputation, PyTorch, exactly `steps` output tokens."""
    import torch

    from bench.engines import FullRecomputeBackend
    from decoding import DecodingParams
    from decoding.padding import pad_batch
    from decoding.search import search
    from model.checkpoint import load_model
    from model.generate import TorchStepBackend

    torch.set_num_threads(spec["threads"])
    model = load_model(Path(spec["checkpoint"]))
    tokenizer = Tokenizer(Path(spec["checkpoint"]) / "spm.model")
    sources = tokenizer.encode(spec["sources"][: spec["batch_size"]])
    steps = spec["steps"]
    params = [DecodingParams(min_length=steps, max_length=steps)] * len(sources)
    src = torch.from_numpy(pad_batch([s + [model.config.eos_id] for s in sources], model.config.pad_id))
    timings = {}
    with torch.no_grad():
        for name, backend in (("kv_cache", lambda: TorchStepBackend(model, src, steps + 1)),
                              ("full_recompute", lambda: FullRecomputeBackend(model, src))):
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                search(backend(), params, model.config.bos_id, model.config.eos_id)
                best = min(best, time.perf_counter() - t)
            timings[name] = best
    return {"kv_cache": {"output_tokens": steps, "batch_size": len(sources), "kv_cache_s": round(timings["kv_cache"], 4),
                         "full_recompute_s": round(timings["full_recompute"], 4),
                         "speedup": round(timings["full_recompute"] / timings["kv_cache"], 2)}}


def serve_scheduler(spec: dict) -> None:
    """The server's scheduler and engine (default configuration) in this process, without gRPC,
    measured on request like serve_engine: for each cell read ({"beam_size", "requests"}),
    `clients` closed-loop clients queue one sentence at a time, as parley-grpc's do, so the
    two records split the server's distance from the offline engine into what continuous
    batching costs and what gRPC costs."""
    import asyncio

    from bench.load import closed_loop, latency_percentiles
    from decoding import DecodingParams
    from export.package import ModelPackage
    from server.config import ServerConfig
    from server.engine.lanes import LaneEngine
    from server.metrics import Metrics
    from server.scheduler import Row, Scheduler

    config = ServerConfig()
    engine = LaneEngine(ModelPackage.load(Path(spec["package"])), precision="int8", device="cpu",
                        threads=spec["threads"], lanes=config.lanes)
    scheduler = Scheduler("bench", engine, config, Metrics())
    sources = engine.tokenizer.encode(spec["sources"])

    async def load(beam: int, requests: int) -> dict:
        loop = asyncio.get_running_loop()

        async def translate(n: int) -> bool:
            future = loop.create_future()
            scheduler.submit([Row(sources[n % len(sources)], DecodingParams(beam_size=beam), future)])
            await future
            return True

        seconds, latencies = await closed_loop(translate, spec["clients"], requests)
        return {"engine": "parley-scheduler", "precision": "int8", "beam_size": beam, "batch_size": 1,
                "threads": spec["threads"], "clients": spec["clients"], "requests": requests,
                "seconds": round(seconds, 3), "sentences_per_s": round(requests / seconds, 2),
                **latency_percentiles(latencies)}

    async def run() -> None:
        scheduler.start()  # on this event loop, which every load shares
        try:
            await load(1, 200)  # warm-up
            say({"ready": True})
            while line := await asyncio.to_thread(sys.stdin.readline):
                cell = json.loads(line)
                await load(cell["beam_size"], spec["clients"])  # untimed, as in measure_cell
                say(await load(cell["beam_size"], cell["requests"]))
            peak = peak_rss_mb([lane.process.pid for lane in engine.lanes])  # while the lanes are there
        finally:
            await scheduler.stop()
        say({"peak_rss_mb": peak})

    asyncio.run(run())


if __name__ == "__main__":
    keep_freed_memory()
    job = json.loads(Path(sys.argv[-1]).read_text())
    if sys.argv[1] == "--engine":
        serve_engine(job)
    elif sys.argv[1] == "--scheduler":
        serve_scheduler(job)
    else:
        print(json.dumps(kv_cache_speedup(job)))
