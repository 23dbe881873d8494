"""The engine: text in, hypotheses out. Tokenize, pad, encode, search, detokenize."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Hashable, Sequence

from decoding import DecodingParams, Hypothesis
from decoding.padding import length_order, pad_batch
from decoding.search import Search
from decoding.tokenizer import Tokenizer
from export.package import ModelPackage, PackageError
from server.engine.backend import OnnxStepBackend
from server.engine.session import cuda_available, open_sessions

# On CPU, sources are encoded this many at a time, sorted by length, so each encoder run pads
# only to the longest of similar lengths. Measured, int8, 64 test sentences (56% padding as one
# run): 29.7 ms as one run, 17.3 ms in runs of 16, 15.7 ms in runs of 8, 15.1 ms in runs of 4.
# (Since, the encoder's position-wise layers skip padding, model.layers.Packing, and runs of 8,
# 16 or 32 of a lane's share of 64 cost the same within noise; its attention still pads.)
# On CUDA a run costs its kernel launches, not its padding: all admitted sources in one run.
ENCODE_ROWS = 8


def _cache_ops(sessions):
    from server.engine.device_buffers import CacheOps  # needs onnx: GPU serving only

    return CacheOps(sessions)


@dataclass(frozen=True)
class TextHypothesis:
    text: str
    score: float
    tokens: int  # generated tokens, EOS excluded


def default_precision(package: ModelPackage, device: str) -> str:
    """int8 on CPU, fp16 on CUDA, fp32 where the preferred variant is absent."""
    preferred = "fp16" if device == "cuda" else "int8"
    for precision in (preferred, "fp32"):
        if precision in package.precisions:
            return precision
    has = ", ".join(package.precisions)
    raise PackageError(f"{package.name} has no variant for {device} ({preferred} or fp32; it has {has}): pass "
                       f"--precision {package.precisions[0]} to run it there anyway, or re-export it with "
                       f"--precision fp32,{preferred}")


def resolve(package: ModelPackage, precision: str | None, device: str | None) -> tuple[str, str]:
    """The (precision, device) an engine runs: CUDA where this onnxruntime has it, and the
    device's default variant, unless asked otherwise."""
    device = device or ("cuda" if cuda_available() else "cpu")
    return precision or default_precision(package, device), device


class TextFront(ABC):
    """What both engines share: the model's tokenizer and limits, texts in and out."""

    def __init__(self, package: ModelPackage):
        self.package = package
        self.tokenizer = Tokenizer(package.tokenizer_path)

    @property
    def max_source_tokens(self) -> int:
        """Longest source text, in tokens (one position is taken by the EOS appended to it)."""
        return self.package.max_source_tokens - 1

    def check_lengths(self, sources: Sequence[Sequence[int]]) -> None:
        too_long = [len(s) for s in sources if len(s) > self.max_source_tokens]
        if too_long:
            raise ValueError(f"source of {max(too_long)} tokens exceeds the model's limit of {self.max_source_tokens}")

    @abstractmethod
    def decode(self, sources: Sequence[Sequence[int]], params: Sequence[DecodingParams]) -> list[list[Hypothesis]]:
        """Decode a fixed batch of token-id sources to completion; one DecodingParams per source."""

    def detokenize_many(self, results: Sequence[Sequence[Hypothesis]]) -> list[list[TextHypothesis]]:
        """Detokenize the hypotheses of many sources in one tokenizer call."""
        texts = iter(self.tokenizer.decode([h.tokens for hyps in results for h in hyps]))
        return [[TextHypothesis(next(texts), h.score, len(h.tokens)) for h in hyps] for hyps in results]

    def translate(self, texts: Sequence[str], params: Sequence[DecodingParams]) -> list[list[TextHypothesis]]:
        return self.detokenize_many(self.decode(self.tokenizer.encode(texts), params))


class Engine(TextFront):
    """One model's ONNX Runtime sessions and the decode batches that run on them, in this
    process (server.engine.lanes runs one in each of several worker processes)."""

    def __init__(self, package: ModelPackage, precision: str | None = None, device: str | None = None,
                 threads: int = 0, optimization: str = "all", cache_on_device: bool | None = None,
                 graphs: dict[str, Path] | None = None):
        """cache_on_device: keep the decoder's caches on the execution provider's device and run
        with IO binding (server.engine.device_buffers); default: on CUDA only. graphs: the
        variant's graphs as session.shared_graphs saved them, opened instead of the package's."""
        super().__init__(package)
        self.precision, self.device = resolve(package, precision, device)
        cache_on_device = self.device == "cuda" if cache_on_device is None else cache_on_device
        self.sessions = open_sessions(package, self.precision, self.device, threads, optimization, graphs)
        self._device_ops = _cache_ops(self.sessions) if cache_on_device else None
        special = package.special_tokens
        self.pad_id, self.bos_id, self.eos_id = special["pad"], special["bos"], special["eos"]

    def new_search(self) -> Search:
        """An empty decode batch that sources can join at any step (see admit)."""
        return Search(OnnxStepBackend(self.sessions, device_ops=self._device_ops), self.bos_id, self.eos_id)

    def admit(self, batch: Search, keys: Sequence[Hashable], sources: Sequence[Sequence[int]],
              params: Sequence[DecodingParams]) -> None:
        """Encode token-id sources (EOS appended here) and add them to a running batch."""
        self.check_lengths(sources)
        by_length = length_order([len(s) for s in sources])
        run = ENCODE_ROWS if self.device == "cpu" else max(len(sources), 1)
        batch.backend.extend(*(
            pad_batch([list(sources[i]) + [self.eos_id] for i in by_length[first : first + run]], self.pad_id)
            for first in range(0, len(by_length), run)))
        batch.add([keys[i] for i in by_length], [self._capped(params[i]) for i in by_length])

    def _capped(self, params: DecodingParams) -> DecodingParams:
        """params with max_length and min_length within the model's output positions (beyond
        them its graphs fail): a longer output cannot be generated anyway."""
        cap = self.package.max_output_tokens
        if params.max_length <= cap:
            return params
        return replace(params, max_length=cap, min_length=min(params.min_length, cap))

    def decode(self, sources: Sequence[Sequence[int]], params: Sequence[DecodingParams]) -> list[list[Hypothesis]]:
        results: list[list[Hypothesis]] = [[] for _ in sources]
        if not sources:
            return results
        batch = self.new_search()
        self.admit(batch, range(len(sources)), sources, params)
        while len(batch):
            for key, hypotheses in batch.step():
                results[key] = hypotheses
        return results
