"""The ONNX Runtime step backend: encoder once per source, then one decoder-step run per token.

Sources may join at any step (``extend``): their rows start at position 0 while the
others go on, which the decoder-step graph allows because every row carries its own
position and cache-validity mask.

This class keeps the book: which buffer row holds which row of the search, each row's
length and source, which source entries are in use. The tensors themselves live in a
buffer store (buffers.py: host memory; device_buffers.py: the execution provider's device),
which carries out its decisions:
- The self-attention cache grows in blocks of CACHE_BLOCK slots, so a copy happens once per
  block, not once per step.
- The decoded rows are always buffer rows [0, used), none dead, and `live` maps the search's
  order onto them, so reordering beams moves no cache. When rows leave or a beam is kept
  twice (beam search continuing it two ways), only the rows that must move are copied: a
  second keep, or a row above the new end, into a buffer row that no kept row holds. A
  step thus copies the rows that branched or fill a finished row's place, never every
  row. Measured, int8, one lane, one thread, CPU time, beam 4: 188-204 -> 211-215
  sentences/s in continuous batching, 237-254 -> 253-256 offline, against gathering every
  row at each reorder and decoding finished rows until they were a quarter of the batch.
- Source entries are kept the same way: when the last row of a source leaves, the last
  entry moves into its place (cross-attention keys/values of one source, not every
  source's), so finished sources cost nothing more. Measured, int8, one lane, one thread,
  320 sentences (CPU time): select 134 -> 63 ms of 1.29 -> 1.17 s at beam 4 in batches of
  16, 32-39 -> 18-19 ms of 0.76-0.83 -> 0.73-0.77 s greedy in batches of 4, against
  gathering every row and source once a quarter of the sources had finished.
- New rows and sources are appended, so a batch that sources keep joining and leaving does
  not grow.
- Cross-attention keys/values are stored once per source, not once per row: the beams of
  a source share them (decoding.grid), so beam reordering never copies them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from decoding import Candidates, _native
from decoding.grid import query_grid
from export.io import STEP_OUTPUTS
from server.engine.buffers import CacheLayout, HostBuffers, copy_into
from server.engine.session import VariantSessions

if TYPE_CHECKING:
    from server.engine.device_buffers import CacheOps

CACHE_BLOCK = 16  # cache slots are added this many at a time
SOURCE_BLOCK = 8  # the padded source width grows this many positions at a time


class OnnxStepBackend:
    def __init__(self, sessions: VariantSessions, src_tokens: np.ndarray | None = None,
                 device_ops: CacheOps | None = None):
        """device_ops: keep the caches on the execution provider's device with these graphs
        (device_buffers.py; the engine's choice on CUDA) rather than in host memory."""
        self.vocab_size = sessions.decoder.get_outputs()[0].shape[1]
        if device_ops:
            self.buffers = device_ops.buffers(sessions)
        else:
            self.buffers = HostBuffers(sessions, CacheLayout.of(sessions.decoder))
        # Rows, indexed by buffer row: rows [0, used) are decoded, `live` orders them as the search does.
        self.lengths = np.zeros(0, dtype=np.int64)  # tokens fed so far = each row's position and next slot
        self.row_source = np.zeros(0, dtype=np.int64)  # each buffer row's source: its source entry
        self.live = np.zeros(0, dtype=np.int64)  # buffer row of each row the search sees, in its order
        self.in_order = True  # live is 0, 1, ...: no beam was reordered
        self.used = 0
        # Source entries, shared by a source's rows: [0, sources) are in use.
        self.src_mask = np.zeros((0, 0), dtype=bool)
        self.sources = 0
        self._grid: tuple[np.ndarray, np.ndarray] | None = None  # query_grid of the rows and sources
        self._padding: float | None = None  # padding_ratio, until the sources change
        if src_tokens is not None:
            self.extend(src_tokens)

    @property
    def rows(self) -> int:
        return len(self.live)

    @property
    def padding_ratio(self) -> float:
        """Share of padded positions among the sources decoded now."""
        if self._padding is None:
            self._padding = 1.0 - float(self.src_mask[: self.sources].mean()) if self.sources else 0.0
        return self._padding

    def extend(self, *src_batches: np.ndarray) -> None:
        """Encode new sources, given as right-padded (B, S) batches of one encoder run each, and
        add one fresh row and source entry for each, in order. Buffers grow once for all the
        batches."""
        encoded = [self.buffers.encode(b) for b in src_batches]  # first: a failed run leaves the batch as it was
        added, width = sum(len(m) for m, _ in encoded), max(m.shape[1] for m, _ in encoded)
        entries, held_width = self.src_mask.shape
        if self.sources + added > entries or width > held_width:
            if self.sources + added > entries:
                entries = max(self.sources + added, entries * 3 // 2 + 8)
            padded_width = max(held_width, _blocks(width, SOURCE_BLOCK))
            self.src_mask = copy_into(self.src_mask, (entries, padded_width))
        first = self.sources
        self.src_mask[first : first + added] = False
        self.sources += added
        for src_mask, cross in encoded:
            self.src_mask[first : first + len(src_mask), : src_mask.shape[1]] = src_mask
            self.buffers.place_sources(first, cross, self.sources, self.src_mask.shape[1])
            first += len(src_mask)
        rows = self._add_rows(added)
        self.lengths[rows] = 0
        self.row_source[rows] = np.arange(self.sources - added, self.sources)
        self.live = np.concatenate([self.live, rows])
        self._grid = self._padding = None

    def _add_rows(self, count: int) -> np.ndarray:
        """Append `count` buffer rows to the decoded prefix; returns their indices."""
        if self.used + count > len(self.lengths):
            rows = max(self.used + count, len(self.lengths) * 3 // 2 + 8)
            self.lengths, self.row_source = copy_into(self.lengths, (rows,)), copy_into(self.row_source, (rows,))
        self.buffers.add_rows(self.used, count)
        self.used += count
        return np.arange(self.used - count, self.used)

    def step(self, tokens: np.ndarray, top_k: int) -> Candidates:
        top_log_probs, top_tokens, eos_log_probs = self._run(tokens, top_k, STEP_OUTPUTS[1:])
        return Candidates(top_log_probs, top_tokens, eos_log_probs)

    def step_log_probs(self, tokens: np.ndarray) -> np.ndarray:
        """Like step, but returns the full (rows, vocab) log-probabilities (for verification)."""
        return self._run(tokens, 1, STEP_OUTPUTS[:1])[0]

    def _run(self, tokens: np.ndarray, top_k: int, outputs: list[str]) -> list[np.ndarray]:
        live, used = self.live, self.used
        lengths = self.lengths[:used]  # every decoded row is live
        # A row's keys fill slots 0 .. length-1 of its cache, so validity follows from the lengths.
        capacity, cache_mask = _native.cache_mask(lengths, self.buffers.capacity, CACHE_BLOCK)
        if capacity != self.buffers.capacity:
            self.buffers.set_capacity(capacity, used)
        in_order = self.in_order
        fed = tokens.astype(np.int64, copy=False) if in_order else np.zeros(used, np.int64)
        if not in_order:
            fed[live] = tokens
        if self._grid is None:  # rows or sources changed since the last step
            self._grid = query_grid(self.row_source[:used], self.sources)
        slot_row, row_slot = self._grid
        feeds = {"tokens": fed, "positions": lengths, "cache_mask": cache_mask, "src_mask": self.src_mask[: self.sources],
                 "slot_row": slot_row, "row_slot": row_slot, "top_k": np.array(top_k, np.int64)}
        results, new_kv = self.buffers.run_decoder(feeds, outputs, used, self.sources)
        self.buffers.write(lengths, new_kv)  # and the rows' lengths advance
        return results if in_order else [r[live] for r in results]

    def select(self, rows: np.ndarray) -> None:
        """Keep these rows, in this order, as buffer rows [0, len(rows)): a kept row stays in its
        buffer row where it can; a second keep of a row, or a row above the new end, is copied
        into a buffer row no staying row holds."""
        kept = len(rows)
        if kept > self.used:  # a newcomer's beams widen
            self._add_rows(kept - self.used)
        chosen, copied, targets, self.in_order, sources_kept, moving, holes = _native.plan_select(
            self.live, rows, self.used, self.lengths, self.row_source, self.sources)
        if len(targets) or kept < self.used:
            self.buffers.move_rows(copied, targets, kept)
        self.live, self.used = chosen, kept
        self._grid = None
        if sources_kept < self.sources:
            self._drop_unread_sources(sources_kept, moving, holes)
        next_slot = int(self.lengths[:kept].max(initial=0)) + 1  # keep room for the coming step
        if not kept:
            # An empty batch: sources that join start at slot 0, and attention over slots no
            # row fills would cost every step until the cache outgrew them (~7% at batch 32).
            self.buffers.set_capacity(0, 0)
        elif self.buffers.capacity > _blocks(next_slot + CACHE_BLOCK, CACHE_BLOCK):
            # A block of headroom stays, so a batch whose oldest rows keep leaving does not
            # shrink and regrow its cache at every block boundary.
            self.buffers.set_capacity(_blocks(next_slot, CACHE_BLOCK), kept)

    def _drop_unread_sources(self, kept: int, moving: np.ndarray, holes: np.ndarray) -> None:
        """Keep the `kept` source entries some row still reads as entries [0, kept), as select
        keeps rows: plan_select chose the read entries at or above the new end that move into
        unread ones below it, and renumbered the rows' sources. The width shrinks to the
        longest source left when that frees more than a block."""
        self.buffers.move_sources(moving, holes, kept)
        self.src_mask[holes] = self.src_mask[moving]
        self.sources = kept
        self._padding = None
        longest = int(self.src_mask[:kept].sum(axis=1).max(initial=0))  # masks are true from position 0
        if self.src_mask.shape[1] > _blocks(longest + SOURCE_BLOCK, SOURCE_BLOCK):
            width = _blocks(longest, SOURCE_BLOCK)
            self.src_mask = np.ascontiguousarray(self.src_mask[:, :width])
            self.buffers.set_width(width, kept)


def _blocks(size: int, block: int) -> int:
    """size rounded up to whole blocks."""
    return -(-size // block) * block
