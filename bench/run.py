"""`make bench`: Parley against CTranslate2 and the PyTorch reference, side by side, in one run.

Same weights (the default model), same sentences of test_2016_flickr, same thread count,
same output-length rule. Every engine runs in its own process (peak RSS is its own); all
stay loaded, and they take turns cell by cell (beam, batch size), in BENCH_ROUNDS rounds
(default 3) that each start with a different engine: on a shared machine whose speed
drifts over minutes, engines measured minutes apart would differ by the drift, engines
measured back to back by little. Each record is the round with the median throughput, and
holds every round's. The PyTorch reference and CTranslate2 int8 with one lane (an order of
magnitude away from what they are compared with) run one round. Then the served paths,
in rounds too: the offline engine (2 lanes, the largest batch), the server's scheduler
without gRPC, the gRPC server and the offline engine again, one after the other; a served
figure's share of the offline engine (the mean of its two measurements) is taken in each
round and the median reported.
BENCH_QUICK=1 runs a reduced grid in a few minutes. BENCH_SERVER_CPUS (e.g. 0,1) runs the
engines and servers on those CPUs and the load generator on the others (bench.cpus).

Writes bench/results/latest.json (a list of records) and bench/results/throughput.png,
and prints a table with the Parley/CTranslate2 ratios. `--served` measures only the served
paths against the offline engine (no CTranslate2 needed): bench/results/served.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.cpus import load_generator_cpus, parse_cpus, pinned_to
from bench.load import run_load
from bench.replicas import replicas, round_robin_target
from bench.worker import PROTOCOL
from model.data import read_lines
from server.engine.session import int8_gemm_can_saturate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "bench" / ".cache"


def env_count(name: str, default: int) -> int:
    """A whole number >= 1 from the environment variable `name`, else the default."""
    text = os.environ.get(name, str(default))
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name}={text!r}: expected a whole number >= 1")
    return int(text)


def settings() -> dict:
    """The run's settings from the BENCH_* variables; leaves with the reason on a bad one."""
    quick = os.environ.get("BENCH_QUICK") == "1"
    try:
        server_cpus = parse_cpus(os.environ.get("BENCH_SERVER_CPUS"))
        threads = env_count("BENCH_THREADS", len(server_cpus or os.sched_getaffinity(0)))
        rounds = env_count("BENCH_ROUNDS", 3)
    except ValueError as error:
        sys.exit(f"bench: {error}")
    return {
        "quick": quick,
        "sentences": 256 if quick else 1000,
        "batch_sizes": [8, 32] if quick else [1, 8, 32, 64],
        "beams": [1, 4],
        "threads": threads,
        "server_cpus": server_cpus,
        "grpc_clients": [1, 16, 64],
        "grpc_requests": 256 if quick else 1000,
        # Also at the most clients: requests of this many texts, gRPC's cost per call shared by them.
        "grpc_texts_per_request": 8,
        "rounds": rounds,
        "data_dir": Path(os.environ.get("DATA_DIR", ROOT.parent / "shared" / "data" / "multi30k")),
        "checkpoint": ROOT / "model" / "default",
        "package": Path(os.environ.get("BENCH_PACKAGE", ROOT / "models" / "multi30k-en-de")),
    }


def require_exported_package(s: dict) -> None:
    """Leave with what to do when the model package the settings name has not been exported."""
    if not (s["package"] / "manifest.json").is_file():
        sys.exit(f"no model package at {s['package']}: run `make export` first")


def engine_job(s: dict, sources: list[str], references: list[str]) -> dict:
    """What every engine worker is given: the sentences, the grid and the model files."""
    return {"sources": sources, "references": references, "beams": s["beams"], "batch_sizes": s["batch_sizes"],
            "threads": s["threads"], "checkpoint": str(s["checkpoint"]), "package": str(s["package"])}


