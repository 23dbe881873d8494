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
from server.engine.buffers import HostBuffers
from server.engine.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
# (beam, batch); host caches only at batch 64, where the two stores are compared
GRID = ((1, 64), (4, 64), (1, 256), (4, 256))


class GraphTimer:
    """Time and count every ONNX Runtime run, per graph, while in its `with` block."""

    def __init__(self):
        self.seconds, self.calls = collections.Counter(), collections.Counter()
        self._replaced: list[tuple[type, str, object]] = []

    def __enter__(self) -> "GraphTimer":
        def graph_name(session: ort.InferenceSession) -> str:
            return Path(session._model_path).stem if session._model_path else session.get_modelmeta().graph_name

        for method in ("run", "run_with_iobinding"):
            self._replace(ort.InferenceSession, method, graph_name)
        # Host caches run the decoder step beneath InferenceSession.run (buffers.py).
        self._replace(HostBuffers, "run_decoder", lambda buffers: "decoder_step")
        return self

    def __exit__(self, *exc_info) -> None:
        for owner, name, method in reversed(self._replaced):
            setattr(owner, name, method)
        self._replaced.clear()

    def _replace(self, owner: type, name: str, graph_name) -> None:
        method = getattr(owner, name)

        def timed(instance, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(instance, *args, **kwargs)
            finally:
                graph = graph_name(instance)
                self.seconds[graph] += time.perf_counter() - start
                self.calls[graph] += 1

        self._replaced.append((owner, name, method))
        setattr(owner, name, timed)

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
    records, texts = [], {}
    with GraphTimer() as timer:
        for precision in [p for p in ("fp16", "fp32") if p in package.precisions]:
            for on_device in (False, True):
                engine = Engine(package, precision=precision, device=args.device, cache_on_device=on_device)
                ids = engine.tokenizer.encode(sources)
                for beam, batch in GRID:
                    if batch != 64 and not on_device:
                        continue
                    seconds, out = translate_all(engine, ids, beam, batch, timer)
                    texts[precision, on_device, beam, batch] = out
                    records.append(dict(precision=precision, cache_on_device=on_device, beam_size=beam,
                                        batch_size=batch, sentences_per_s=round(len(sources) / seconds, 1),
                                        bleu=round(sacrebleu.corpus_bleu(out, [references]).score, 2),
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


def translate_all(engine: Engine, ids: list[list[int]], beam: int, batch: int,
                  timer: GraphTimer) -> tuple[float, list[str]]:
    """Seconds to translate ids in batches of `batch` after a warm-up batch (kernels, memory
    arena; its graph runs are not counted), and each text's best translation."""
    params = [DecodingParams(beam_size=beam)] * batch
    engine.decode(ids[:batch], params[: len(ids[:batch])])
    timer.take()
    start, hypotheses = time.perf_counter(), []
    for i in range(0, len(ids), batch):
        part = ids[i : i + batch]
        hypotheses += engine.detokenize_many(engine.decode(part, params[: len(part)]))
    return time.perf_counter() - start, [h[0].text for h in hypotheses]


def _same(a: list[str], b: list[str]) -> float:
    return round(sum(x == y for x, y in zip(a, b)) / len(a), 4)


if __name__ == "__main__":
    main()
