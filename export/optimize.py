"""Graph rewrites applied at export, most of them before precision variants are derived.

gemms_as_matmuls: Gemm nodes of constant weights (2-D projections) as MatMul and Add, the
form every rewrite below and int8 quantization read.

fold_reshape_shapes: constant target shapes for the Reshapes the tracer computes from
other tensors' shapes (below), and with them the shape chains gone.

merge_parallel_matmuls: MatMuls that read the same activation with constant weights (the
Q, K and V projections of one attention; the cross-attention K and V of every decoder
layer, which all read the encoder output) become one MatMul over the concatenated
weights, followed by one Add of the concatenated biases and a Split. One larger GEMM runs
faster than three small ones, ONNX Runtime dispatches fewer nodes per step, and the int8
variant quantizes the shared activation once instead of once per projection.

constants_as_initializers: Constant nodes become initializers, so the rewrites see every
constant the same way.

fold_output_scales: a projection whose output is multiplied by a constant scalar (the
attention's queries by 1/sqrt(d_k), model.layers) gets the scalar in its weights and bias
instead. Scaling the scores after the product instead made ONNX Runtime fuse the factor
into the score MatMul as FusedMatMul's alpha, which takes MLAS off its matrix-vector path
for one-query rows: 2.3x slower per product in a decoding step.

fuse_top_k, fuse_attention, fuse_add_norm_quantize, fuse_embedding (applied to the int8
decoder step, a CPU graph, after quantization): Parley's fused ops (server/engine/fused_ops.c)
in place of the many small nodes of the top-k over the vocabulary, each attention, each
block's end and the token and position embeddings. pack_int8_matmuls (both int8 graphs, last):
Parley's integer GEMM for 7-bit weights, faster than ONNX Runtime's at a few rows.

reshape_unit_axis_transposes: a Transpose that moves only axes of size 1 leaves the data
where it is; a Reshape, which ONNX Runtime runs without a copy, does the same. In the
decoder step a row has one position, so the head transposes of its query, new key/value
and attention output are such.

merge_reshape_chains: a Reshape of a Reshape's output reshapes the first one's input
directly (the head split of the decoder step's query, keys and values followed by those
transposes became such chains), so ONNX Runtime dispatches one node, not two, for each.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper


def gemms_as_matmuls(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each Gemm of an activation by a constant weight (torch.nn.Linear on 2-D input exports as
    one: the encoder's layers run on its packed positions, model.layers.Packing) becomes MatMul
    and the Add of its bias, the projection form the rewrites here and int8 quantization read."""
    graph = model.graph
    constants = Constants(graph)
    nodes = []
    for node in graph.node:
        weight = constants.initializer(node.input[1]) if node.op_type == "Gemm" else None
        scaled = any(a.name in ("alpha", "beta") and a.f != 1.0 for a in node.attribute)
        if weight is None or scaled or int_attribute(node, "transA", 0):
            nodes.append(node)
            continue
        name, matrix = node.name or node.output[0], weight
        if int_attribute(node, "transB", 0):  # Linear's (outputs, inputs) weight: MatMul takes it transposed
            matrix = f"{name}/weight"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(constants.values[weight].T), matrix))
        if len(node.input) < 3 or not node.input[2]:
            nodes.append(helper.make_node("MatMul", [node.input[0], matrix], list(node.output), name=name))
            continue
        product = f"{name}/product"
        nodes += [helper.make_node("MatMul", [node.input[0], matrix], [product], name=name),
                  helper.make_node("Add", [product, node.input[2]], list(node.output), name=f"{name}/bias")]
    return with_nodes(model, nodes)


