"""Host memory for the decoder's caches: numpy buffers with spare rows, written in place.

The backend (backend.py) decides which buffer row holds which beam and which source entry
which source; a buffer store carries those decisions out on its memory. Two stores share
one interface: HostBuffers here, for the CPU execution provider, and DeviceBuffers
(device_buffers.py), which keeps everything on the execution provider's device.

- The self-attention cache is preallocated and written in place: the decoder-step graph
  returns only each layer's new key/value, stored into the row's next slot.
- Keys are stored transposed, (rows, H, dk, positions), values (rows, H, positions, dk)
  (model.layers.MultiHeadAttention.project_kv); the position axis of each tensor is read off
  the graph (CacheLayout), and the code here works on views with positions on axis 2.
- Buffers keep spare rows and source entries; the decoder runs on the prefix in use, a
  zero-copy view, so joining rows and sources neither copy nor reallocate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from decoding import _native

from server.engine.session import VariantSessions

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class CacheLayout:
    """The decoder-step graph's cache inputs and outputs, read off the graph."""

    cache_names: list[str]  # cache_k_0, cache_v_0, cache_k_1, ...
    cross_names: list[str]  # cross_k_0, cross_v_0, ...: keys and values in the same order
    new_kv_names: list[str]  # new_k_0, new_v_0, ...
    axes: list[int]  # each cache (and cross, and new) tensor's position axis: 3 for keys, 2 for values
    dtype: type
    heads: int
    head_dim: int

    @classmethod
    def of(cls, decoder: ort.InferenceSession) -> "CacheLayout":
        inputs = {i.name: i for i in decoder.get_inputs()}
        cache_names = [n for n in inputs if n.startswith("cache_k_") or n.startswith("cache_v_")]
        # The position axis is the dynamic one of the last two; the other is the head size.
        axes = [2 if isinstance(inputs[n].shape[2], str) else 3 for n in cache_names]
        shape = inputs[cache_names[0]].shape
        head_dim = shape[3] if axes[0] == 2 else shape[2]
        return cls(cache_names, [n for n in inputs if n.startswith("cross_")],
                   [o.name for o in decoder.get_outputs() if o.name.startswith("new_")], axes,
                   _NUMPY_TYPES[inputs[cache_names[0]].type], shape[1], head_dim)

    def shape(self, rows: int, positions: int, axis: int) -> tuple[int, ...]:
        """A cache tensor's shape with its positions on `axis`."""
        if axis == 2:
            return (rows, self.heads, positions, self.head_dim)
        return (rows, self.heads, self.head_dim, positions)