def run_meta(s: dict) -> dict:
    """What a results file records of the machine and the settings it was measured with: the
    CPU's model and how its int8 GEMMs sum products (in int16 on x86 without VNNI), which
    moves every int8 ratio."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.partition(":")[2].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    sums = "int16 (x86 without VNNI)" if int8_gemm_can_saturate() else "int32"
    return {"machine": f"{cpu}, {os.cpu_count()} cores, int8 products summed in {sums}",
            "settings": {k: str(v) for k, v in s.items()}}


def ctranslate2_model(checkpoint: Path, quantization: str) -> Path:
    out = CACHE / f"ctranslate2-{quantization}"
    if not (out / "model.bin").is_file():
        subprocess.run([sys.executable, "-m", "bench.ctranslate2_convert", str(checkpoint), str(out),
                        "--quantization", quantization], check=True)
    return out


# Between two measurements: thread pools that spin after their work (OpenMP's, ONNX
# Runtime's, an idle lane's poll) settle before the next engine starts.
SETTLE_S = 0.5


def run_worker(job: dict, cpus: list[int] | None) -> dict:
    """A one-off task in a worker process (bench.worker) on `cpus` (None: any): its JSON result."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    try:
        done = subprocess.run([sys.executable, "-m", "bench.worker", f.name], capture_output=True, text=True,
                              preexec_fn=pinned_to(cpus))
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {job.get('task')}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class Worker:
    """A worker process that stays loaded (bench.worker --engine or --scheduler), on `cpus`
    (None: any), and measures one cell at a time when asked."""

    def __init__(self, kind: str, job: dict, cpus: list[int] | None):
        self.name = " ".join([kind] + [f"{key} {job[key]}" for key in ("engine", "precision", "lanes") if key in job])
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(job, f)
        self.spec_file = f.name
        self.process = subprocess.Popen([sys.executable, "-m", "bench.worker", f"--{kind}", f.name],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        preexec_fn=pinned_to(cpus))

    def wait_ready(self) -> None:
        self._read()

    def ask(self, cell: dict) -> dict:
        self.process.stdin.write(json.dumps(cell) + "\n")
        self.process.stdin.flush()
        return self._read()

    def finish(self) -> float:
        """End the worker; the peak RSS of its processes, MB."""
        self.process.stdin.close()
        peak = self._read()["peak_rss_mb"]
        self.process.wait()
        Path(self.spec_file).unlink(missing_ok=True)
        return peak

    def kill(self) -> None:
        """Stop the worker at once (a measurement failed; it may have finished already)."""
        self.process.kill()
        Path(self.spec_file).unlink(missing_ok=True)

    def _read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
        raise RuntimeError(f"benchmark worker ({self.name}) exited (code {self.process.wait()}); "
                           "its error is above")


def turns(rounds_of: list[int]) -> list[list[int]]:
    """For each round, the engines (indices) in the order they take their turn at a cell: engine
    i takes part in rounds 0 .. rounds_of[i] - 1, and each round starts one engine further on."""
    order = []
    for r in range(max(rounds_of, default=0)):
        taking_part = [i for i, rounds in enumerate(rounds_of) if r < rounds]
        shift = r % len(taking_part)
        order.append(taking_part[shift:] + taking_part[:shift])
    return order