def merge_parallel_matmuls(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    groups: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and len(weights[node.input[1]].dims) == 2:
            groups[node.input[0]].append(node)
    readers = readers_of(graph)
    merged_into: dict[str, list[onnx.NodeProto]] = {}  # by the replaced node's first output
    for activation, nodes in groups.items():
        if len(nodes) < 2:
            continue
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]
        name = f"{nodes[0].name or nodes[0].output[0]}/merged"
        merged = numpy_helper.from_array(np.concatenate(arrays, axis=1), f"{name}/weight")
        sizes = numpy_helper.from_array(np.array([a.shape[1] for a in arrays], dtype=np.int64), f"{name}/sizes")
        graph.initializer.extend([merged, sizes])
        replacement = [helper.make_node("MatMul", [activation, merged.name], [f"{name}/out"], name=name)]
        bias_adds = [bias_add(n.output[0], readers, weights, a.shape[1]) for n, a in zip(nodes, arrays)]
        outputs, split_input = [n.output[0] for n in nodes], f"{name}/out"
        if all(add is not None for add, _ in bias_adds):
            # one Add of all the biases, before the Split
            bias = numpy_helper.from_array(np.concatenate([b for _, b in bias_adds]), f"{name}/bias")
            graph.initializer.append(bias)
            replacement.append(helper.make_node("Add", [split_input, bias.name], [f"{name}/biased"], name=f"{name}/add"))
            outputs, split_input = [add.output[0] for add, _ in bias_adds], f"{name}/biased"
            for add, _ in bias_adds:
                merged_into[add.output[0]] = []
        replacement.append(helper.make_node("Split", [split_input, sizes.name], outputs, axis=-1, name=f"{name}/split"))
        merged_into[nodes[0].output[0]] = replacement  # the merged node goes where the first one stood
        for n in nodes[1:]:
            merged_into[n.output[0]] = []
    if not merged_into:
        return model
    nodes = []
    for node in graph.node:
        nodes += merged_into.get(node.output[0], [node])
    graph.ClearField("node")
    graph.node.extend(nodes)
    return remove_unused_nodes(model)  # the separate weights


def fold_output_scales(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[np.ndarray, np.ndarray]]]:
    """Fold Mul(projection, constant scalar) into the projection: MatMul by a constant 2-D
    weight, optionally the Add of its constant bias, then the Mul, each read only by the next.

    Returns the model and each folded weight's first column before and after: int8
    calibration names a projection by it (export.quantize.weight_key).
    """
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    readers, outputs = readers_of(graph), {output.name for output in graph.output}
    folded = []  # the Muls whose output the projection now writes itself
    columns = []
    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2 or len(readers[weight.name]) != 1:
            continue  # a weight read elsewhere too (tied) keeps its values
        add, bias = bias_add(node.output[0], readers, weights, weight.dims[1])
        bias_name = next(name for name in add.input if name != node.output[0]) if add is not None else None
        if bias_name is not None and len(readers[bias_name]) != 1:
            continue
        last = add if add is not None else node
        mul = readers[last.output[0]][0] if len(readers[last.output[0]]) == 1 else None
        factor = next((weights[name] for name in mul.input if name in weights), None) \
            if mul is not None and mul.op_type == "Mul" else None
        if factor is None or np.prod(factor.dims) != 1 or last.output[0] in outputs:
            continue
        scale = numpy_helper.to_array(factor).reshape(())
        before = numpy_helper.to_array(weight)
        after = (before * scale).astype(before.dtype)
        weight.CopyFrom(numpy_helper.from_array(after, weight.name))
        if bias_name is not None:
            weights[bias_name].CopyFrom(numpy_helper.from_array((bias * scale).astype(bias.dtype), bias_name))
        last.output[0] = mul.output[0]
        folded.append(mul)
        columns.append((before[:, 0], after[:, 0]))
    for mul in folded:
        graph.node.remove(mul)
    return remove_unused_nodes(model), columns


def int_attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    """An integer attribute of the node, or `default` where it has none."""
    return next((a.i for a in node.attribute if a.name == name), default)


