"""Precision variants of an fp32 graph: int8 for CPU, fp16 for GPU.

int8 weights are symmetric per output column. Activations are quantized to uint8 in the
graph, before each integer GEMM, with one of two kinds of scale:

- static (when calibration ranges are given; export/calibrate.py): one scale per
  projection, max |input| seen on real text / 127. Two nodes per GEMM, the bias inside:
      y = MatMulIntegerToFloat(QuantizeLinear(x, s, 128), W_s8, s, s_col, 128, bias)
- per row (no ranges for a projection): s_row = max |x_row| / 127, computed as the graph
  runs. ONNX Runtime's DynamicQuantizeLinear takes one scale over the whole batch, so a
  sentence's translation would depend on what else shares its batch; per row, each row's
  integer matmul depends on that row alone. Four more passes over the activation (abs,
  row max, clamp, scale) and a separate bias Add: with a per-row a_scale, ONNX Runtime 1.32
  scales MatMulIntegerToFloat's bias by it too. Opset 21's blocked QuantizeLinear takes
  the row scale; its zero point must have the scale's shape: one (rows..., 1) tensor of
  128s, made once for all activations of the same leading shape.

A projection of a ReLU's output (the feed-forward's second) reads values >= 0 only: with
either kind of scale it takes zero point 0 and max / 255, which gives them all 255 levels
instead of 127, and QuantizeLinear's clamp at 0 is the ReLU itself, so the Relu node goes
(per row, so does the Abs):
    y = MatMulIntegerToFloat(QuantizeLinear(h, max / 255, 0), W_s8, ..., 0, ...)   (h: the ReLU's input)

Both keep translations independent of batching. Static scales save about a tenth of an
int8 step on the default model at the same BLEU; an activation beyond its calibrated
range saturates, so calibrate on text like what will be served.

  Gather(E, ids) ->  Gather(E_s8, ids) * Gather(s_row(E), ids)     (vocabulary-sized tables)

Activations are uint8 with zero point 128 because U8S8 is the integer GEMM that MLAS
implements on every x86-64 CPU. On CPUs without VNNI that kernel uses VPMADDUBSW, whose
int16 pair sums saturate when |2 * 255 * w| > 32767; 7-bit weights (|w| <= 63) rule that
out at a small accuracy cost. With VNNI (AVX512-VNNI or AVX-VNNI) the products accumulate
in int32 and full 8-bit weights are safe, as on ARM. `weight_bits` chooses; the export tool
defaults to 7 on x86 CPUs without VNNI, else 8, and records the choice in the manifest; the
server warns when 8-bit weights run on an x86 CPU without VNNI.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.optimize import bias_add, inferred_dims, int_attribute, readers_of

GATHER_MIN_ROWS = 1024  # quantize vocabulary tables; small tables (positions) stay fp32


def weight_key(first_output_weights: np.ndarray) -> bytes:
    """A projection's name for calibration: the bytes of its first output unit's input weights
    (a PyTorch Linear's weight[0], a graph MatMul's weight[:, 0])."""
    return np.ascontiguousarray(first_output_weights, dtype=np.float32).tobytes()


def quantize_int8(model: onnx.ModelProto, weight_bits: int = 8,
                  input_ranges: dict[bytes, float] | None = None) -> onnx.ModelProto:
    """input_ranges: weight_key of a projection -> max |input| (export/calibrate.py); projections
    found there get static activation scales, the others per-row ones."""
    if weight_bits not in (7, 8):
        raise ValueError(f"weight_bits must be 7 or 8, got {weight_bits}")
    q_max = 127 if weight_bits == 8 else 63
    input_ranges = input_ranges or {}
    _drop_float_to_float_casts(model)  # e.g. the logits' .float(): the bias Add after it can then fold
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    new_nodes, new_inits, replaced = [], [], set()
    row_shapes = _leading_shapes(model)
    zero_points: dict[tuple, str] = {}  # (leading shape, of a ReLU or not) -> the zero-point tensor they share
    readers, graph_outputs = readers_of(graph), {output.name for output in graph.output}
    folded_adds: set[str] = set()
    relu_inputs = _relus_into_projections(graph, readers, graph_outputs, initializers)
    shared = [
        numpy_helper.from_array(np.array(128, dtype=np.uint8), "q8_zero_point"),
        numpy_helper.from_array(np.array(0, dtype=np.uint8), "q8_zero_point_0"),
        numpy_helper.from_array(np.array([128], dtype=np.uint8), "q8_zero_point_row"),
        numpy_helper.from_array(np.array([0], dtype=np.uint8), "q8_zero_point_row_0"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "q8_last_axis"),
        numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "q8_tiny"),
        numpy_helper.from_array(np.array(1 / 127, dtype=np.float32), "q8_inv_127"),
        numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "q8_inv_255"),
    ]
    for node in graph.node:
        weight = _projection_weight(node, initializers)
        table = initializers.get(node.input[0]) if node.op_type == "Gather" else None
        if node.output[0] in folded_adds or node.output[0] in relu_inputs:  # inside a GEMM / its quantizer now
            continue
        if weight is not None:
            weight_array = numpy_helper.to_array(weight)
            input_range = input_ranges.get(weight_key(weight_array[:, 0]))
            relu_input = relu_inputs.get(node.input[0])
            if input_range is not None:
                add, _ = bias_add(node.output[0], readers, initializers, weight_array.shape[1])
                if node.output[0] in graph_outputs:
                    add = None
                nodes, inits = _static_quantized_matmul(node, weight_array, q_max, input_range, add, relu_input)
                if add is not None:
                    folded_adds.add(add.output[0])
            else:
                rows = row_shapes.get(node.input[0])
                kind = rows, relu_input is not None
                nodes, inits, zero_point = _quantized_matmul(node, weight_array, q_max, zero_points.get(kind),
                                                             relu_input)
                if rows is not None:
                    zero_points.setdefault(kind, zero_point)
        elif table is not None and len(table.dims) == 2 and table.dims[0] >= GATHER_MIN_ROWS \
                and table.data_type == TensorProto.FLOAT and int_attribute(node, "axis", 0) == 0:
            nodes, inits = _quantized_gather(node, numpy_helper.to_array(table))
        else:
            new_nodes.append(node)
            continue
        replaced.add(weight.name if weight is not None else table.name)
        new_nodes += nodes
        new_inits += inits
    still_used = {name for node in new_nodes for name in node.input}
    kept = [init for init in graph.initializer if init.name not in replaced or init.name in still_used]
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(kept + [init for init in shared if init.name in still_used] + new_inits)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 21)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def _drop_float_to_float_casts(model: onnx.ModelProto) -> None:
    """Cast nodes that turn a float tensor into a float tensor do nothing: their readers read
    the input instead."""
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.input]}
    graph_outputs = {output.name for output in model.graph.output}
    aliases = {n.output[0]: n.input[0] for n in model.graph.node
               if n.op_type == "Cast" and int_attribute(n, "to", 0) == TensorProto.FLOAT
               and types.get(n.input[0]) == TensorProto.FLOAT and n.output[0] not in graph_outputs}
    kept = [n for n in model.graph.node if not (n.op_type == "Cast" and n.output[0] in aliases)]
    for node in kept:
        node.input[:] = [aliases.get(name, name) for name in node.input]
    model.graph.ClearField("node")
    model.graph.node.extend(kept)


def _leading_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Each tensor's dimensions but the last, where shape inference knows them all."""
    return {name: tuple(dims[:-1]) for name, dims in inferred_dims(model).items() if dims and None not in dims}


