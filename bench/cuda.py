"""`make bench-cuda`: the engine on a CUDA GPU, caches in host memory against caches kept on
the device (IO binding), fp16 and fp32, on test_2016_flickr.

Needs onnxruntime-gpu and a package with an fp16 variant (`python -m export ... --precision
fp32,int8,fp16`). Reports sentences/s, BLEU, the time spent in each ONNX Runtime graph, and how
often the variants translate alike; writes bench/results/cuda.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

import onnxruntime as ort
import sacrebleu

from decoding import DecodingParams
from export.package import ModelPackage
from model.data import read_lines
from server.engine.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
# (beam, batch); host caches only at batch 64, where the two stores are compared
GRID = ((1, 64), (4, 64), (1, 256), (4, 256))


class GraphTimer:
    """Time and count every ONNX Runtime run, per graph."""

    def __init__(self):
        self.seconds, self.calls = collections.Counter(), collections.Counter()
        for method in ("run", "run_with_iobinding"):
            setattr(ort.InferenceSession, method, self._timed(getattr(ort.InferenceSession, method)))

    def _timed(self, method):
        def run(session, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(session, *args, **kwargs)
            finally:
                name = Path(session._model_path).stem if session._model_path else session.get_modelmeta().graph_name
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1
        return run

    def take(self) -> dict:
        spent = {name: [self.calls[name], round(seconds, 3)] for name, seconds in self.seconds.items()}
        self.seconds.clear()
        self.calls.clear()
        return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "multi30k")
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run on the CPU provider")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cuda.json")
    args = parser.parse_args()
    package = ModelPackage.load(args.package)
    sources = read_lines(args.data_dir / "test_2016_flickr.en.gz")[: args.sentences]
    references = read_lines(args.data_dir / "test_2016_flickr.de.gz")[: args.sentences]
    timer, records, texts = GraphTimer(), [], {}
    for precision in [p for p in ("fp16", "fp32") if p in package.precisions]:
        for on_device in (False, True):
            engine = Engine(package, precision=precision, device=args.device, cache_on_device=on_device)
            ids = engine.tokenizer.encode(sources)
            for beam, batch in GRID:
                if batch != 64 and not on_device:
                    continue
                params = [DecodingParams(beam_size=beam)] * batch
                engine.decode(ids[:batch], params[: len(ids[:batch])])  # warm-up: kernels, memory arena
                timer.take()
                start, hypotheses = time.perf_counter(), []
                for i in range(0, len(ids), batch):
                    part = ids[i : i + batch]
                    hypotheses += engine.detokenize_many(engine.decode(part, params[: len(part)]))
                seconds = time.perf_counter() - start
                texts[precision, on_device, beam, batch] = [h[0].text for h in hypotheses]
                records.append(dict(
                    precision=precision, cache_on_device=on_device, beam_size=beam, batch_size=batch,
                    sentences_per_s=round(len(sources) / seconds, 1),
                    bleu=round(sacrebleu.corpus_bleu(texts[precision, on_device, beam, batch], [references]).score, 2),
                    graphs=timer.take()))
                print(records[-1], flush=True)
    agreement = {}
    for (precision, on_device, beam, batch), out in texts.items():
        if on_device and (precision, False, beam, batch) in texts:
            agreement[f"{precision} beam {beam} batch {batch}: device == host caches"] = _same(
                out, texts[precision, False, beam, batch])
        if precision == "fp16" and ("fp32", on_device, beam, batch) in texts:
            agreement[f"beam {beam} batch {batch} device caches {on_device}: fp16 == fp32"] = _same(
                out, texts["fp32", on_device, beam, batch])
    print(json.dumps(agreement, indent=1))
    args.out.write_text(json.dumps({"device": args.device, "onnxruntime": ort.__version__, "records": records,
                                    "agreement": agreement}, indent=1) + "\n")


def _same(a: list[str], b: list[str]) -> float:
    return round(sum(x == y for x, y in zip(a, b)) / len(a), 4)


if __name__ == "__main__":
    main()