def readers_of(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Each tensor's reading nodes (graph outputs are not nodes: check those apart)."""
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    return readers


def topological(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes in an order ONNX accepts (each after the producers of its inputs), otherwise in
    their given order: a fused node may read a tensor produced after the node it replaced."""
    available = {i.name for i in graph.input} | {init.name for init in graph.initializer} | {""}
    ordered, waiting = [], list(nodes)
    while waiting:
        left = []
        for node in waiting:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                left.append(node)
        if len(left) == len(waiting):
            raise ValueError(f"nodes whose inputs nothing produces: {[node.name or node.op_type for node in left][:5]}")
        waiting = left
    return ordered


def bias_add(output: str, readers: dict, weights: dict, width: int) -> tuple[onnx.NodeProto | None, np.ndarray | None]:
    """The Add of a constant vector of `width` entries that is the only reader of a MatMul's
    output, and the vector."""
    if len(readers[output]) != 1 or readers[output][0].op_type != "Add":
        return None, None
    add = readers[output][0]
    other = [name for name in add.input if name != output]
    if len(other) != 1 or other[0] not in weights or list(weights[other[0]].dims) != [width]:
        return None, None
    return add, numpy_helper.to_array(weights[other[0]])


def constants_as_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant nodes holding a tensor become initializers, the one kind of constant the
    rewrites here and in quantize.py look for (the tracer writes some, e.g. the decoder's
    additive never-generate mask, as Constant nodes)."""
    graph = model.graph
    kept = []
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is None:
            kept.append(node)
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
    graph.ClearField("node")
    graph.node.extend(kept)
    return model


def inferred_dims(model: onnx.ModelProto) -> dict[str, list]:
    """Each tensor's dimensions from symbolic shape inference: ints, symbols (one symbol is one
    size at run time), None where unknown."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    return {info.name: [d.dim_value if d.HasField("dim_value") else d.dim_param or None
                        for d in info.type.tensor_type.shape.dim]
            for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}


def _constant_shape(source: list, target: list) -> list[int] | None:
    """A Reshape's constant target shape taking `source` to `target` dims: each a constant, the
    input's dimension at the same place (0), or the one dimension left (-1); None if none does."""
    shape = [d if isinstance(d, int) and d > 0 else 0 if j < len(source) and d is not None and source[j] == d
             else -1 for j, d in enumerate(target)]
    return shape if shape.count(-1) <= 1 else None


def fold_reshape_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give Reshapes computed from other tensors' shapes a constant target shape.

    The tracer writes `x.view(batch, length, heads, head_dim)` as Shape -> Gather ->
    Unsqueeze -> Concat -> Reshape, a chain ONNX Runtime runs at every step. Where shape
    inference shows each target dimension is a constant, the input's dimension at the same
    place (ONNX's 0), or the one dimension left (-1), a constant shape does the same, and
    the chains that computed it go.
    """
    dims = inferred_dims(model)
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] in constants or node.output[0] not in dims:
            continue
        source, target = dims.get(node.input[0]), dims[node.output[0]]
        if source is None or any(attr.name == "allowzero" and attr.i for attr in node.attribute):
            continue
        shape = _constant_shape(source, target)
        if shape is None:
            continue
        name = f"{node.output[0]}/shape"
        graph.initializer.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), name))
        constants.add(name)
        node.input[1] = name
    return remove_unused_nodes(model)


def reshape_unit_axis_transposes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace each Transpose that moves only axes of size 1 by a Reshape with a constant shape."""
    dims = inferred_dims(model)
    for node in model.graph.node:
        if node.op_type != "Transpose" or node.input[0] not in dims or node.output[0] not in dims:
            continue
        source = dims[node.input[0]]
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(len(source)))[::-1])
        moved = [axis for axis in perm if source[axis] != 1]  # symbols and unknowns may be more than 1
        shape = _constant_shape(source, dims[node.output[0]])
        if moved != sorted(moved) or shape is None:
            continue
        name = f"{node.output[0]}/shape"
        model.graph.initializer.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), name))
        node.op_type = "Reshape"
        node.ClearField("attribute")
        node.input.append(name)
    return model


def merge_reshape_chains(model: onnx.ModelProto) -> onnx.ModelProto:
    """Let each Reshape whose input is another Reshape's output (both with constant shapes)
    read that Reshape's input instead; the first goes when nothing else reads it. A 0 in the
    second shape (copy the input's dimension) stays valid only where the first shape also
    copies that dimension, so other chains are left as they are."""
    graph = model.graph
    shapes = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}

    def constant_shape(node: onnx.NodeProto) -> np.ndarray | None:
        if node.op_type != "Reshape" or any(a.name == "allowzero" and a.i for a in node.attribute):
            return None
        return shapes.get(node.input[1])

    for node in graph.node:
        second = constant_shape(node)
        first_node = producers.get(node.input[0])
        first = constant_shape(first_node) if second is not None and first_node is not None else None
        if first is None:
            continue
        if all(j < len(first) and first[j] == 0 for j in np.flatnonzero(second == 0)):
            node.input[0] = first_node.input[0]
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


PARLEY_DOMAIN = "ai.parley"  # the fused ops' domain: server/engine/fused_ops.c
FUSED_ATTENTION_POSITIONS = 4096  # the most positions the attention ops take (fused_ops.c's MAX_POSITIONS)