def _weight_initializers(weight: np.ndarray, q_max: int, p: str) -> list[onnx.TensorProto]:
    """The int8 weight, symmetric per output column, and its column scales: {p}/w_s8, {p}/col_scale."""
    col_scale = np.maximum(np.abs(weight).max(axis=0), 1e-12) / q_max  # (N,)
    weight_q = np.clip(np.round(weight / col_scale), -q_max, q_max).astype(np.int8)
    return [numpy_helper.from_array(weight_q, f"{p}/w_s8"),
            numpy_helper.from_array(col_scale.astype(np.float32), f"{p}/col_scale")]


def _projection_weight(node: onnx.NodeProto, initializers: dict) -> onnx.TensorProto | None:
    """The float (inputs, outputs) matrix a MatMul node multiplies by, if it is one: a projection."""
    weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
    if weight is None or len(weight.dims) != 2 or weight.data_type != TensorProto.FLOAT:
        return None
    return weight


def _relus_into_projections(graph: onnx.GraphProto, readers: dict, graph_outputs: set,
                            initializers: dict) -> dict[str, str]:
    """Relu output -> its input, for each Relu read only by projections (their quantizers take
    the ReLU's place)."""
    return {n.output[0]: n.input[0] for n in graph.node
            if n.op_type == "Relu" and n.output[0] not in graph_outputs and readers[n.output[0]]
            and all(r.input[0] == n.output[0] and _projection_weight(r, initializers) is not None
                    for r in readers[n.output[0]])}


