"""The engine: text in, hypotheses out. Tokenize, pad, encode, search, detokenize."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np

from decoding import DecodingParams, Hypothesis
from decoding.padding import length_order, pad_batch
from decoding.search import Search
from decoding.tokenizer import Tokenizer
from export.package import ModelPackage
from server.engine.backend import OnnxStepBackend
from server.engine.session import cuda_available, open_sessions

# Sources are encoded this many at a time, sorted by length, so each encoder run pads only to
# the longest of similar lengths. Measured, int8, 64 test sentences (56% padding as one run):
# 29.7 ms as one run, 17.3 ms in runs of 16, 15.7 ms in runs of 8, 15.1 ms in runs of 4.
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
    return preferred if preferred in package.precisions else "fp32"


def length_shares(lengths: Sequence[int], lanes: int) -> list[list[int]]:
    """Indices of sources for each lane: sorted by length, cut into contiguous shares of about
    equal token counts. A lane of similar lengths pads its sources and caches less than one
    of every other source (CTranslate2 sorts its sub-batches the same way), and equal token
    counts let the lanes finish together. Measured, int8, 2 lanes, batch 64, 512 sentences:
    greedy 936 -> 996-1028, beam 4 331-343 -> 361-371 sentences/s against dealing in turn.
    """
    order = length_order(lengths)
    cost = np.cumsum([lengths[i] + 1 for i in order])  # + 1: the EOS every source gets
    inner = [int(np.searchsorted(cost, cost[-1] * k / lanes, side="right")) for k in range(1, lanes)]
    cuts = [0] + inner + [len(order)]
    return [order[cuts[k] : cuts[k + 1]] for k in range(lanes)]


class Engine:
    """One model's sessions, in one or more lanes.

    A lane is a set of ONNX Runtime sessions that decodes its own batch. With two lanes on
    two threads each lane gets one ONNX Runtime thread: while one lane runs Python (search,
    cache gathers, detokenising), the other keeps a core busy with its decoder step, where
    one lane with two threads leaves a core idle during its Python work. Measured on 2
    cores, int8, batch 64 split across the lanes: greedy 731 -> 970 sentences/s, beam 4
    301 -> 354.
    """

    def __init__(self, package: ModelPackage, precision: str | None = None, device: str | None = None,
                 threads: int = 0, optimization: str = "all", lanes: int = 1, cache_on_device: bool | None = None):
        """cache_on_device: keep the decoder's caches on the execution provider's device and run
        with IO binding (server.engine.device_buffers); default: on CUDA only."""
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        self.package = package
        self.device = device or ("cuda" if cuda_available() else "cpu")
        self.precision = precision or default_precision(package, self.device)
        cache_on_device = self.device == "cuda" if cache_on_device is None else cache_on_device
        lane_threads = max(1, (threads or os.cpu_count() or 1) // lanes) if lanes > 1 else threads
        self.lanes = [open_sessions(package, self.precision, self.device, lane_threads, optimization)
                      for _ in range(lanes)]
        self._device_ops = [_cache_ops(lane) for lane in self.lanes] if cache_on_device else [None] * lanes
        self._lane_pool = ThreadPoolExecutor(lanes, thread_name_prefix="parley-lane") if lanes > 1 else None
        self.tokenizer = Tokenizer(package.tokenizer_path)
        special = package.special_tokens
        self.pad_id, self.bos_id, self.eos_id = special["pad"], special["bos"], special["eos"]

    @property
    def max_source_tokens(self) -> int:
        """Longest source text, in tokens (one position is taken by the EOS appended to it)."""
        return self.package.max_source_tokens - 1

    def new_search(self, lane: int = 0) -> Search:
        """An empty decode batch on one lane that sources can join at any step (see admit)."""
        return Search(OnnxStepBackend(self.lanes[lane], device_ops=self._device_ops[lane]), self.bos_id, self.eos_id)

    def admit(self, batch: Search, keys: Sequence[Hashable], sources: Sequence[Sequence[int]],
              params: Sequence[DecodingParams]) -> None:
        """Encode token-id sources (EOS appended here) and add them to a running batch."""
        too_long = [len(s) for s in sources if len(s) > self.max_source_tokens]
        if too_long:
            raise ValueError(f"source of {max(too_long)} tokens exceeds the model's limit of {self.max_source_tokens}")
        by_length = length_order([len(s) for s in sources])
        batch.backend.extend(*(
            pad_batch([list(sources[i]) + [self.eos_id] for i in by_length[first : first + ENCODE_ROWS]], self.pad_id)
            for first in range(0, len(by_length), ENCODE_ROWS)))
        batch.add([keys[i] for i in by_length], [params[i] for i in by_length])

    def decode(self, sources: Sequence[Sequence[int]], params: Sequence[DecodingParams]) -> list[list[Hypothesis]]:
        """Decode a fixed batch to completion (offline use); one DecodingParams per source.

        With several lanes, each decodes a share of the sources concurrently (length_shares).
        """
        lanes = min(len(self.lanes), len(sources))
        if lanes <= 1:
            return self._decode_on(0, sources, params)
        shares = length_shares([len(s) for s in sources], lanes)
        parts = self._lane_pool.map(
            lambda lane: self._decode_on(lane, [sources[i] for i in shares[lane]], [params[i] for i in shares[lane]]),
            range(lanes))
        results: list[list[Hypothesis]] = [[] for _ in sources]
        for share, part in zip(shares, parts):
            for i, hypotheses in zip(share, part):
                results[i] = hypotheses
        return results

    def _decode_on(self, lane: int, sources: Sequence[Sequence[int]],
                   params: Sequence[DecodingParams]) -> list[list[Hypothesis]]:
        results: list[list[Hypothesis]] = [[] for _ in sources]
        if not sources:
            return results
        batch = self.new_search(lane)
        self.admit(batch, range(len(sources)), sources, params)
        while len(batch):
            for key, hypotheses in batch.step():
                results[key] = hypotheses
        return results

    def detokenize_many(self, results: Sequence[Sequence[Hypothesis]]) -> list[list[TextHypothesis]]:
        """Detokenize the hypotheses of many sources in one tokenizer call."""
        texts = iter(self.tokenizer.decode([h.tokens for hyps in results for h in hyps]))
        return [[TextHypothesis(next(texts), h.score, len(h.tokens)) for h in hyps] for hyps in results]

    def translate(self, texts: Sequence[str], params: Sequence[DecodingParams]) -> list[list[TextHypothesis]]:
        return self.detokenize_many(self.decode(self.tokenizer.encode(texts), params))