def lower_median(values: list, key=None):
    """The median of the values (the lower middle one of an even count)."""
    return sorted(values, key=key)[(len(values) - 1) // 2]


def median_round(runs: list[dict]) -> dict:
    """The round with the median throughput, with every round's throughput, and the scores
    and translations the first round took."""
    chosen = lower_median(runs, key=lambda r: r["sentences_per_s"])
    first_only = {key: runs[0][key] for key in ("bleu", "outputs") if key in runs[0]}
    return {**chosen, **first_only, "round_sentences_per_s": [r["sentences_per_s"] for r in runs]}


def ratios_by_round(records: list[dict]) -> dict:
    """Parley int8 with 2 lanes (the server's default) over CTranslate2 int8 in its faster
    configuration, round by round: each round measured the two back to back."""
    by_key = {(r["engine"], r["precision"], r["lanes"], r["beam_size"], r["batch_size"]): r
              for r in records if "lanes" in r}  # the offline engines
    ratios = {}
    for (engine, precision, lanes, beam, batch_size), parley in by_key.items():
        rivals = [r for k, r in by_key.items() if k[:2] == ("ctranslate2", "int8") and k[3:] == (beam, batch_size)]
        if (engine, precision, lanes) == ("parley", "int8", 2) and rivals:
            best = max(rivals, key=lambda r: r["sentences_per_s"])
            ratios[f"beam{beam}_batch{batch_size}"] = [
                round(p / c, 3) for p, c in zip(parley["round_sentences_per_s"], best["round_sentences_per_s"])]
    return ratios


def engine_records(s: dict, common: dict, jobs: list[dict]) -> list[dict]:
    workers = [Worker("engine", {**common, **job}, s["server_cpus"]) for job in jobs]  # they load in parallel
    try:
        for worker in workers:
            worker.wait_ready()
        runs = defaultdict(list)  # (engine, beam, batch size) -> one record per round
        rounds = turns([job.get("rounds", s["rounds"]) for job in jobs])
        for r, engines in enumerate(rounds):
            print(f"round {r + 1} of {len(rounds)} ...", flush=True)
            for beam in s["beams"]:
                for batch_size in s["batch_sizes"]:
                    for i in engines:
                        time.sleep(SETTLE_S)
                        cell = {"beam_size": beam, "batch_size": batch_size, "score": r == 0}
                        runs[i, beam, batch_size].append(workers[i].ask(cell))
        peaks = [worker.finish() for worker in workers]
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    return [{**median_round(runs[key]), "peak_rss_mb": peaks[key[0]]} for key in sorted(runs)]


def served_records(s: dict, common: dict, sources: list[str]) -> list[dict]:
    """One sentence per request through a real server on loopback (parley-grpc: 1, 16 and 64
    clients; at 64 also requests of several texts) and through the server's scheduler without
    gRPC (parley-scheduler: 64 clients), in rounds; in each, every served figure is divided by
    the offline engine's (2 lanes, the largest batch), the mean of its measurements just before
    and just after the beam's served cells (the machine drifts over them): its share of the
    offline engine."""
    reference = Worker("engine", {**common, "engine": "parley", "precision": "int8", "lanes": 2}, s["server_cpus"])
    clients = max(s["grpc_clients"])
    scheduler = Worker("scheduler", {**common, "clients": clients}, s["server_cpus"])
    runs = defaultdict(list)  # (engine, beam, clients, texts per request) -> one record per round
    loads = [(n, 1) for n in s["grpc_clients"]] + [(clients, s["grpc_texts_per_request"])]
    try:
        with replicas(s["package"], 1, s["threads"], "--precision", "int8", cpus=s["server_cpus"]) as ports, \
                load_generator_cpus(s["server_cpus"]):
            reference.wait_ready()
            scheduler.wait_ready()
            for r in range(s["rounds"]):
                print(f"round {r + 1} of {s['rounds']} ...", flush=True)
                for beam in s["beams"]:
                    cell = {"beam_size": beam, "batch_size": max(s["batch_sizes"]), "score": False}
                    before = reference.ask(cell)["sentences_per_s"]
                    measured = [{**scheduler.ask({"beam_size": beam, "requests": s["grpc_requests"]}),
                                 "texts_per_request": 1}]
                    for n, texts in loads:
                        # As many requests whatever their size: fewer would leave clients idle at the end.
                        requests = min(s["grpc_requests"], 200) if n == 1 else s["grpc_requests"]
                        result = asyncio.run(run_load(round_robin_target(ports), sources, n, requests, [beam], [texts]))
                        measured.append({"engine": "parley-grpc", "precision": "int8", "beam_size": beam,
                                         "batch_size": 1, "threads": s["threads"], "texts_per_request": texts,
                                         **result})
                    offline = [before, reference.ask(cell)["sentences_per_s"]]
                    for record in measured:
                        share = round(record["sentences_per_s"] / (sum(offline) / 2), 3)
                        key = record["engine"], beam, record["clients"], record["texts_per_request"]
                        runs[key].append({**record, "offline_sentences_per_s": offline, "share_of_engine": share})
        reference.finish()
        scheduler.finish()
    except BaseException:
        reference.kill()
        scheduler.kill()
        raise
    records = []
    for key in sorted(runs, key=lambda k: (k[0] != "parley-grpc", k[1], k[2], k[3])):
        shares = [r["share_of_engine"] for r in runs[key]]
        records.append({**median_round(runs[key]), "bleu": None, "round_shares": shares,
                        "share_of_engine": lower_median(shares)})
    return records


def agreement(a: list[str] | None, b: list[str] | None) -> float | None:
    if not a or not b:
        return None
    return round(sum(x == y for x, y in zip(a, b)) / len(a), 4)


def table(records: list[dict]) -> str:
    offline = [r for r in records if r["engine"] not in ("parley-grpc", "parley-scheduler")]
    rows = ["| engine | precision | lanes | beam | batch | sent/s | tok/s | p50 ms | p95 ms | peak RSS MB | BLEU "
            "| vs CT2, same lanes | vs CT2's best |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"] if offline else []
    ct2 = {(r["precision"].replace("float32", "fp32"), r["beam_size"], r["batch_size"], r["lanes"]): r["sentences_per_s"]
           for r in records if r["engine"] == "ctranslate2"}
    for r in offline:
        key = (r["precision"], r["beam_size"], r["batch_size"])
        same = ct2.get(key + (r["lanes"],)) if r["engine"] == "parley" else None
        best = max((v for k, v in ct2.items() if k[:3] == key), default=None) if r["engine"] == "parley" else None
        ratio = f"{r['sentences_per_s'] / same:.2f}x" if same else ""
        best_ratio = f"{r['sentences_per_s'] / best:.2f}x" if best else ""
        rows.append(f"| {r['engine']} | {r['precision']} | {r['lanes']} | {r['beam_size']} | {r['batch_size']} | "
                    f"{r['sentences_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['latency_p50_ms']:.1f} | "
                    f"{r['latency_p95_ms']:.1f} | {r['peak_rss_mb']:.0f} | {r['bleu']:.2f} | "
                    f"{ratio} | {best_ratio} |")
    served = [r for r in records if r["engine"] in ("parley-grpc", "parley-scheduler")]
    if served:
        rows += [""] * bool(rows) + ["| served, int8 | beam | clients | texts per request | sent/s | p50 ms | p99 ms "
                                     "| share of offline engine | errors |", "|---|---|---|---|---|---|---|---|---|"]
        for r in served:
            rows.append(f"| {r['engine']} | {r['beam_size']} | {r['clients']} | {r['texts_per_request']} | "
                        f"{r['sentences_per_s']:.1f} | "
                        f"{r['latency_p50_ms']:.1f} | {r['latency_p99_ms']:.1f} | {r['share_of_engine']} | "
                        f"{r.get('errors') or 0} |")
    return "\n".join(rows)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    beams = sorted({r["beam_size"] for r in records})
    fig, axes = plt.subplots(1, len(beams), figsize=(6 * len(beams), 4.5), squeeze=False)
    for ax, beam in zip(axes[0], beams):
        series = sorted({(r["engine"], r["precision"], r["lanes"]) for r in records if "lanes" in r})  # offline engines
        for engine, precision, lanes in series:
            points = sorted((r["batch_size"], r["sentences_per_s"]) for r in records
                            if (r["engine"], r["precision"], r.get("lanes"), r["beam_size"]) == (engine, precision, lanes, beam))
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    label=f"{engine} {precision}, {lanes} lane{'s' if lanes > 1 else ''}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (sentences)")
        ax.set_ylabel("sentences / s")
        ax.set_title(f"{'greedy' if beam == 1 else f'beam {beam}'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Throughput on test_2016_flickr, same weights and threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Parley against CTranslate2 and PyTorch, and served over gRPC.")
    p.add_argument("--served", action="store_true",
                   help="only the served paths against the offline engine (no CTranslate2 or PyTorch); "
                        "writes bench/results/served.json")
    args = p.parse_args(argv)
    s = settings()
    require_exported_package(s)
    sources = read_lines(s["data_dir"] / "test_2016_flickr.en.gz")[: s["sentences"]]
    references = read_lines(s["data_dir"] / "test_2016_flickr.de.gz")[: s["sentences"]]
    common = engine_job(s, sources, references)
    meta = run_meta(s)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.served:
        records = served_records(s, common, sources)
        (RESULTS / "served.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
        print(table(records))
        return
    # Each engine with all threads in one batch (lanes 1) and, where it has one, with the threads
    # split over two batches decoded in parallel (lanes 2: Parley's lanes, CTranslate2's inter_threads).
    ct2 = {q: str(ctranslate2_model(s["checkpoint"], q)) for q in ("float32", "int8")}
    jobs = [
        {"engine": "parley", "precision": "fp32", "lanes": 2},
        {"engine": "parley", "precision": "int8", "lanes": 1},
        {"engine": "parley", "precision": "int8", "lanes": 2},
        {"engine": "ctranslate2", "precision": "float32", "ct2_model": ct2["float32"], "lanes": 1},
        {"engine": "ctranslate2", "precision": "float32", "ct2_model": ct2["float32"], "lanes": 2},
        {"engine": "ctranslate2", "precision": "int8", "ct2_model": ct2["int8"], "lanes": 1},
        {"engine": "ctranslate2", "precision": "int8", "ct2_model": ct2["int8"], "lanes": 2},
        {"engine": "pytorch", "precision": "fp32", "lanes": 1, "rounds": 1},
    ]
    print(f"loading {len(jobs)} engines ...", flush=True)
    records = engine_records(s, common, jobs)
    print("measuring parley-grpc and parley-scheduler (the server without gRPC) ...", flush=True)
    records += served_records(s, common, sources)
    kv = run_worker({**common, "task": "kv_cache", "steps": 30, "batch_size": 32}, s["server_cpus"])["kv_cache"]

    outputs = {}  # the translations at the largest batch size
    for r in records:
        texts = r.pop("outputs", None)
        if texts and r["batch_size"] == max(s["batch_sizes"]):
            outputs.setdefault((r["engine"], r["precision"], r["beam_size"]), texts)
    checks = {"kv_cache_speedup_at_30_tokens": kv,
              "parley_int8_over_ctranslate2_int8_best_by_round": ratios_by_round(records)}
    for beam in s["beams"]:  # share of sentences with identical output (largest batch size)
        parley = outputs.get(("parley", "fp32", beam))
        checks[f"pytorch_equals_parley_fp32_beam{beam}"] = agreement(outputs.get(("pytorch", "fp32", beam)), parley)
        checks[f"ctranslate2_fp32_equals_parley_fp32_beam{beam}"] = agreement(
            outputs.get(("ctranslate2", "float32", beam)), parley)
    for r in records:
        r["engine"] = r["engine"].replace("float32", "fp32")
        if r["engine"] == "ctranslate2":
            r["precision"] = r["precision"].replace("float32", "fp32")
    (RESULTS / "latest.json").write_text(json.dumps(records, indent=1) + "\n")
    (RESULTS / "latest-meta.json").write_text(json.dumps({**meta, "checks": checks}, indent=1) + "\n")
    plot(records, RESULTS / "throughput.png")
    print()
    print(table(records))
    print()
    print(json.dumps(checks, indent=1))


if __name__ == "__main__":
    main()