def _static_quantized_matmul(node: onnx.NodeProto, weight: np.ndarray, q_max: int, input_range: float,
                             add: onnx.NodeProto | None, relu_input: str | None):
    """QuantizeLinear with the calibrated scale, then the integer GEMM; with `add` (the Add of a
    bias to the MatMul's output), its bias goes inside MatMulIntegerToFloat and its output is the
    GEMM's; with `relu_input` (the node reads a ReLU's output), the ReLU's input quantized with
    zero point 0, which clamps it as the ReLU did."""
    p = node.name or node.output[0]
    if relu_input is None:
        x, levels, zero_point = node.input[0], 127, "q8_zero_point"
    else:
        x, levels, zero_point = relu_input, 255, "q8_zero_point_0"
    scale = np.array(max(input_range, 1e-12) / levels, dtype=np.float32)
    bias, y = "", node.output[0]
    if add is not None:
        bias, y = next(name for name in add.input if name != node.output[0]), add.output[0]
    nodes = [
        helper.make_node("QuantizeLinear", [x, f"{p}/x_scale", zero_point], [f"{p}/x_u8"]),
        helper.make_node("MatMulIntegerToFloat", [f"{p}/x_u8", f"{p}/w_s8", f"{p}/x_scale", f"{p}/col_scale",
                                                  zero_point, "", bias], [y], domain="com.microsoft"),
    ]
    return nodes, _weight_initializers(weight, q_max, p) + [numpy_helper.from_array(scale, f"{p}/x_scale")]


def _quantized_matmul(node: onnx.NodeProto, weight: np.ndarray, q_max: int, zero_point: str | None,
                      relu_input: str | None):
    """The int8 chain for one MatMul; returns its nodes, initializers and the name of its
    (rows..., 1) zero-point tensor: `zero_point` if given (one of the same shape and kind), else
    its own. With `relu_input` (the node reads a ReLU's output), the ReLU's input row by row over
    255 levels from zero point 0, which clamps it as the ReLU did."""
    p = node.name or node.output[0]
    y = node.output[0]
    if relu_input is None:  # each row's max |x| over the 127 levels either side of 128
        x, inverse_levels, row_zero, gemm_zero = node.input[0], "q8_inv_127", "q8_zero_point_row", "q8_zero_point"
        nodes = [helper.make_node("Abs", [x], [f"{p}/abs"]),
                 helper.make_node("ReduceMax", [f"{p}/abs", "q8_last_axis"], [f"{p}/rowmax"], keepdims=1)]
    else:
        x, inverse_levels, row_zero, gemm_zero = relu_input, "q8_inv_255", "q8_zero_point_row_0", "q8_zero_point_0"
        nodes = [helper.make_node("ReduceMax", [x, "q8_last_axis"], [f"{p}/rowmax"], keepdims=1)]
    # No bias input: with a per-row a_scale, ONNX Runtime 1.32 scales the bias by it too.
    inputs = [f"{p}/x_u8", f"{p}/w_s8", f"{p}/row_scale", f"{p}/col_scale", gemm_zero]
    nodes += [
        helper.make_node("Max", [f"{p}/rowmax", "q8_tiny"], [f"{p}/rowmax_safe"]),
        helper.make_node("Mul", [f"{p}/rowmax_safe", inverse_levels], [f"{p}/row_scale"]),
    ]
    if zero_point is None:  # blocked QuantizeLinear wants a zero point of its scale's shape
        zero_point = f"{p}/row_zero_point"
        nodes += [helper.make_node("Shape", [f"{p}/row_scale"], [f"{p}/rows"]),
                  helper.make_node("Expand", [row_zero, f"{p}/rows"], [zero_point])]
    nodes += [
        helper.make_node("QuantizeLinear", [x, f"{p}/row_scale", zero_point], [f"{p}/x_u8"],
                         axis=-1, block_size=weight.shape[0]),
        helper.make_node("MatMulIntegerToFloat", inputs, [y], domain="com.microsoft"),
    ]
    return nodes, _weight_initializers(weight, q_max, p), zero_point


