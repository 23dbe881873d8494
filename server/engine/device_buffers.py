"""Device memory for the decoder's caches: ONNX Runtime values that never leave the device.

On CUDA, feeding host arrays to the decoder would copy every layer's self-attention cache
and cross-attention keys to the GPU at every step, and its new keys back. Here they live on
the execution provider's device from the encoder's output on: the sessions run with IO
binding, only the step's small inputs (tokens, positions, masks: a few KB) go up and only
the top-k candidates come down.

ONNX Runtime's Python API has no operations on device tensors, so the two this store needs
are tiny ONNX graphs (CacheOps), built for the model's cache shape and type and run on the
decoder's execution provider:
    update:  y_i = fit(where(onehot, new_i, x_i)[order], length)
             each row's new key/value into its slot, fused with the row copies that
             follow it (a step's write is held until the next update)
    place:   y_i = concat(fit(x_i, width), fit(v_i, width))[order]
             new sources' keys/values into their entries, growing the buffer as needed
where fit cuts or zero-pads the position axis (3 for keys, 2 for values: buffers.py). ONNX
has no in-place update, so each returns new tensors: a cache copy per step on the device,
far cheaper than the host round trip.

Unlike HostBuffers, tensors hold exactly the rows and source entries in use (a device
tensor cannot be fed as a prefix view): new rows start as copies of row 0, which the
backend masks (their lengths are 0) until they are written.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from server.engine.buffers import CacheLayout
from server.engine.session import VariantSessions

_ONNX_TYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
_OPSET, _IR_VERSION = 18, 9


class CacheOps:
    """The update and place graphs for one lane's sessions, on their execution provider."""

    def __init__(self, sessions: VariantSessions):
        self.layout = CacheLayout.of(sessions.decoder)
        self.device = "cuda" if sessions.device == "cuda" else "cpu"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        providers = sessions.decoder.get_providers()
        self.update = ort.InferenceSession(_update_graph(self.layout).SerializeToString(), options,
                                           providers=providers)
        self.place = ort.InferenceSession(_place_graph(self.layout).SerializeToString(), options, providers=providers)

    def buffers(self, sessions: VariantSessions) -> DeviceBuffers:
        """Empty device buffers for one decode batch on these sessions."""
        return DeviceBuffers(sessions, self)