def with_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """The graph with these nodes, in an order ONNX accepts; Parley's domain imported where a
    node is of it; nodes and initializers nothing reads any more removed."""
    graph = model.graph
    graph.ClearField("node")
    graph.node.extend(topological(nodes, graph))
    if any(n.domain == PARLEY_DOMAIN for n in graph.node) and not any(
            o.domain == PARLEY_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(PARLEY_DOMAIN, 1))
    return remove_unused_nodes(model)


class Constants:
    """A graph's initializers, found through Identity nodes too (the exporter writes one for
    each copy of a weight equal to another: a random model's norms all start as ones and zeros)."""

    def __init__(self, graph: onnx.GraphProto):
        self.values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        self.producer = {name: node for node in graph.node for name in node.output}

    def initializer(self, name: str) -> str | None:
        while name not in self.values and name in self.producer and self.producer[name].op_type == "Identity":
            name = self.producer[name].input[0]
        return name if name in self.values else None

    def made_by(self, name: str, op_type: str) -> onnx.NodeProto | None:
        """The node of this type that produces `name`, if one does."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def unit_axis(self, node: onnx.NodeProto | None, op_type: str, index: int) -> bool:
        """node squeezes (a Gather of index 0) or unsqueezes axis 1, its constant input `index`."""
        if node is None or node.op_type != op_type or len(node.input) <= index:
            return False
        constant = self.initializer(node.input[index])
        if constant is None:
            return False
        value = self.values[constant]
        if op_type == "Gather":
            return value.ndim == 0 and int(value) == 0 and int_attribute(node, "axis", 0) == 1
        return value.tolist() == [1]

    def static_levels(self, quantize: onnx.NodeProto) -> list[str] | None:
        """The scale and zero point of a QuantizeLinear to uint8 with one calibrated scale."""
        if quantize.op_type != "QuantizeLinear" or quantize.attribute or len(quantize.input) != 3:
            return None
        levels = [self.initializer(name) for name in quantize.input[1:3]]
        if None in levels or self.values[levels[0]].size != 1 or self.values[levels[1]].size != 1 \
                or self.values[levels[1]].dtype != np.uint8:
            return None
        return levels


def fuse_top_k(model: onnx.ModelProto, vocab_size: int) -> onnx.ModelProto:
    """The decoder's TopK over the vocabulary as Parley's RowTopK (server/engine/fused_ops.c),
    which finds the same entries in the same order, ties included, in two stages: each block
    of 64 entries' maximum, the k blocks with the largest, then the k largest of their
    entries. ONNX Runtime's CPU TopK walks every entry one by one (about 3 µs per row of
    8,000); as standard nodes the two stages took sixteen (block maxima, two TopKs, gathers,
    index arithmetic), dispatched at every step. Rewrites only a TopK of the default kind
    (last axis, largest first, sorted) of a (rows, vocab_size) tensor whose shape the graph
    declares (the decoder's log_probs output).
    """
    graph = model.graph
    declared = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
                for v in [*graph.input, *graph.value_info, *graph.output]}
    nodes = []
    for node in graph.node:
        attributes = {a.name: a.i for a in node.attribute}
        if node.op_type == "TopK" and attributes.get("axis", -1) in (-1, 1) and attributes.get("largest", 1) == 1 \
                and attributes.get("sorted", 1) == 1 and len(declared.get(node.input[0], [])) == 2 \
                and declared[node.input[0]][1] == vocab_size:
            node = helper.make_node("RowTopK", list(node.input), list(node.output),
                                    name=f"{node.name or node.output[0]}/fused", domain=PARLEY_DOMAIN)
        nodes.append(node)
    return with_nodes(model, nodes)


def fuse_attention(model: onnx.ModelProto, max_positions: int) -> onnx.ModelProto:
    """Each layer's self- and cross-attention of the decoder step as one node each, Parley's
    DecoderSelfAttention and DecoderCrossAttention (server/engine/fused_ops.c, CPU only:
    applied to the int8 decoder step). Each replaced some fifteen nodes whose dispatch cost as
    much as their small kernels at a few rows a step. A model of more positions than the ops
    take (max_positions, its sources and outputs) keeps its attention as it is.

    Self-attention: from the split of the merged query, key and value projection (the op
    splits it and returns the new key and value, graph outputs) through the cache_k_i /
    cache_v_i products (the scores over the cache and over the row's own new key, mask,
    softmax, the weighted values) to the reshape of the result to (rows, 1, d).
    Cross-attention: from the query, before the grid gathers it (decoding.grid), to the gather
    of each row's result back from the grid; the squeeze and unsqueeze of the query's unit
    axis around them go too when both are there.
    """
    if max_positions > FUSED_ATTENTION_POSITIONS:
        return model
    graph = model.graph
    known = Constants(graph)
    producer, constants = known.producer, known.values
    readers = readers_of(graph)
    matmul_of = {node.input[1]: node for node in graph.node if node.op_type == "MatMul"}

    def only_reader(name: str, op_type: str) -> onnx.NodeProto:
        found = readers.get(name, [])
        if len(found) != 1 or found[0].op_type != op_type:
            raise ValueError(f"fuse_attention: {name} is read by {[n.op_type for n in found]}, expected one {op_type}")
        return found[0]

    def produced_by(name: str, op_type: str) -> onnx.NodeProto:
        node = producer.get(name)
        if node is None or node.op_type != op_type:
            raise ValueError(f"fuse_attention: {name} comes from {node.op_type if node else 'outside'}, "
                             f"expected {op_type}")
        return node

    fused: dict[str, onnx.NodeProto] = {}  # by the output the fused node takes over
    layers = sorted(int(i.name.rsplit("_", 1)[1]) for i in graph.input if i.name.startswith("cache_k_"))
    for layer in layers:
        names = {kind: f"{kind}_{layer}" for kind in ("cache_k", "cache_v", "cross_k", "cross_v", "new_k", "new_v")}
        if any(names[kind] not in matmul_of for kind in ("cache_k", "cache_v", "cross_k", "cross_v")):
            raise ValueError(f"fuse_attention: layer {layer}'s attention products are not in the graph")
        split = produced_by(produced_by(matmul_of[names["cache_k"]].input[0], "Reshape").input[0], "Split")
        parts = [produced_by(names[kind], "Reshape").input[0] for kind in ("new_k", "new_v")]
        if list(split.output) != [split.output[0], *parts]:
            raise ValueError(f"fuse_attention: layer {layer}'s query, key and value are not one projection's split")
        joined = only_reader(matmul_of[names["cache_v"]].output[0], "Add")
        rows = only_reader(joined.output[0], "Reshape")  # (R, H, 1, dk) -> (R, 1, H * dk)
        if rows.input[1] not in constants or constants[rows.input[1]].tolist()[1:2] != [1]:
            raise ValueError(f"fuse_attention: layer {layer}'s self-attention output is not reshaped to (rows, 1, d)")
        fused[rows.output[0]] = helper.make_node(
            "DecoderSelfAttention", [split.input[0], names["cache_k"], names["cache_v"], "cache_mask"],
            [rows.output[0], names["new_k"], names["new_v"]], name=f"self_attention_{layer}",
            domain=PARLEY_DOMAIN)

        grid_query = produced_by(produced_by(matmul_of[names["cross_k"]].input[0], "Transpose").input[0], "Reshape")
        to_grid = produced_by(grid_query.input[0], "Gather")
        from_grid = only_reader(only_reader(only_reader(
            matmul_of[names["cross_v"]].output[0], "Transpose").output[0], "Reshape").output[0], "Gather")
        if to_grid.input[1] != "slot_row" or from_grid.input[1] != "row_slot":
            raise ValueError(f"fuse_attention: layer {layer}'s cross-attention does not use the query grid")
        query, result = to_grid.input[0], from_grid.output[0]
        squeeze, unsqueeze = producer.get(query), readers.get(result, [None])[0]
        if known.unit_axis(squeeze, "Gather", 1) and len(readers[result]) == 1 \
                and known.unit_axis(unsqueeze, "Unsqueeze", 1):
            query, result = squeeze.input[0], unsqueeze.output[0]
        fused[result] = helper.make_node(
            "DecoderCrossAttention", [query, names["cross_k"], names["cross_v"], "src_mask", "slot_row", "row_slot"],
            [result], name=f"cross_attention_{layer}", domain=PARLEY_DOMAIN)
    taken = {name for node in fused.values() for name in node.output}  # their producers go
    return with_nodes(model, [fused.get(node.output[0], node) for node in graph.node
                              if node.output[0] in fused or not taken.intersection(node.output)])


def fuse_add_norm_quantize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A post-norm block's end, Add (the residual) -> LayerNormalization -> QuantizeLinear (the
    next projection's int8 input, a calibrated scale), as one AddLayerNormQuantize node
    (server/engine/fused_ops.c) returning both the normalized values (the next residual)
    and their quantized copy: three nodes of a few microseconds' work each become one. Only
    static scales: per-row scales are computed in the graph and stay as they are.

    The stack's last norm reaches the output projection's quantizer through a Gather of its
    one position (model.transformer's `[:, 0]`): that Gather moves after the fused node, onto
    the quantized values. Both orders give the same values, the norm being over the last axis
    and the quantization per element, as long as the Gather keeps that axis: the projection it
    feeds takes rows of the norm's width."""
    graph = model.graph
    readers = readers_of(graph)
    constants = Constants(graph)
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id of the LayerNormalization -> the nodes in its place
    dropped: set[int] = set()
    for norm in graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in norm.attribute}
        add = constants.made_by(norm.input[0], "Add")
        weights = [constants.initializer(name) for name in norm.input[1:3]]
        if norm.op_type != "LayerNormalization" or attributes.get("axis", -1) != -1 or None in weights \
                or len(weights) != 2 or add is None or len(readers[add.output[0]]) != 1 \
                or any(constants.initializer(name) for name in add.input):
            continue
        width = constants.values[weights[0]].size
        quantizers = [(None, r) for r in readers[norm.output[0]] if r.op_type == "QuantizeLinear"]
        quantizers += [(r, readers[r.output[0]][0]) for r in readers[norm.output[0]]
                       if _keeps_last_axis(r, readers, constants, width)]
        levels = constants.static_levels(quantizers[0][1]) if len(quantizers) == 1 else None
        if levels is None:
            continue
        gather, quantizer = quantizers[0]
        quantized = quantizer.output[0] if gather is None else f"{quantizer.output[0]}/before_gather"
        nodes = [helper.make_node(
            "AddLayerNormQuantize", [*add.input, *weights, *levels], [norm.output[0], quantized],
            name=f"{norm.name or norm.output[0]}/fused", domain=PARLEY_DOMAIN,
            epsilon=float(attributes.get("epsilon", 1e-5)))]
        if gather is not None:
            nodes.append(helper.make_node("Gather", [quantized, gather.input[1]], [quantizer.output[0]],
                                          name=f"{gather.name or gather.output[0]}/quantized", axis=1))
        replaced[id(norm)] = nodes
        dropped.update((id(add), id(quantizer)))
    return with_nodes(model, [n for node in graph.node if id(node) not in dropped
                              for n in replaced.get(id(node), [node])])