def _quantized_gather(node: onnx.NodeProto, table: np.ndarray):
    p = node.name or node.output[0]
    row_scale = np.maximum(np.abs(table).max(axis=1, keepdims=True), 1e-12) / 127  # (V, 1)
    table_q = np.clip(np.round(table / row_scale), -127, 127).astype(np.int8)
    ids, y = node.input[1], node.output[0]
    nodes = [
        helper.make_node("Gather", [f"{p}/table_s8", ids], [f"{p}/rows_s8"], axis=0),
        helper.make_node("Gather", [f"{p}/table_scale", ids], [f"{p}/rows_scale"], axis=0),
        helper.make_node("Cast", [f"{p}/rows_s8"], [f"{p}/rows_f32"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{p}/rows_f32", f"{p}/rows_scale"], [y]),
    ]
    inits = [
        numpy_helper.from_array(table_q, f"{p}/table_s8"),
        numpy_helper.from_array(row_scale.astype(np.float32), f"{p}/table_scale"),
    ]
    return nodes, inits


FP16_KEEP_FP32_OPS = ["LayerNormalization", "Softmax", "LogSoftmax", "ReduceMean", "Pow", "Sqrt", "Exp", "Range"]


def convert_fp16(model: onnx.ModelProto, fp32_outputs: list[str]) -> onnx.ModelProto:
    """fp16 weights and activations; LayerNorm, softmax and the output log-softmax run in fp32.

    Inputs and the K/V tensors become fp16 (the engine keeps the cache in fp16 on the
    device); the outputs named in fp32_outputs (log-probabilities) stay fp32.
    """
    from onnxconverter_common import float16

    _inline_initializer_identities(model)
    # Explicit casts to fp32 (the logits before log-softmax) must stay casts to fp32.
    casts_to_fp32 = [n.name for n in model.graph.node
                     if n.op_type == "Cast" and int_attribute(n, "to", 0) == TensorProto.FLOAT]
    converted = float16.convert_float_to_float16(
        model, keep_io_types=False, op_block_list=FP16_KEEP_FP32_OPS, node_block_list=casts_to_fp32,
        max_finite_val=65504.0,
    )
    return _outputs_back_to_fp32(converted, fp32_outputs)


def _inline_initializer_identities(model: onnx.ModelProto) -> None:
    """The exporter shares equal weights through Identity nodes; the fp16 converter mistypes those
    that feed fp32-kept ops (LayerNorm), so consumers are pointed at the initializer itself."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    aliases = {n.output[0]: n.input[0] for n in graph.node
               if n.op_type == "Identity" and n.input[0] in initializers and n.output[0] not in outputs}
    if not aliases:
        return
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in aliases)]
    for node in kept:
        node.input[:] = [aliases.get(name, name) for name in node.input]
    graph.ClearField("node")
    graph.node.extend(kept)


def _outputs_back_to_fp32(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    graph = model.graph
    for output in graph.output:
        if output.name in names and output.type.tensor_type.elem_type == TensorProto.FLOAT16:
            inner = f"{output.name}_fp16"
            for node in graph.node:  # producer and consumers move to the fp16 name; the output is a cast of it
                node.output[:] = [inner if o == output.name else o for o in node.output]
                node.input[:] = [inner if i == output.name else i for i in node.input]
            graph.node.append(helper.make_node("Cast", [inner], [output.name], to=TensorProto.FLOAT))
            output.type.tensor_type.elem_type = TensorProto.FLOAT
    return model
