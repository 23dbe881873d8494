"""Device memory for the decoder's caches: ONNX Runtime values that never leave the device.

On CUDA, feeding host arrays to the decoder would copy every layer's self-attention cache
and cross-attention keys to the GPU at every step, and its new keys back. Here they live on
the execution provider's device from the encoder's output on: the sessions run with IO
binding, only the step's small inputs (tokens, positions, masks: a few KB) go up and only
the top-k candidates come down.

ONNX Runtime's Python API has no operations on device tensors, so the few this store needs
are three tiny ONNX graphs, built here for the model's cache shape and type and run on the
same execution provider:
    gather:  y_i = x_i[order], axis 2 cut or zero-padded to `length`  (compaction, reorder, growth)
    place:   y_i = x_i with rows[entries] = v_i, zero-padded to x_i's axis 2  (new sources)
    write:   y_i = where(onehot(row, slot), new_i, x_i)  (each row's new key/value into its slot)
Each returns new tensors (ONNX has no in-place update), which costs a cache copy per step
on the device: far less than the host round trip it replaces.

Unlike HostBuffers, tensors hold exactly the rows and source entries in use (a device
tensor cannot be fed as a prefix view): growing is a gather that repeats row 0 for the new
rows, which the backend then overwrites or masks.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from server.engine.buffers import CacheLayout
from server.engine.session import VariantSessions

_ONNX_TYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
_OPSET, _IR_VERSION = 18, 9


class DeviceBuffers:
    def __init__(self, sessions: VariantSessions, layout: CacheLayout):
        self.encoder, self.decoder = sessions.encoder, sessions.decoder
        self.layout = layout
        self.device = "cuda" if sessions.device == "cuda" else "cpu"
        count, shape = len(layout.cache_names), (layout.heads, layout.head_dim)
        element = _ONNX_TYPES[layout.dtype]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        providers = sessions.decoder.get_providers()

        def session(graph) -> ort.InferenceSession:
            return ort.InferenceSession(graph.SerializeToString(), options, providers=providers)

        self._gather = session(_gather_graph(count, element, shape))
        self._place = session(_place_graph(count, element, shape))
        self._write = session(_write_graph(count, element, shape))
        self.cache: list[ort.OrtValue] = []  # (rows, H, capacity, dk) each, or none while rows == 0
        self.cache_rows = 0
        self._capacity = 0
        self.cross: list[ort.OrtValue] = []  # (sources, H, width, dk) each, or none while sources == 0
        self.cross_rows = 0
        self.width = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def encode(self, src_tokens: np.ndarray) -> tuple[np.ndarray, list[ort.OrtValue]]:
        """src_mask (B, S) on the host; cross-attention keys/values (B, H, S, dk) on the device."""
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
            self.cache = self._run_gather(self.cache, np.r_[np.arange(used), np.zeros(added, np.int64)], self._capacity)
        self.cache_rows = used + added

    def set_capacity(self, capacity: int) -> None:
        if self.cache_rows:
            self.cache = self._run_gather(self.cache, np.arange(self.cache_rows), capacity)
        self._capacity = capacity

    def place_sources(self, entries: np.ndarray, cross: list[ort.OrtValue], sources: int, width: int) -> None:
        if self.cross_rows == 0:
            self.cross = self._zeros(sources, width)
        elif sources > self.cross_rows or width != self.width:
            grown = np.r_[np.arange(self.cross_rows), np.zeros(sources - self.cross_rows, np.int64)]
            self.cross = self._run_gather(self.cross, grown, width)
        self.cross_rows, self.width = sources, width
        binding = self._place.io_binding()
        for i, (held, values) in enumerate(zip(self.cross, cross)):
            binding.bind_ortvalue_input(f"x_{i}", held)
            binding.bind_ortvalue_input(f"v_{i}", values)
        binding.bind_cpu_input("entries", entries.astype(np.int64))
        self.cross = self._outputs(self._place, binding)

    def run_decoder(self, feeds: dict, outputs: list[str], used: int, sources: int) -> tuple[list, list]:
        if (used, sources) != (self.cache_rows, self.cross_rows):
            raise AssertionError(f"device buffers hold {self.cache_rows} rows and {self.cross_rows} sources, "
                                 f"the step has {used} and {sources}")
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

    def write(self, rows: np.ndarray, slots: np.ndarray, new_kv: list[ort.OrtValue]) -> None:
        onehot = np.zeros((self.cache_rows, self._capacity), dtype=bool)
        onehot[rows, slots] = True
        binding = self._write.io_binding()
        for i, (held, new) in enumerate(zip(self.cache, new_kv)):
            binding.bind_ortvalue_input(f"x_{i}", held)
            binding.bind_ortvalue_input(f"new_{i}", new)
        binding.bind_cpu_input("onehot", onehot)
        self.cache = self._outputs(self._write, binding)

    def compact(self, order: np.ndarray, capacity: int, kept_sources: np.ndarray | None, width: int) -> None:
        self.cache = self._run_gather(self.cache, order, capacity) if len(order) else []
        self.cache_rows, self._capacity = len(order), capacity
        if kept_sources is not None:
            self.cross = self._run_gather(self.cross, kept_sources, width) if len(kept_sources) else []
            self.cross_rows, self.width = len(kept_sources), width

    def _run_gather(self, values: list[ort.OrtValue], order: np.ndarray, length: int) -> list[ort.OrtValue]:
        binding = self._gather.io_binding()
        for i, value in enumerate(values):
            binding.bind_ortvalue_input(f"x_{i}", value)
        binding.bind_cpu_input("order", order.astype(np.int64))
        binding.bind_cpu_input("length", np.array([length], np.int64))
        return self._outputs(self._gather, binding)

    def _outputs(self, session: ort.InferenceSession, binding: ort.IOBinding) -> list[ort.OrtValue]:
        for output in session.get_outputs():
            binding.bind_output(output.name, self.device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _zeros(self, rows: int, length: int) -> list[ort.OrtValue]:
        shape = (rows, self.layout.heads, length, self.layout.head_dim)
        return [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.layout.dtype), self.device, 0)
                for _ in self.layout.cache_names]


def _tensor(name: str, element: int, shape: tuple[int, int], rows: str, length: str):
    return helper.make_tensor_value_info(name, element, [rows, shape[0], length, shape[1]])


def _constants() -> list:
    return [numpy_helper.from_array(np.array(value, np.int64), name) for name, value in
            (("zero1", [0]), ("two1", [2]), ("zeros6", [0] * 6), ("axes13", [1, 3]), ("axis1", [1]))]


def _fit_nodes(x: str, length1: str, pads: str, y: str) -> list:
    """y = x with axis 2 cut to length1, then zero-padded by pads (see _pads_nodes)."""
    return [helper.make_node("Slice", [x, "zero1", length1, "two1"], [f"{y}_cut"]),
            helper.make_node("Pad", [f"{y}_cut", pads], [y])]


def _pads_nodes(reference: str, length1: str) -> list:
    """pads: zero-padding of axis 2 from `reference`'s length up to length1 (none if longer)."""
    return [helper.make_node("Shape", [reference], ["held1"], start=2, end=3),
            helper.make_node("Sub", [length1, "held1"], ["short1"]),
            helper.make_node("Max", ["short1", "zero1"], ["grow1"]),
            helper.make_node("Concat", ["zeros6", "grow1", "zero1"], ["pads"], axis=0)]