class DeviceBuffers:
    def __init__(self, sessions: VariantSessions, ops: CacheOps):
        self.encoder, self.decoder = sessions.encoder, sessions.decoder
        self.ops, self.layout, self.device = ops, ops.layout, ops.device
        self.cache: list[ort.OrtValue] = []  # rows x capacity each (CacheLayout.shape), or none while rows == 0
        self.cache_rows = 0
        self._capacity = 0
        self._pending: tuple[np.ndarray, list[ort.OrtValue]] | None = None  # a step's write, not yet applied
        self.cross: list[ort.OrtValue] = []  # sources x width each, or none while sources == 0
        self.cross_rows = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def encode(self, src_tokens: np.ndarray) -> tuple[np.ndarray, list[ort.OrtValue]]:
        """src_mask (B, S) on the host; cross-attention keys/values on the device."""
        binding = self.encoder.io_binding()
        binding.bind_cpu_input("src_tokens", src_tokens)
        names = [o.name for o in self.encoder.get_outputs()]
        binding.bind_output(names[0], "cpu")
        for name in names[1:]:
            binding.bind_output(name, self.device)
        self.encoder.run_with_iobinding(binding)
        values = binding.get_outputs()
        return values[0].numpy(), values[1:]

    def add_rows(self, used: int, added: int) -> None:
        if not added:
            return
        if self.cache_rows == 0:
            self._capacity = max(self._capacity, 1)  # no zero-sized tensors on the device
            self.cache = self._zeros(added, self._capacity)
        else:
            self._update(np.r_[np.arange(used), np.zeros(added, np.int64)], self._capacity)
        self.cache_rows = used + added

    def set_capacity(self, capacity: int, used: int) -> None:
        if self.cache_rows:
            self._update(np.arange(self.cache_rows), capacity)
        self._capacity = capacity

    def place_sources(self, first: int, cross: list[ort.OrtValue], sources: int, width: int) -> None:
        """As HostBuffers.place_sources; entries in use but not placed yet (a later encoder run's)
        hold a copy of a held row until then."""
        held = self.cross if self.cross_rows else self._zeros(1, width)
        order = np.minimum(np.arange(sources), max(self.cross_rows, 1) - 1)
        placed = cross[0].shape()[0]
        order[first : first + placed] = max(self.cross_rows, 1) + np.arange(placed)  # past the held rows: the new ones
        self.cross = self._run(self.ops.place, {"x": held, "v": cross}, order=order, width=np.array([width]))
        self.cross_rows = sources

    def run_decoder(self, feeds: dict, outputs: list[str], used: int, sources: int) -> tuple[list, list]:
        if (used, sources) != (self.cache_rows, self.cross_rows):
            raise RuntimeError(f"device buffers hold {self.cache_rows} rows and {self.cross_rows} sources, "
                                 f"the step has {used} and {sources}")
        if self._pending:
            self._update(np.arange(self.cache_rows), self._capacity)
        binding = self.decoder.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, value in zip(self.layout.cache_names + self.layout.cross_names, self.cache + self.cross):
            binding.bind_ortvalue_input(name, value)
        for name in outputs:
            binding.bind_output(name, "cpu")
        for name in self.layout.new_kv_names:
            binding.bind_output(name, self.device)
        self.decoder.run_with_iobinding(binding)
        values = binding.get_outputs()
        return [v.numpy() for v in values[: len(outputs)]], values[len(outputs) :]

    def write(self, slots: np.ndarray, new_kv: list[ort.OrtValue]) -> None:
        onehot = np.zeros((self.cache_rows, self._capacity), dtype=bool)
        onehot[np.arange(len(slots)), slots] = True
        self._pending = (onehot, new_kv)
        slots += 1

    def move_rows(self, rows: np.ndarray, targets: np.ndarray, used: int) -> None:
        if used:
            order = np.arange(used)
            order[targets] = rows
            self._update(order, self._capacity)
        else:
            self.cache, self._pending = [], None
        self.cache_rows = used

    def move_sources(self, entries: np.ndarray, targets: np.ndarray, sources: int) -> None:
        if sources:
            order = np.arange(sources)
            order[targets] = entries
            self.cross = self._take(self.cross, order, self.cross[0].shape()[self.layout.axes[0]])
        else:
            self.cross = []
        self.cross_rows = sources

    def set_width(self, width: int, sources: int) -> None:
        if sources:
            self.cross = self._take(self.cross, np.arange(sources), width)

    def _update(self, order: np.ndarray, length: int) -> None:
        """Apply the pending write, if any, then take rows `order` fitted to `length` slots."""
        if self._pending:
            onehot, new = self._pending
            self.cache = self._run(self.ops.update, {"x": self.cache, "new": new}, onehot=onehot, order=order,
                                   length=np.array([length]))
            self._pending = None
        else:
            self.cache = self._take(self.cache, order, length)

    def _take(self, values: list[ort.OrtValue], order: np.ndarray, length: int) -> list[ort.OrtValue]:
        """Rows `order` of values, fitted to `length` positions (the update graph writing nothing:
        where(false, x, x) = x)."""
        return self._run(self.ops.update, {"x": values, "new": values}, onehot=np.zeros((1, 1), bool), order=order,
                         length=np.array([length]))

    def _run(self, session: ort.InferenceSession, tensors: dict[str, list[ort.OrtValue]],
             **host_inputs: np.ndarray) -> list[ort.OrtValue]:
        binding = session.io_binding()
        for prefix, values in tensors.items():
            for i, value in enumerate(values):
                binding.bind_ortvalue_input(f"{prefix}_{i}", value)
        for name, value in host_inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for output in session.get_outputs():
            binding.bind_output(output.name, self.device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _zeros(self, rows: int, length: int) -> list[ort.OrtValue]:
        return [ort.OrtValue.ortvalue_from_numpy(np.zeros(self.layout.shape(rows, length, axis), self.layout.dtype),
                                                 self.device, 0) for axis in self.layout.axes]


def _tensor(name: str, layout: CacheLayout, axis: int, rows: str, length: str):
    return helper.make_tensor_value_info(name, _ONNX_TYPES[layout.dtype], list(layout.shape(rows, length, axis)))


def _int64(name: str, dims: list):
    return helper.make_tensor_value_info(name, TensorProto.INT64, dims)


def _fit_nodes(x: str, length1: str, y: str, axis: int) -> list:
    """y = x with `axis` (2 or 3) cut or zero-padded to length1 (a 1-element tensor)."""
    pads_after = ["zeros6", f"{y}_grow", "zero1"] if axis == 2 else ["zeros7", f"{y}_grow"]  # begins, then ends
    return [helper.make_node("Slice", [x, "zero1", length1, f"axis{axis}"], [f"{y}_cut"]),
            helper.make_node("Shape", [f"{y}_cut"], [f"{y}_held"], start=axis, end=axis + 1),
            helper.make_node("Sub", [length1, f"{y}_held"], [f"{y}_grow"]),
            helper.make_node("Concat", pads_after, [f"{y}_pads"], axis=0),
            helper.make_node("Pad", [f"{y}_cut", f"{y}_pads"], [y])]


def _model(nodes: list, name: str, inputs: list, outputs: list):
    constants = [numpy_helper.from_array(np.array(value, np.int64), name) for name, value in
                 (("zero1", [0]), ("axis2", [2]), ("axis3", [3]), ("zeros6", [0] * 6), ("zeros7", [0] * 7),
                  ("axes13", [1, 3]), ("axes12", [1, 2]))]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], ir_version=_IR_VERSION)


