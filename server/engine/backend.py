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

from server.engine.session import VariantSessions

CACHE_BLOCK = 16

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxStepBackend:
    def __init__(self, sessions: VariantSessions, src_tokens: np.ndarray | None = None):
        self.encoder, self.decoder = sessions.encoder, sessions.decoder
        inputs = {i.name: i for i in self.decoder.get_inputs()}
        self.cache_names = [n for n in inputs if n.startswith("cache_k_") or n.startswith("cache_v_")]
        self.cross_names = [n for n in inputs if n.startswith("cross_")]  # k_0, v_0, k_1, v_1, ...
        dtype = _NUMPY_TYPES[inputs["cache_k_0"].type]
        heads, head_dim = inputs["cache_k_0"].shape[1], inputs["cache_k_0"].shape[3]
        self.cache = [np.zeros((0, heads, 0, head_dim), dtype) for _ in self.cache_names]
        self.cross = [np.zeros((0, heads, 0, head_dim), dtype) for _ in self.cross_names]
        self.cache_mask = np.zeros((0, 0), dtype=bool)
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
        self.cache_mask = np.concatenate([self.cache_mask, np.zeros((added, self.capacity), bool)])
        self.lengths = np.concatenate([self.lengths, np.zeros(added, np.int64)])
        self.row_source = np.concatenate([self.row_source, self.sources_seen + np.arange(added)])
        self.sources_seen += added

    @property
    def capacity(self) -> int:
        return self.cache_mask.shape[1]

    def _reserve(self, slots: int) -> None:
        if slots <= self.capacity:
            return
        extra = -(-(slots - self.capacity) // CACHE_BLOCK) * CACHE_BLOCK
        self.cache = [np.concatenate([c, np.zeros(c.shape[:2] + (extra,) + c.shape[3:], c.dtype)], axis=2)
                      for c in self.cache]
        self.cache_mask = np.concatenate([self.cache_mask, np.zeros((self.rows, extra), bool)], axis=1)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self._reserve(int(self.lengths.max(initial=0)) + 1)
        feeds = {"tokens": tokens.astype(np.int64, copy=False), "positions": self.lengths,
                 "cache_mask": self.cache_mask, "src_mask": self.src_mask}
        feeds.update(zip(self.cache_names, self.cache))
        feeds.update(zip(self.cross_names, self.cross))
        log_probs, *new_kv = self.decoder.run(None, feeds)
        rows = np.arange(self.rows)
        for cache, new in zip(self.cache, new_kv):
            cache[rows, :, self.lengths] = new[:, :, 0]
        self.cache_mask[rows, self.lengths] = True
        self.lengths = self.lengths + 1
        return log_probs

    def select(self, rows: np.ndarray) -> None:
        self.lengths = self.lengths[rows]
        # Keep whole blocks up to the oldest row; slots past it are empty in every row.
        capacity = min(self.capacity, -(-int(self.lengths.max(initial=0)) // CACHE_BLOCK) * CACHE_BLOCK)
        self.cache = [np.ascontiguousarray(c[rows, :, :capacity]) for c in self.cache]
        self.cache_mask = np.ascontiguousarray(self.cache_mask[rows, :capacity])
        sources = self.row_source[rows]
        if not np.array_equal(sources, self.row_source):  # beams reordered within a source share cross K/V
            self.src_mask = self.src_mask[rows]
            width = int(self.src_mask.any(axis=0).nonzero()[0].max(initial=-1)) + 1  # drop all-padding columns
            self.src_mask = np.ascontiguousarray(self.src_mask[:, :width])
            self.cross = [np.ascontiguousarray(c[rows, :, :width]) for c in self.cross]
        self.row_source = sources


def _pad_axis(array: np.ndarray, axis: int, width: int) -> np.ndarray:
    """Zero/False-pad one axis of an array up to width."""
    missing = width - array.shape[axis]
    if missing == 0:
        return array
    pad = [(0, 0)] * array.ndim
    pad[axis] = (0, missing)
    return np.pad(array, pad)