def pack_int8_matmuls(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each MatMulIntegerToFloat of a constant 7-bit weight (|w| <= 63, no weight zero point) as
    Parley's Int8MatMul, the weight packed in the blocks its kernel reads and its column sums
    precomputed (server/engine/fused_ops.c). 8-bit weights, exported for CPUs with VNNI, keep
    ONNX Runtime's GEMM: the AVX2 kernel's int16 pair sums could saturate on them."""
    graph = model.graph
    constants = Constants(graph)
    nodes = []
    for node in graph.node:
        weight = constants.initializer(node.input[1]) if node.op_type == "MatMulIntegerToFloat" else None
        values = constants.values[weight] if weight is not None else None
        inputs = list(node.input) + [""] * (7 - len(node.input))
        if values is None or values.dtype != np.int8 or values.ndim != 2 or not inputs[4] or inputs[5] \
                or np.abs(values.astype(np.int16)).max(initial=0) > 63:
            nodes.append(node)
            continue
        k, n = values.shape
        steps, blocks = -(-k // 4), -(-n // 16)
        padded = np.zeros((steps * 4, blocks * 16), np.int8)
        padded[:k, :n] = values
        name = node.name or node.output[0]
        # packed[block, step, 4 * column + i] = w[4 * step + i, 16 * block + column]
        packed = padded.reshape(steps, 4, blocks, 16).transpose(2, 0, 3, 1).reshape(blocks, steps, 64)
        graph.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(packed), f"{name}/w_packed"),
            numpy_helper.from_array(values.astype(np.int32).sum(axis=0, dtype=np.int32), f"{name}/column_sums")])
        nodes.append(helper.make_node(
            "Int8MatMul", [inputs[0], f"{name}/w_packed", inputs[2], inputs[3], inputs[4], f"{name}/column_sums",
                           inputs[6]], list(node.output), name=name, domain=PARLEY_DOMAIN))
    return with_nodes(model, nodes)


def _keeps_last_axis(gather: onnx.NodeProto, readers: dict, constants: Constants, width: int) -> bool:
    """gather takes position 0 of axis 1 and its only reader is a QuantizeLinear whose only
    reader is an integer projection of `width` inputs, so the norm's axis is still last."""
    if not constants.unit_axis(gather, "Gather", 1):
        return False
    quantizers = readers[gather.output[0]]
    if len(quantizers) != 1 or quantizers[0].op_type != "QuantizeLinear" or len(readers[quantizers[0].output[0]]) != 1:
        return False
    projection = readers[quantizers[0].output[0]][0]
    weight = constants.initializer(projection.input[1]) if len(projection.input) > 1 else None
    return projection.op_type == "MatMulIntegerToFloat" and weight is not None \
        and constants.values[weight].shape[:1] == (width,)


def fuse_embedding(model: onnx.ModelProto) -> onnx.ModelProto:
    """The decoder step's token and position embeddings and the first projection's quantization
    as one TokenEmbedding node (server/engine/fused_ops.c): the int8 export's dequantizing Gather
    of the token's row (Unsqueeze, two Gathers, Cast, Mul; a small vocabulary's table stays
    float, one Gather), the Mul by sqrt(d), the Gather of the position's sinusoid (Unsqueeze,
    Gather), their Add and the QuantizeLinear, ten nodes of a microsecond or two each at every
    step. The op computes the same values in the same order. A graph without that pattern (the
    tokens and positions graph inputs, constant tables, a calibrated scale) stays as it is."""
    graph = model.graph
    constants = Constants(graph)
    made_by = constants.made_by

    def rows_of(gather: onnx.NodeProto | None, source: str) -> str | None:
        """The constant table a Gather (axis 0) reads rows of, at `source` unsqueezed to (R, 1)."""
        if gather is None or int_attribute(gather, "axis", 0) != 0:
            return None
        ids = made_by(gather.input[1], "Unsqueeze")
        if not constants.unit_axis(ids, "Unsqueeze", 1) or ids.input[0] != source:
            return None
        return constants.initializer(gather.input[0])

    def embedding_rows(name: str) -> tuple[str | None, str]:
        """The token table whose rows `name` holds and, for an int8 table, its row scales: a float
        table's Gather, or an int8 table's Gather, Cast and Mul by its rows' scales."""
        table = rows_of(made_by(name, "Gather"), "tokens")
        if table is not None:
            return (table, "") if constants.values[table].dtype == np.float32 else (None, "")
        dequantized = made_by(name, "Mul")
        cast = made_by(dequantized.input[0], "Cast") if dequantized is not None else None
        table = rows_of(made_by(cast.input[0], "Gather"), "tokens") if cast is not None else None
        row_scale = rows_of(made_by(dequantized.input[1], "Gather"), "tokens") if cast is not None else None
        if table is None or row_scale is None or constants.values[table].dtype != np.int8:
            return None, ""
        return table, row_scale

    for quantizer in graph.node:
        levels = constants.static_levels(quantizer)
        add = made_by(quantizer.input[0], "Add") if levels else None
        if add is None:
            continue
        for scaled_name, position_name in (add.input, reversed(add.input)):
            scaled, position = made_by(scaled_name, "Mul"), made_by(position_name, "Gather")
            position_table = rows_of(position, "positions")
            if scaled is None or position_table is None or constants.values[position_table].dtype != np.float32:
                continue
            for rows_name, embed_scale in (scaled.input, reversed(scaled.input)):
                embed_scale = constants.initializer(embed_scale)
                table, row_scale = embedding_rows(rows_name)
                if embed_scale is None or constants.values[embed_scale].size != 1 or table is None \
                        or constants.values[embed_scale].dtype != np.float32:
                    continue
                fused = helper.make_node(
                    "TokenEmbedding", ["tokens", "positions", table, row_scale, embed_scale, position_table, *levels],
                    [add.output[0], quantizer.output[0]], name="token_embedding", domain=PARLEY_DOMAIN)
                return with_nodes(model, [fused if node is add else node for node in graph.node
                                          if node is not quantizer])
    return model