def _model(nodes: list, name: str, inputs: list, outputs: list):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=_constants())
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], ir_version=_IR_VERSION)


def _gather_graph(count: int, element: int, shape: tuple[int, int]):
    nodes = [helper.make_node("Gather", [f"x_{i}", "order"], [f"taken_{i}"], axis=0) for i in range(count)]
    nodes += _pads_nodes("x_0", "length")
    for i in range(count):
        nodes += _fit_nodes(f"taken_{i}", "length", "pads", f"y_{i}")
    inputs = [_tensor(f"x_{i}", element, shape, "rows", "held") for i in range(count)]
    inputs += [helper.make_tensor_value_info("order", TensorProto.INT64, ["taken"]),
               helper.make_tensor_value_info("length", TensorProto.INT64, [1])]
    outputs = [_tensor(f"y_{i}", element, shape, "taken", "length") for i in range(count)]
    return _model(nodes, "gather", inputs, outputs)


def _place_graph(count: int, element: int, shape: tuple[int, int]):
    nodes = [helper.make_node("Shape", ["x_0"], ["width1"], start=2, end=3),
             helper.make_node("Unsqueeze", ["entries", "axis1"], ["indices"])]
    nodes += _pads_nodes("v_0", "width1")
    for i in range(count):
        nodes += _fit_nodes(f"v_{i}", "width1", "pads", f"fitted_{i}")
        nodes.append(helper.make_node("ScatterND", [f"x_{i}", "indices", f"fitted_{i}"], [f"y_{i}"]))
    inputs = [_tensor(f"x_{i}", element, shape, "rows", "width") for i in range(count)]
    inputs += [_tensor(f"v_{i}", element, shape, "placed", "placed_width") for i in range(count)]
    inputs.append(helper.make_tensor_value_info("entries", TensorProto.INT64, ["placed"]))
    outputs = [_tensor(f"y_{i}", element, shape, "rows", "width") for i in range(count)]
    return _model(nodes, "place", inputs, outputs)


def _write_graph(count: int, element: int, shape: tuple[int, int]):
    nodes = [helper.make_node("Unsqueeze", ["onehot", "axes13"], ["slot"])]  # (rows, 1, capacity, 1)
    nodes += [helper.make_node("Where", ["slot", f"new_{i}", f"x_{i}"], [f"y_{i}"]) for i in range(count)]
    inputs = [_tensor(f"x_{i}", element, shape, "rows", "capacity") for i in range(count)]
    inputs += [_tensor(f"new_{i}", element, shape, "rows", "one") for i in range(count)]
    inputs.append(helper.make_tensor_value_info("onehot", TensorProto.BOOL, ["rows", "capacity"]))
    outputs = [_tensor(f"y_{i}", element, shape, "rows", "capacity") for i in range(count)]
    return _model(nodes, "write", inputs, outputs)