def _update_graph(layout: CacheLayout):
    nodes = [helper.make_node("Unsqueeze", ["onehot", "axes13"], ["slot2"]),  # (rows, 1, capacity, 1)
             helper.make_node("Unsqueeze", ["onehot", "axes12"], ["slot3"])]  # (rows, 1, 1, capacity)
    for i, axis in enumerate(layout.axes):
        nodes += [helper.make_node("Where", [f"slot{axis}", f"new_{i}", f"x_{i}"], [f"written_{i}"]),
                  helper.make_node("Gather", [f"written_{i}", "order"], [f"taken_{i}"], axis=0)]
        nodes += _fit_nodes(f"taken_{i}", "length", f"y_{i}", axis)
    inputs = [_tensor(f"x_{i}", layout, axis, "rows", "capacity") for i, axis in enumerate(layout.axes)]
    inputs += [_tensor(f"new_{i}", layout, axis, "rows", "new_capacity") for i, axis in enumerate(layout.axes)]
    inputs += [helper.make_tensor_value_info("onehot", TensorProto.BOOL, ["onehot_rows", "onehot_capacity"]),
               _int64("order", ["taken"]), _int64("length", [1])]
    outputs = [_tensor(f"y_{i}", layout, axis, "taken", "length") for i, axis in enumerate(layout.axes)]
    return _model(nodes, "update", inputs, outputs)


def _place_graph(layout: CacheLayout):
    nodes = []
    for i, axis in enumerate(layout.axes):
        nodes += _fit_nodes(f"x_{i}", "width", f"held_{i}", axis) + _fit_nodes(f"v_{i}", "width", f"placed_{i}", axis)
        nodes += [helper.make_node("Concat", [f"held_{i}", f"placed_{i}"], [f"both_{i}"], axis=0),
                  helper.make_node("Gather", [f"both_{i}", "order"], [f"y_{i}"], axis=0)]
    inputs = [_tensor(f"x_{i}", layout, axis, "rows", "held_width") for i, axis in enumerate(layout.axes)]
    inputs += [_tensor(f"v_{i}", layout, axis, "placed", "placed_width") for i, axis in enumerate(layout.axes)]
    inputs += [_int64("order", ["taken"]), _int64("width", [1])]
    outputs = [_tensor(f"y_{i}", layout, axis, "taken", "width") for i, axis in enumerate(layout.axes)]
    return _model(nodes, "place", inputs, outputs)
