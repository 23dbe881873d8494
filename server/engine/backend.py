"""The ONNX Runtime step backend: encoder once per source, then one decoder-step run per token.

Sources may join at any step (``extend``): their rows start at position 0 while the
others go on, which the decoder-step graph allows because every row carries its own
position and cache-validity mask.

The self-attention cache is preallocated here and written in place: the decoder-step
graph returns only each layer's new key/value (B, H, 1, dk), which is stored into the
row's next slot. The cache grows in blocks of CACHE_BLOCK slots, so attention never
looks at more than CACHE_BLOCK - 1 empty slots and a copy happens once per block, not
once per step (growing by concatenation would copy the whole cache at every step).
"""

from __future__ import annotations

import numpy as np

from decoding import Candidates
from export.io import STEP_OUTPUTS
from server.engine.session import VariantSessions

CACHE_BLOCK = 16

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxStepBackend:
    def __init__(self, sessions: VariantSessions, src_tokens: np.ndarray | None = None):
        self.encoder, self.decoder = sessions.encoder, sessions.decoder
        inputs = {i.name: i for i in self.decoder.get_inputs()}
        self.cache_names = [n for n in inputs if n.startswith("cache_k_") or n.startswith("cache_v_")]
        self.cross_names = [n for n in inputs if n.startswith("cross_")]  # k_0, v_0, k_1, v_1, ...
        self.new_kv_names = [o.name for o in self.decoder.get_outputs() if o.name.startswith("new_")]
        self.vocab_size = self.decoder.get_outputs()[0].shape[1]
        dtype = _NUMPY_TYPES[inputs["cache_k_0"].type]
        heads, head_dim = inputs["cache_k_0"].shape[1], inputs["cache_k_0"].shape[3]
        self.cache = [np.zeros((0, heads, 0, head_dim), dtype) for _ in self.cache_names]
        self.cross = [np.zeros((0, heads, 0, head_dim), dtype) for _ in self.cross_names]
        self.src_mask = np.zeros((0, 0), dtype=bool)
        self.lengths = np.zeros(0, dtype=np.int64)  # tokens fed so far = each row's position and next slot
        self.row_source = np.zeros(0, dtype=np.int64)  # which source each row decodes
        self.sources_seen = 0
        if src_tokens is not None:
            self.extend(src_tokens)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def extend(self, src_tokens: np.ndarray) -> None:
        """Encode new right-padded sources (B, S) and append one fresh row for each."""
        outputs = self.encoder.run(None, {"src_tokens": src_tokens})
        src_mask, cross = outputs[0], outputs[1:]
        added = len(src_tokens)
        width = max(self.src_mask.shape[1], src_mask.shape[1])
        self.src_mask = np.concatenate([_pad_axis(self.src_mask, 1, width), _pad_axis(src_mask, 1, width)])
        self.cross = [np.concatenate([_pad_axis(old, 2, width), _pad_axis(new, 2, width)])
                      for old, new in zip(self.cross, cross)]
        self.cache = [np.concatenate([c, np.zeros((added,) + c.shape[1:], c.dtype)]) for c in self.cache]
        self.lengths = np.concatenate([self.lengths, np.zeros(added, np.int64)])
        self.row_source = np.concatenate([self.row_source, self.sources_seen + np.arange(added)])
        self.sources_seen += added

    @property
    def capacity(self) -> int:
        return self.cache[0].shape[2]

    def _reserve(self, slots: int) -> None:
        if slots <= self.capacity:
            return
        extra = -(-(slots - self.capacity) // CACHE_BLOCK) * CACHE_BLOCK
        self.cache = [np.concatenate([c, np.zeros(c.shape[:2] + (extra,) + c.shape[3:], c.dtype)], axis=2)
                      for c in self.cache]

    def step(self, tokens: np.ndarray, top_k: int) -> Candidates:
        top_log_probs, top_tokens, eos_log_probs = self._run(tokens, top_k, STEP_OUTPUTS[1:])
        return Candidates(top_log_probs, top_tokens, eos_log_probs)

    def step_log_probs(self, tokens: np.ndarray) -> np.ndarray:
        """Like step, but returns the full (rows, vocab) log-probabilities (for verification)."""
        return self._run(tokens, 1, STEP_OUTPUTS[:1])[0]

    def _run(self, tokens: np.ndarray, top_k: int, outputs: list[str]) -> list[np.ndarray]:
        self._reserve(int(self.lengths.max(initial=0)) + 1)
        # A row's keys fill slots 0 .. length-1 of its cache, so validity follows from the lengths.
        cache_mask = np.arange(self.capacity) < self.lengths[:, None]
        feeds = {"tokens": tokens.astype(np.int64, copy=False), "positions": self.lengths,
                 "cache_mask": cache_mask, "src_mask": self.src_mask, "top_k": np.array(top_k, np.int64)}
        feeds.update(zip(self.cache_names, self.cache))
        feeds.update(zip(self.cross_names, self.cross))
        results = self.decoder.run(outputs + self.new_kv_names, feeds)
        rows = np.arange(self.rows)
        for cache, new in zip(self.cache, results[len(outputs) :]):
            cache[rows, :, self.lengths] = new[:, :, 0]
        self.lengths = self.lengths + 1
        return results[: len(outputs)]

    def select(self, rows: np.ndarray) -> None:
        self.lengths = self.lengths[rows]
        # Keep whole blocks up to the oldest row; slots past it are empty in every row.
        capacity = min(self.capacity, -(-int(self.lengths.max(initial=0)) // CACHE_BLOCK) * CACHE_BLOCK)
        self.cache = [_take_rows(c, rows, 2, capacity) for c in self.cache]
        sources = self.row_source[rows]
        if not np.array_equal(sources, self.row_source):  # beams reordered within a source share cross K/V
            self.src_mask = self.src_mask[rows]
            width = int(self.src_mask.any(axis=0).nonzero()[0].max(initial=-1)) + 1  # drop all-padding columns
            self.src_mask = np.ascontiguousarray(self.src_mask[:, :width])
            self.cross = [_take_rows(c, rows, 2, width) for c in self.cross]
        self.row_source = sources


def _take_rows(array: np.ndarray, rows: np.ndarray, axis: int, length: int) -> np.ndarray:
    """array[rows], cut to length along axis. A whole-row take is a plain memcpy per row, several
    times faster than a strided fancy-index copy, so the cut is a separate (rare) step."""
    taken = np.take(array, rows, axis=0)
    if length < array.shape[axis]:
        taken = np.ascontiguousarray(taken[(slice(None),) * axis + (slice(0, length),)])
    return taken


def _pad_axis(array: np.ndarray, axis: int, width: int) -> np.ndarray:
    """Zero/False-pad one axis of an array up to width."""
    missing = width - array.shape[axis]
    if missing == 0:
        return array
    pad = [(0, 0)] * array.ndim
    pad[axis] = (0, missing)
    return np.pad(array, pad)
