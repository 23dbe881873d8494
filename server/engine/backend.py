"""The ONNX Runtime step backend: encoder once per source, then one decoder-step run per token.

Sources may join at any step (``extend``): their rows start at position 0 while the
others go on, which the decoder-step graph allows because every row carries its own
position and cache-validity mask.

Memory layout, chosen to copy as little as possible per step:
- The self-attention cache is preallocated and written in place: the decoder-step graph
  returns only each layer's new key/value (B, H, 1, dk), stored into the row's next slot.
  It grows in blocks of CACHE_BLOCK slots, so a copy happens once per block, not once per
  step (growing by concatenation would copy the whole cache at every step).
- Rows live in buffers with spare row capacity. New rows are written into the buffer rows
  of finished rows, then into the spare rows (no copy of the others); the decoder runs on
  the prefix [0, used), a zero-copy view.
- A finished row is not compacted away at once: it stays, dead, until dead rows exceed
  DEAD_ROW_SHARE of the buffer, because decoding a few dead rows costs less than copying
  every live row's cache and cross-attention keys at each finish. Beam reordering has to
  gather the cache anyway, and compacts at the same time.
- Cross-attention keys/values are stored once per source, not once per row: the beams of
  a source share them (decoding.grid), so beam reordering never copies them, and they are
  compacted only when sources leave.
"""

from __future__ import annotations

import numpy as np

from decoding import Candidates
from decoding.grid import query_grid
from export.io import STEP_OUTPUTS
from server.engine.session import VariantSessions

