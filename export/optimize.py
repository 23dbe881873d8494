"""Graph rewrites applied at export, before precision variants are derived.

fold_reshape_shapes: constant target shapes for the Reshapes the tracer computes from
other tensors' shapes (below), and with them the shape chains gone.

merge_parallel_matmuls: MatMuls that read the same activation with constant weights (the
Q, K and V projections of one attention; the cross-attention K and V of every decoder
layer, which all read the encoder output) become one MatMul over the concatenated
weights, followed by a Split. One larger GEMM runs faster than three small ones, ONNX
Runtime dispatches fewer nodes per step, and the int8 variant quantizes the shared
activation once instead of once per projection.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper


def merge_parallel_matmuls(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    groups: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and len(weights[node.input[1]].dims) == 2:
            groups[node.input[0]].append(node)
    merged_into: dict[int, list[onnx.NodeProto]] = {}
    for activation, nodes in groups.items():
        if len(nodes) < 2:
            continue
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]
        name = f"{nodes[0].name or nodes[0].output[0]}/merged"
        merged = numpy_helper.from_array(np.concatenate(arrays, axis=1), f"{name}/weight")
        sizes = numpy_helper.from_array(np.array([a.shape[1] for a in arrays], dtype=np.int64), f"{name}/sizes")
        graph.initializer.extend([merged, sizes])
        replacement = [
            helper.make_node("MatMul", [activation, merged.name], [f"{name}/out"], name=name),
            helper.make_node("Split", [f"{name}/out", sizes.name], [n.output[0] for n in nodes], axis=-1,
                             name=f"{name}/split"),
        ]
        merged_into[id(nodes[0])] = replacement  # the merged node goes where the first one stood
        for n in nodes[1:]:
            merged_into[id(n)] = []
    if not merged_into:
        return model
    nodes = []
    for node in graph.node:
        nodes += merged_into.get(id(node), [node])
    graph.ClearField("node")
    graph.node.extend(nodes)
    return remove_unused_nodes(model)  # the separate weights


def fold_reshape_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give Reshapes computed from other tensors' shapes a constant target shape.

    The tracer writes `x.view(batch, length, heads, head_dim)` as Shape -> Gather ->
    Unsqueeze -> Concat -> Reshape, a chain ONNX Runtime runs at every step. Where shape
    inference shows each target dimension is a constant, the input's dimension at the same
    place (ONNX's 0), or the one dimension left (-1), a constant shape does the same, and
    the chains that computed it go.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    dims = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims[info.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param or None
                           for d in info.type.tensor_type.shape.dim]
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] in constants or node.output[0] not in dims:
            continue
        source, target = dims.get(node.input[0]), dims[node.output[0]]
        if source is None or any(attr.name == "allowzero" and attr.i for attr in node.attribute):
            continue
        shape = [d if isinstance(d, int) and d > 0 else 0 if j < len(source) and d is not None and source[j] == d
                 else -1 for j, d in enumerate(target)]
        if shape.count(-1) > 1:
            continue
        name = f"{node.output[0]}/shape"
        graph.initializer.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), name))
        constants.add(name)
        node.input[1] = name
    return remove_unused_nodes(model)


def remove_unused_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes none of whose outputs is read, and initializers nothing reads."""
    graph = model.graph
    wanted = {output.name for output in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(name in wanted for name in node.output):
            kept.append(node)
            wanted.update(node.input)
    graph.ClearField("node")
    graph.node.extend(reversed(kept))
    initializers = [init for init in graph.initializer if init.name in wanted]
    graph.ClearField("initializer")
    graph.initializer.extend(initializers)
    return model
