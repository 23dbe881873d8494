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
- New rows take the buffer rows of finished rows first, new sources the entries no row
  reads any more, so a batch that sources keep joining and leaving neither copies nor grows.
- A finished row is not compacted away at once: it stays, dead, until dead rows exceed
  DEAD_ROW_SHARE of the buffer, because decoding a few dead rows costs less than copying
  every live row's cache at each finish. Beam reordering has to gather the cache anyway,
  and compacts at the same time.
- Cross-attention keys/values are stored once per source, not once per row: the beams of
  a source share them (decoding.grid), so beam reordering never copies them, and they are
  compacted only when sources leave.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from decoding import Candidates
from decoding.grid import query_grid
from export.io import STEP_OUTPUTS
from server.engine.buffers import CacheLayout, HostBuffers, copy_into, gather
from server.engine.session import VariantSessions

if TYPE_CHECKING:
    from server.engine.device_buffers import CacheOps

CACHE_BLOCK = 16  # cache slots are added this many at a time
SOURCE_BLOCK = 8  # the padded source width grows this many positions at a time
DEAD_ROW_SHARE = 0.25  # compact when this share of the decoded rows is finished


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
        # Rows, indexed by buffer row: rows [0, used) are decoded, `live` lists the ones still wanted.
        self.lengths = np.zeros(0, dtype=np.int64)  # tokens fed so far = each row's position and next slot
        self.row_source = np.zeros(0, dtype=np.int64)  # each buffer row's source: its source entry
        self.live = np.zeros(0, dtype=np.int64)  # buffer row of each row the search sees, in its order
        self.used = 0
        # Source entries, shared by a source's rows: [0, sources) are in use.
        self.src_mask = np.zeros((0, 0), dtype=bool)
        self.sources = 0
        if src_tokens is not None:
            self.extend(src_tokens)

    @property
    def rows(self) -> int:
        return len(self.live)

    @property
    def padding_ratio(self) -> float:
        """Share of padded positions among the sources decoded now."""
        return 1.0 - float(self.src_mask[: self.sources].mean()) if self.sources else 0.0

    def extend(self, *src_batches: np.ndarray) -> None:
        """Encode new sources, given as right-padded (B, S) batches of one encoder run each, and
        add one fresh row for each, in order, reusing the buffer rows of finished rows and the
        entries of sources no row reads any more. Buffers grow once for all the batches."""
        encoded = [self.buffers.encode(b) for b in src_batches]  # first: a failed run leaves the batch as it was
        added, width = sum(len(m) for m, _ in encoded), max(m.shape[1] for m, _ in encoded)
        # Masks, not setdiff1d/unique: this runs at every admission, and they sort.
        dead = np.ones(self.used, bool)
        dead[self.live] = False
        reused_rows = np.flatnonzero(dead)[:added]
        kept = np.ones(self.used, bool)
        kept[reused_rows] = False
        read = np.zeros(self.sources, bool)
        read[self.row_source[: self.used][kept]] = True
        reused_sources = np.flatnonzero(~read)[:added]
        more_rows, more_sources = added - len(reused_rows), added - len(reused_sources)
        if self.used + more_rows > len(self.lengths):
            rows = max(self.used + more_rows, len(self.lengths) * 3 // 2 + 8)
            self.lengths, self.row_source = copy_into(self.lengths, (rows,)), copy_into(self.row_source, (rows,))
        entries, held_width = self.src_mask.shape
        if self.sources + more_sources > entries or width > held_width:
            if self.sources + more_sources > entries:
                entries = max(self.sources + more_sources, entries * 3 // 2 + 8)
            padded_width = max(held_width, -(-width // SOURCE_BLOCK) * SOURCE_BLOCK)
            self.src_mask = copy_into(self.src_mask, (entries, padded_width))
        sources = np.concatenate([reused_sources, np.arange(self.sources, self.sources + more_sources)])
        self.src_mask[sources] = False
        self.sources += more_sources
        first = 0
        for src_mask, cross in encoded:
            entries = sources[first : first + len(src_mask)]
            self.src_mask[entries, : src_mask.shape[1]] = src_mask
            self.buffers.place_sources(entries, cross, self.sources, self.src_mask.shape[1])
            first += len(src_mask)
        rows = np.concatenate([reused_rows, np.arange(self.used, self.used + more_rows)])
        self.buffers.add_rows(self.used, more_rows)
        self.lengths[rows] = 0
        self.row_source[rows] = sources
        self.live = np.concatenate([self.live, rows])
        self.used += more_rows

    def step(self, tokens: np.ndarray, top_k: int) -> Candidates:
        top_log_probs, top_tokens, eos_log_probs = self._run(tokens, top_k, STEP_OUTPUTS[1:])
        return Candidates(top_log_probs, top_tokens, eos_log_probs)

    def step_log_probs(self, tokens: np.ndarray) -> np.ndarray:
        """Like step, but returns the full (rows, vocab) log-probabilities (for verification)."""
        return self._run(tokens, 1, STEP_OUTPUTS[:1])[0]

    def _run(self, tokens: np.ndarray, top_k: int, outputs: list[str]) -> list[np.ndarray]:
        live, used = self.live, self.used
        needed = int(self.lengths[live].max(initial=0)) + 1
        if needed > self.buffers.capacity:
            self.buffers.set_capacity(-(-needed // CACHE_BLOCK) * CACHE_BLOCK)
        in_order = len(live) == used and np.array_equal(live, np.arange(used))  # else dead or reused rows
        fed = tokens.astype(np.int64, copy=False) if in_order else np.zeros(used, np.int64)
        if not in_order:
            fed[live] = tokens
        lengths = self.lengths[:used]
        slot_row, row_slot = query_grid(self.row_source[:used], self.sources)
        # A row's keys fill slots 0 .. length-1 of its cache, so validity follows from the lengths.
        feeds = {"tokens": fed, "positions": lengths, "cache_mask": np.arange(self.buffers.capacity) < lengths[:, None],
                 "src_mask": self.src_mask[: self.sources], "slot_row": slot_row, "row_slot": row_slot,
                 "top_k": np.array(top_k, np.int64)}
        results, new_kv = self.buffers.run_decoder(feeds, outputs, used, self.sources)
        self.buffers.write(live, self.lengths[live], new_kv)
        self.lengths[live] += 1
        return results if in_order else [r[live] for r in results]

    def select(self, rows: np.ndarray) -> None:
        """Keep these rows, in this order; removals are lazy, reorders gather at once."""
        chosen = self.live[rows]
        if np.all(np.diff(rows) > 0):  # rows only leave: keep them in place as dead rows for now
            leaving = np.ones(len(self.live), bool)
            leaving[rows] = False
            self.lengths[self.live[leaving]] = 0  # a dead row's position must stay in range
            self.live = chosen
            if self.used and (self.used - len(chosen)) / self.used > DEAD_ROW_SHARE:
                self._compact(chosen)
        else:
            self._compact(chosen)

    def _compact(self, order: np.ndarray) -> None:
        """Gather the buffer rows in `order` to the front, dropping sources no row needs any more
        and cutting cache and source width to what the rows left need."""
        next_slot = int(self.lengths[order].max(initial=0)) + 1  # keep room for the coming step
        capacity = min(self.buffers.capacity, -(-next_slot // CACHE_BLOCK) * CACHE_BLOCK)
        row_source = self.row_source[order]
        kept_sources, width = np.unique(row_source), self.src_mask.shape[1]
        if len(kept_sources) < self.sources:  # beams reordering within their sources leave these alone
            width = int(self.src_mask[kept_sources].any(axis=0).nonzero()[0].max(initial=-1)) + 1
            width = -(-width // SOURCE_BLOCK) * SOURCE_BLOCK
            self.src_mask = gather(self.src_mask, kept_sources, 1, width)
            renumbered = np.zeros(self.sources, np.int64)
            renumbered[kept_sources] = np.arange(len(kept_sources))
            row_source = renumbered[row_source]
            self.sources = len(kept_sources)
        else:
            kept_sources = None
        self.buffers.compact(order, capacity, kept_sources, width)
        self.lengths = np.resize(self.lengths[order], max(len(order), len(self.lengths)))
        self.row_source = np.resize(row_source, len(self.lengths))
        self.live = np.arange(len(order))
        self.used = len(order)