class HostBuffers:
    def __init__(self, sessions: VariantSessions, layout: CacheLayout):
        self.encoder = sessions.encoder
        # The step runs through the binding beneath InferenceSession.run, which first checks the
        # feed's names and values in Python (~5 us of a 4-row step's ~360, measured); the
        # backend builds the same complete feed at every step.
        self._run_decoder = sessions.decoder._sess.run
        self.layout = layout
        self._feed_views: tuple = ()  # (used, sources, the decoder's feed of their views): see _views
        self.cache = [np.zeros(layout.shape(0, 0, axis), layout.dtype) for axis in layout.axes]
        self.cross = [np.zeros(layout.shape(0, 0, axis), layout.dtype) for axis in layout.axes]

    # Buffers that are replaced (resized) drop the views of the old ones, which would otherwise
    # keep them in memory until the next step.
    @property
    def cache(self) -> list[np.ndarray]:
        return self._cache

    @cache.setter
    def cache(self, buffers: list[np.ndarray]) -> None:
        self._cache, self._feed_views = buffers, ()

    @property
    def cross(self) -> list[np.ndarray]:
        return self._cross

    @cross.setter
    def cross(self, buffers: list[np.ndarray]) -> None:
        self._cross, self._feed_views = buffers, ()

    @property
    def capacity(self) -> int:
        return self.cache[0].shape[self.layout.axes[0]]

    def encode(self, src_tokens: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """src_mask (B, S) and each layer's cross-attention keys/values."""
        outputs = self.encoder.run(None, {"src_tokens": src_tokens})
        return outputs[0], outputs[1:]

    def add_rows(self, used: int, added: int) -> None:
        """Make rows [used, used + added) part of the decoded prefix."""
        if used + added > len(self.cache[0]):
            rows = max(used + added, len(self.cache[0]) * 3 // 2 + 8)
            self.cache = _native.resized(self.cache, self.layout.axes, rows, self.capacity, used)
        for buffer in self.cache:
            # Spare rows may hold anything (resizes leave them uninitialised); masked slots get
            # zero attention weight, but 0 x NaN is NaN, so the values there must be finite.
            buffer[used : used + added] = 0

    def set_capacity(self, capacity: int, used: int) -> None:
        """Resize every row's cache to `capacity` slots; rows [0, used) keep their slots (spare
        rows are zeroed when they join: add_rows)."""
        self.cache = _native.resized(self.cache, self.layout.axes, len(self.cache[0]), capacity, used)

    def set_width(self, width: int, sources: int) -> None:
        """Cut the source entries to `width` positions; entries [0, sources) keep theirs."""
        self.cross = _native.resized(self.cross, self.layout.axes, len(self.cross[0]), width, sources)

    def place_sources(self, first: int, cross: list[np.ndarray], sources: int, width: int) -> None:
        """Store n new sources' keys/values (w positions) at entries [first, first + n), zero
        past w: entries [0, sources) are in use after, with `width` positions (the backend
        places the sources of several encoder runs one run at a time, with the final sources
        and width)."""
        held, axes = len(self.cross[0]), self.layout.axes
        if sources > held or width > self.cross[0].shape[axes[0]]:  # entries [0, first) are in use already
            rows = max(sources, held * 3 // 2 + 8) if sources > held else held
            self.cross = _native.resized(self.cross, axes, rows, width, first)
        for buffer, values, axis in zip(self.cross, cross, axes):
            buffer, values = positions_on_2(buffer, axis), positions_on_2(values, axis)
            entries = buffer[first : first + len(values)]  # a slice: copies run 1.5x as fast as through indices
            entries[:, :, : values.shape[2]] = values
            entries[:, :, values.shape[2] :] = 0  # masked, but must be finite (see add_rows)

    def run_decoder(self, feeds: dict, outputs: list[str], used: int, sources: int) -> tuple[list, list]:
        """One decoder step on rows [0, used) and source entries [0, sources): the named
        outputs (numpy) and each layer's new key/value."""
        results = self._run_decoder(outputs + self.layout.new_kv_names, {**feeds, **self._views(used, sources)}, None)
        return results[: len(outputs)], results[len(outputs) :]

    def _views(self, used: int, sources: int) -> dict[str, np.ndarray]:
        """The caches of rows [0, used) and the source entries [0, sources), by input name: the
        same views until the rows, the sources or the buffers change (most steps of a batch
        keep them all), so a step makes none (twelve slices took ~2 us of every step)."""
        current = self._feed_views
        if not current or current[0] != used or current[1] != sources:
            views = {name: buffer[:used] for name, buffer in zip(self.layout.cache_names, self._cache)}
            views.update((name, buffer[:sources]) for name, buffer in zip(self.layout.cross_names, self._cross))
            self._feed_views = current = (used, sources, views)
        return current[2]

    def write(self, slots: np.ndarray, new_kv: list[np.ndarray]) -> None:
        """Store the new key/value of each decoded row (rows [0, len(slots))) in its slot; the
        slots (the rows' lengths, written in place) then advance by one."""
        _native.write_slots(self.cache, self.layout.axes, new_kv, slots)

    def move_rows(self, rows: np.ndarray, targets: np.ndarray, used: int) -> None:
        """Copy the caches of `rows` into the `targets` rows (no row is both); rows from `used`
        on are no longer decoded (they stay as spare rows)."""
        _native.copy_rows(self.cache, rows, targets)

    def move_sources(self, entries: np.ndarray, targets: np.ndarray, sources: int) -> None:
        """Copy source entries into the target entries (no entry is both); entries from
        `sources` on are no longer read (they stay as spare entries)."""
        _native.copy_rows(self.cross, entries, targets)


def positions_on_2(array: np.ndarray, axis: int) -> np.ndarray:
    """A view of a cache tensor with its positions on axis 2: (rows, H, positions, dk)."""
    return array if axis == 2 else array.swapaxes(2, 3)


def copy_into(array: np.ndarray, shape: tuple) -> np.ndarray:
    """A zero-filled array of `shape` holding `array` in its leading corner."""
    out = np.zeros(shape, array.dtype)
    common = tuple(slice(0, min(a, b)) for a, b in zip(array.shape, shape))
    out[common] = array[common]
    return out
