"""The ONNX Runtime step backend: encoder once, then one decoder-step run per token.

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
    def __init__(self, sessions: VariantSessions, src_tokens: np.ndarray):
        self.decoder = sessions.decoder
        outputs = sessions.encoder.run(None, {"src_tokens": src_tokens})
        self.src_mask, self.cross = outputs[0], outputs[1:]  # cross: k_0, v_0, k_1, v_1, ...
        inputs = {i.name: i for i in self.decoder.get_inputs()}
        self.cache_names = [n for n in inputs if n.startswith("cache_k_") or n.startswith("cache_v_")]
        self.cross_names = [n for n in inputs if n.startswith("cross_")]
        self.cache_dtype = _NUMPY_TYPES[inputs["cache_k_0"].type]
        rows, heads, _, head_dim = self.cross[0].shape
        self.cache = [np.zeros((rows, heads, 0, head_dim), self.cache_dtype) for _ in self.cache_names]
        self.cache_mask = np.zeros((rows, 0), dtype=bool)
        self.lengths = np.zeros(rows, dtype=np.int64)  # tokens fed so far = each row's position and next slot
        self.row_source = np.arange(rows)  # which source row each decoder row belongs to

    @property
    def capacity(self) -> int:
        return self.cache_mask.shape[1]

    def _reserve(self, slots: int) -> None:
        if slots <= self.capacity:
            return
        extra = -(-(slots - self.capacity) // CACHE_BLOCK) * CACHE_BLOCK
        self.cache = [np.concatenate([c, np.zeros(c.shape[:2] + (extra,) + c.shape[3:], c.dtype)], axis=2)
                      for c in self.cache]
        self.cache_mask = np.concatenate([self.cache_mask, np.zeros((len(self.lengths), extra), bool)], axis=1)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self._reserve(int(self.lengths.max(initial=0)) + 1)
        feeds = {"tokens": tokens.astype(np.int64, copy=False), "positions": self.lengths,
                 "cache_mask": self.cache_mask, "src_mask": self.src_mask}
        feeds.update(zip(self.cache_names, self.cache))
        feeds.update(zip(self.cross_names, self.cross))
        log_probs, *new_kv = self.decoder.run(None, feeds)
        rows = np.arange(len(tokens))
        for cache, new in zip(self.cache, new_kv):
            cache[rows, :, self.lengths] = new[:, :, 0]
        self.cache_mask[rows, self.lengths] = True
        self.lengths = self.lengths + 1
        return log_probs

    def select(self, rows: np.ndarray) -> None:
        self.cache = [c[rows] for c in self.cache]
        self.cache_mask = self.cache_mask[rows]
        self.lengths = self.lengths[rows]
        sources = self.row_source[rows]
        if not np.array_equal(sources, self.row_source):  # beams reordered within a source share cross K/V
            self.cross = [c[rows] for c in self.cross]
            self.src_mask = self.src_mask[rows]
        self.row_source = sources