CACHE_BLOCK = 16  # cache slots are added this many at a time
SOURCE_BLOCK = 8  # the padded source width grows this many positions at a time
DEAD_ROW_SHARE = 0.25  # compact when this share of the decoded rows is finished

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
        # Row buffers, indexed by buffer row: rows [0, used) are decoded, `live` lists the ones still wanted.
        self.cache = [np.zeros((0, heads, 0, head_dim), dtype) for _ in self.cache_names]
        self.lengths = np.zeros(0, dtype=np.int64)  # tokens fed so far = each row's position and next slot
        self.row_source = np.zeros(0, dtype=np.int64)  # each buffer row's source: its index in the source buffers
        self.live = np.zeros(0, dtype=np.int64)  # buffer row of each row the search sees, in its order
        self.used = 0
        # Source buffers, one entry per source, shared by its rows: [0, sources) are in use.
        self.cross = [np.zeros((0, heads, 0, head_dim), dtype) for _ in self.cross_names]
        self.src_mask = np.zeros((0, 0), dtype=bool)
        self.sources = 0
        if src_tokens is not None:
            self.extend(src_tokens)

    @property
    def rows(self) -> int:
        return len(self.live)

    @property
    def capacity(self) -> int:
        return self.cache[0].shape[2]

    @property
    def padding_ratio(self) -> float:
        """Share of padded positions among the sources decoded now."""
        return 1.0 - float(self.src_mask[: self.sources].mean()) if self.sources else 0.0

    def extend(self, src_tokens: np.ndarray) -> None:
        """Encode new right-padded sources (B, S) and add one fresh row for each.

        New rows take the buffer rows of finished (dead) rows first and new sources the
        entries no row reads any more, so a batch that sources keep joining and leaving
        neither copies its cache nor grows.
        """
        outputs = self.encoder.run(None, {"src_tokens": src_tokens})
        src_mask, cross = outputs[0], outputs[1:]
        added, width = src_mask.shape
        reused_rows = np.setdiff1d(np.arange(self.used), self.live)[:added]
        still_read = np.unique(self.row_source[np.setdiff1d(np.arange(self.used), reused_rows)])
        reused_sources = np.setdiff1d(np.arange(self.sources), still_read)[:added]
        more_rows, more_sources = added - len(reused_rows), added - len(reused_sources)
        if self.used + more_rows > len(self.lengths):
            self._resize(rows=max(self.used + more_rows, len(self.lengths) * 3 // 2 + 8))
        if self.sources + more_sources > len(self.src_mask):
            self._resize(sources=max(self.sources + more_sources, len(self.src_mask) * 3 // 2 + 8))
        if width > self.src_mask.shape[1]:
            self._resize(width=-(-width // SOURCE_BLOCK) * SOURCE_BLOCK)
        appended_sources = slice(self.sources, self.sources + more_sources)
        sources = np.concatenate([reused_sources, np.arange(appended_sources.start, appended_sources.stop)])
        self.src_mask[sources] = False
        self.src_mask[sources, :width] = src_mask
        appended_rows = slice(self.used, self.used + more_rows)
        rows = np.concatenate([reused_rows, np.arange(appended_rows.start, appended_rows.stop)])
        for buffer, values in zip(self.cross, cross):
            buffer[appended_sources] = 0
            buffer[sources, :, :width] = values
        for buffer in self.cache:
            # Spare rows may hold anything (gathers allocate them uninitialised); masked slots get
            # zero attention weight, but 0 x NaN is NaN, so the values there must be finite.
            # Reused rows and entries hold values the model computed: finite already.
            buffer[appended_rows] = 0
        self.lengths[rows] = 0
        self.row_source[rows] = sources
        self.live = np.concatenate([self.live, rows])
        self.used += more_rows
        self.sources += more_sources

    def step(self, tokens: np.ndarray, top_k: int) -> Candidates:
        top_log_probs, top_tokens, eos_log_probs = self._run(tokens, top_k, STEP_OUTPUTS[1:])
        return Candidates(top_log_probs, top_tokens, eos_log_probs)

    def step_log_probs(self, tokens: np.ndarray) -> np.ndarray:
        """Like step, but returns the full (rows, vocab) log-probabilities (for verification)."""
        return self._run(tokens, 1, STEP_OUTPUTS[:1])[0]

    def _run(self, tokens: np.ndarray, top_k: int, outputs: list[str]) -> list[np.ndarray]:
        live, used = self.live, self.used
        needed = int(self.lengths[live].max(initial=0)) + 1
        if needed > self.capacity:
            self._resize(capacity=-(-needed // CACHE_BLOCK) * CACHE_BLOCK)
        in_order = len(live) == used and np.array_equal(live, np.arange(used))  # else dead or reused rows
        fed = tokens.astype(np.int64, copy=False) if in_order else np.zeros(used, np.int64)
        if not in_order:
            fed[live] = tokens
        lengths = self.lengths[:used]
        slot_row, row_slot = query_grid(self.row_source[:used], self.sources)
        # A row's keys fill slots 0 .. length-1 of its cache, so validity follows from the lengths.
        feeds = {"tokens": fed, "positions": lengths, "cache_mask": np.arange(self.capacity) < lengths[:, None],
                 "src_mask": self.src_mask[: self.sources], "slot_row": slot_row, "row_slot": row_slot,
                 "top_k": np.array(top_k, np.int64)}
        feeds.update((name, buffer[:used]) for name, buffer in zip(self.cache_names, self.cache))
        feeds.update((name, buffer[: self.sources]) for name, buffer in zip(self.cross_names, self.cross))
        results = self.decoder.run(outputs + self.new_kv_names, feeds)
        slots = self.lengths[live]
        for buffer, new in zip(self.cache, results[len(outputs) :]):
            buffer[live, :, slots] = new[live, :, 0]
        self.lengths[live] += 1
        return results[: len(outputs)] if in_order else [r[live] for r in results[: len(outputs)]]

    def select(self, rows: np.ndarray) -> None:
        """Keep these rows, in this order; removals are lazy, reorders gather at once."""
        chosen = self.live[rows]
        if np.all(np.diff(rows) > 0):  # rows only leave: keep them in place as dead rows for now
            self.lengths[np.setdiff1d(self.live, chosen)] = 0  # a dead row's position must stay in range
            self.live = chosen
            if self.used and (self.used - len(chosen)) / self.used > DEAD_ROW_SHARE:
                self._compact(chosen)
        else:
            self._compact(chosen)

    def _compact(self, order: np.ndarray) -> None:
        """Gather the buffer rows in `order` to the front, dropping sources no row needs any more
        and cutting cache and source width to what the rows left need."""
        n = len(order)
        next_slot = int(self.lengths[order].max(initial=0)) + 1  # keep room for the coming step
        capacity = min(self.capacity, -(-next_slot // CACHE_BLOCK) * CACHE_BLOCK)
        self.cache = [_gather(c, order, 2, capacity) for c in self.cache]
        row_source = self.row_source[order]
        kept_sources = np.unique(row_source)
        if len(kept_sources) < self.sources:  # beams reordering within their sources leave these alone
            width = int(self.src_mask[kept_sources].any(axis=0).nonzero()[0].max(initial=-1)) + 1
            width = -(-width // SOURCE_BLOCK) * SOURCE_BLOCK
            self.cross = [_gather(c, kept_sources, 2, width) for c in self.cross]
            self.src_mask = _gather(self.src_mask, kept_sources, 1, width)
            renumbered = np.zeros(self.sources, np.int64)
            renumbered[kept_sources] = np.arange(len(kept_sources))
            row_source = renumbered[row_source]
            self.sources = len(kept_sources)
        self.lengths = np.resize(self.lengths[order], len(self.cache[0]))
        self.row_source = np.resize(row_source, len(self.cache[0]))
        self.live = np.arange(n)
        self.used = n

    def _resize(self, rows: int | None = None, capacity: int | None = None, sources: int | None = None,
                width: int | None = None) -> None:
        """Reallocate, zero-filled, only the buffers whose rows, cache slots, sources or source positions grow."""
        if capacity or rows:
            capacity, cache_rows = capacity or self.capacity, rows or len(self.lengths)
            self.cache = [_copy_into(c, (cache_rows, c.shape[1], capacity, c.shape[3])) for c in self.cache]
        if rows:
            self.lengths = _copy_into(self.lengths, (rows,))
            self.row_source = _copy_into(self.row_source, (rows,))
        if sources or width:
            width, sources = width or self.src_mask.shape[1], sources or len(self.src_mask)
            self.cross = [_copy_into(c, (sources, c.shape[1], width, c.shape[3])) for c in self.cross]
            self.src_mask = _copy_into(self.src_mask, (sources, width))


def _gather(array: np.ndarray, order: np.ndarray, axis: int, length: int) -> np.ndarray:
    """array[order] cut to `length` along axis, in a buffer with at least as many rows as array.

    A whole-row take is a plain memcpy per row, several times faster than a strided
    fancy-index copy, so the cut is a separate step, taken only when it shrinks.
    """
    rows = max(len(array), len(order))
    if length >= array.shape[axis]:
        buffer = np.empty((rows,) + array.shape[1:], array.dtype)
        np.take(array, order, axis=0, out=buffer[: len(order)], mode="clip")  # "raise" would buffer a copy
        return buffer
    taken = np.take(array, order, axis=0)[(slice(None),) * axis + (slice(0, length),)]
    buffer = np.empty((rows,) + taken.shape[1:], array.dtype)
    buffer[: len(order)] = taken
    return buffer


def _copy_into(array: np.ndarray, shape: tuple) -> np.ndarray:
    """A zero-filled array of `shape` holding `array` in its leading corner."""
    out = np.zeros(shape, array.dtype)
    common = tuple(slice(0, min(a, b)) for a, b in zip(array.shape, shape))
    out[common] = array[common]
    return out
