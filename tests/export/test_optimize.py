import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from decoding.grid import query_grid
from export.optimize import (PARLEY_DOMAIN, fold_output_scales, fuse_add_norm_quantize, fuse_embedding,
                             fuse_top_k, gemms_as_matmuls, merge_reshape_chains, pack_int8_matmuls)
from server.engine.session import fused_ops_library


def run_feed(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return run_feed(model, {"x": x})


def fused_session(model: onnx.ModelProto, threads: int = 0) -> onnxruntime.InferenceSession:
    """A session that can run Parley's fused ops (threads: ONNX Runtime's default when 0)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(fused_ops_library())
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def projections_then_scales() -> onnx.ModelProto:
    """x -> MatMul(W) -> Add(b) -> Mul(0.25) -> out and x -> MatMul(U) -> Mul(2) -> unbiased
    (foldable); x -> MatMul(T) -> Mul(3) -> tied, where T is also read by another MatMul (not)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("W", (4, 3)), ("b", (3,)), ("T", (4, 3)), ("U", (4, 2)))]
    inits += [numpy_helper.from_array(np.array(0.25, np.float32), "quarter"),
              numpy_helper.from_array(np.array(3.0, np.float32), "three"),
              numpy_helper.from_array(np.array([2.0], np.float32), "two")]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["xwb"]),
        helper.make_node("Mul", ["xwb", "quarter"], ["out"]),
        helper.make_node("MatMul", ["x", "T"], ["xt"]),
        helper.make_node("Mul", ["three", "xt"], ["tied"]),
        helper.make_node("MatMul", ["x", "T"], ["also_t"]),
        helper.make_node("MatMul", ["x", "U"], ["xu"]),
        helper.make_node("Mul", ["xu", "two"], ["unbiased"]),
    ]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
               for name in ("out", "tied", "also_t", "unbiased")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_scalar_after_a_projection_moves_into_its_weights_unless_they_are_shared():
    model = projections_then_scales()
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    expected = run(model, x)
    weight = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W")).copy()

    folded, columns = fold_output_scales(model)

    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add", "MatMul", "Mul", "MatMul", "MatMul"]
    for got, want in zip(run(folded, x), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert len(columns) == 2
    np.testing.assert_array_equal(columns[0][0], weight[:, 0])
    np.testing.assert_array_equal(columns[0][1], weight[:, 0] * np.float32(0.25))


def test_a_projection_written_as_gemm_becomes_matmul_and_add_unless_it_scales():
    """Linear on 2-D input exports as Gemm(transB=1) with a bias; without one, or with B as
    it lies, the same; alpha or beta other than 1 is no plain projection and stays."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("W", (3, 4)), ("b", (3,)), ("U", (4, 2)), ("V", (3, 4)))]
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["linear"], transB=1),
             helper.make_node("Gemm", ["x", "U"], ["plain"]),
             helper.make_node("Gemm", ["x", "V", "b"], ["scaled"], transB=1, alpha=0.5)]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("linear", "plain", "scaled")]
    model = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                                                outputs, inits), opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((2, 4)).astype(np.float32)
    expected = run(model, x)

    rewritten = gemms_as_matmuls(model)

    assert [n.op_type for n in rewritten.graph.node] == ["MatMul", "Add", "MatMul", "Gemm"]
    weights = {i.name: numpy_helper.to_array(i) for i in rewritten.graph.initializer}
    assert weights[rewritten.graph.node[0].input[1]].shape == (4, 3)  # the transposed copy; W itself is gone
    assert "W" not in weights
    for got, want in zip(run(rewritten, x), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def integer_gemm(weight: np.ndarray, bias: np.ndarray | None, rows: list) -> onnx.ModelProto:
    """a (rows..., K) uint8, a_scale and a_zero_point fed -> MatMulIntegerToFloat by the
    constant int8 weight (K, N) with column scales and, optionally, a bias."""
    n = weight.shape[1]
    inits = [numpy_helper.from_array(weight, "w"),
             numpy_helper.from_array(np.linspace(0.5, 2.0, n, dtype=np.float32) / 64, "w_scale")]
    inputs = ["a", "w", "a_scale", "w_scale", "a_zero_point", ""]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        inputs.append("bias")
    node = helper.make_node("MatMulIntegerToFloat", inputs, ["y"], domain="com.microsoft", name="gemm")
    graph = helper.make_graph([node], "g", [
        helper.make_tensor_value_info("a", TensorProto.UINT8, [*rows, weight.shape[0]]),
        helper.make_tensor_value_info("a_scale", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("a_zero_point", TensorProto.UINT8, None),
    ], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("k,n", [(32, 48), (18, 21), (256, 40)])
@pytest.mark.parametrize("rows", [[0], [1], [3], [2, 5]])
@pytest.mark.parametrize("per_row,biased", [(False, True), (True, False)])
def test_the_packed_int8_gemm_computes_what_the_integer_product_is(k, n, rows, per_row, biased):
    """Int8MatMul on 7-bit weights: every shape (inputs and columns past whole blocks, rows past
    a block of four, leading axes), one scale and zero point or one per row; the AVX2 kernel
    and the portable loops agree to the bit, and ONNX Runtime's GEMM to rounding."""
    rng = np.random.default_rng(k * n + len(rows))
    weight = rng.integers(-63, 64, (k, n), dtype=np.int8)
    weight[:, 0] = -63  # extremes: the kernel's int16 pair sums must not saturate
    bias = rng.standard_normal(n).astype(np.float32) if biased else None
    a = rng.integers(0, 256, (*rows, k), dtype=np.uint8)
    a.reshape(-1, k)[:1] = 255
    count = int(np.prod(rows))
    shape = (*rows, 1) if per_row else ()
    a_scale = np.asarray(rng.uniform(0.01, 0.05, shape), np.float32)
    a_zero_point = np.asarray(rng.integers(0, 2, shape) * 128, np.uint8)
    feed = {"a": a, "a_scale": a_scale, "a_zero_point": a_zero_point}
    model = integer_gemm(weight, bias, rows)

    packed = pack_int8_matmuls(onnx.load_from_string(model.SerializeToString()))

    assert [(node.op_type, node.domain) for node in packed.graph.node] == [("Int8MatMul", PARLEY_DOMAIN)]
    got = fused_session(packed, threads=1).run(None, feed)[0]
    portable = onnx.load_from_string(packed.SerializeToString())
    portable.graph.node[0].attribute.append(helper.make_attribute("kernels", "portable"))
    np.testing.assert_array_equal(fused_session(portable, threads=2).run(None, feed)[0], got)
    products = (a.astype(np.int64) - a_zero_point.astype(np.int64)) @ weight.astype(np.int64)
    expected = products * (a_scale.astype(np.float64) * numpy_helper.to_array(model.graph.initializer[1]))
    expected += bias if biased else 0
    assert got.shape == (*rows, n) and count * n == got.size
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    if not per_row:  # ONNX Runtime scales the bias by a per-row a_scale too (export.quantize)
        np.testing.assert_allclose(got, run_feed(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_an_8_bit_weight_keeps_onnx_runtimes_gemm():
    """Weights beyond 7 bits could saturate the AVX2 kernel's pair sums: they stay as they were."""
    weight = np.full((8, 16), 100, np.int8)
    model = pack_int8_matmuls(integer_gemm(weight, None, [2]))
    assert [node.op_type for node in model.graph.node] == ["MatMulIntegerToFloat"]


def reshape_chains() -> onnx.ModelProto:
    """x (n, 8) -> (0, 2, 4) -> (0, 2, 1, 4) -> heads and -> (0, 8, 1) -> flat (mergeable: the
    intermediate is read twice, both reads keep n); x -> (2, -1) -> (0, 0, 1) -> pairs, whose
    0s copy dimensions the first shape fixed (not mergeable)."""
    shapes = {"split": [0, 2, 4], "unit": [0, 2, 1, 4], "back": [0, 8, 1], "fixed": [2, -1], "copy": [0, 0, 1]}
    inits = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in shapes.items()]
    nodes = [
        helper.make_node("Reshape", ["x", "split"], ["by_head"]),
        helper.make_node("Reshape", ["by_head", "unit"], ["heads"]),
        helper.make_node("Reshape", ["by_head", "back"], ["flat"]),
        helper.make_node("Reshape", ["x", "fixed"], ["two_rows"]),
        helper.make_node("Reshape", ["two_rows", "copy"], ["pairs"]),
    ]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("heads", "flat", "pairs")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_reshape_of_a_reshape_reads_the_first_input_where_the_copied_dimensions_allow():
    model = reshape_chains()
    x = np.arange(24, dtype=np.float32).reshape(3, 8)
    expected = run(model, x)

    merged = merge_reshape_chains(model)

    assert [(n.input[0], n.output[0]) for n in merged.graph.node] == [
        ("x", "heads"), ("x", "flat"), ("x", "two_rows"), ("two_rows", "pairs")]
    for got, want in zip(run(merged, x), expected):
        np.testing.assert_array_equal(got, want)


def block_end(width: int) -> onnx.ModelProto:
    """A post-norm block's end as the int8 export writes it: x + residual -> LayerNormalization
    -> QuantizeLinear (a static scale, zero point 128) for the next projection, the normalized
    values also read by the next residual add."""
    rng = np.random.default_rng(width)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, width).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.uniform(-0.5, 0.5, width).astype(np.float32), "beta"),
             numpy_helper.from_array(np.array(0.02, np.float32), "scale"),  # +-2.5 saturates
             numpy_helper.from_array(np.array(128, np.uint8), "zero_point")]
    nodes = [helper.make_node("Add", ["x", "residual"], ["sum"]),
             helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["normalized"], axis=-1, epsilon=1e-5),
             helper.make_node("QuantizeLinear", ["normalized", "scale", "zero_point"], ["quantized"]),
             helper.make_node("Add", ["normalized", "x"], ["next"])]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, 1, width]) for name in ("x", "residual")]
    outputs = [helper.make_tensor_value_info("quantized", TensorProto.UINT8, None),
               helper.make_tensor_value_info("next", TensorProto.FLOAT, None)]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                             opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("width, threads", [(32, 1), (30, 1), (32, 2)])
def test_a_block_end_fused_into_one_op_computes_what_onnx_runtime_did(width, threads):
    """fuse_add_norm_quantize: the same normalized values and the same int8 levels, saturated ones
    included (30 wide: the kernel's tail beyond its blocks of four; two threads share the rows)."""
    model = block_end(width)
    fused = fuse_add_norm_quantize(block_end(width))
    assert [n.op_type for n in fused.graph.node] == ["AddLayerNormQuantize", "Add"]
    assert fused.graph.node[0].domain == PARLEY_DOMAIN
    rng = np.random.default_rng(1)
    feeds = {name: (rng.standard_normal((64, 1, width)) * 3).astype(np.float32) for name in ("x", "residual")}
    expected, got = (fused_session(m, threads).run(None, feeds) for m in (model, fused))
    assert (expected[0] == 0).any() and (expected[0] == 255).any()
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-6, atol=1e-6)


def test_a_scale_computed_as_the_graph_runs_is_left_as_it_is():
    """Per-row activation scales (no calibration) are computed in the graph: nothing to fuse."""
    model = block_end(8)
    scale = next(i for i in model.graph.initializer if i.name == "scale")
    model.graph.initializer.remove(scale)
    model.graph.input.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, []))
    assert [n.op_type for n in fuse_add_norm_quantize(model).graph.node] == [
        "Add", "LayerNormalization", "QuantizeLinear", "Add"]


def last_block_end(width: int, gather_axis: int = 1) -> onnx.ModelProto:
    """The decoder stack's last block end as the int8 export writes it: x + residual ->
    LayerNormalization -> the Gather of the row's one position -> QuantizeLinear -> the output
    projection (an integer GEMM of `width` inputs)."""
    rng = np.random.default_rng(width)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, width).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.uniform(-0.5, 0.5, width).astype(np.float32), "beta"),
             numpy_helper.from_array(np.array(0.02, np.float32), "scale"),
             numpy_helper.from_array(np.array(128, np.uint8), "zero_point"),
             numpy_helper.from_array(np.array(0, np.int64), "first"),
             numpy_helper.from_array(rng.integers(-63, 64, (width, 24)).astype(np.int8), "weights"),
             numpy_helper.from_array(rng.uniform(0.001, 0.01, 24).astype(np.float32), "weight_scales")]
    nodes = [helper.make_node("Add", ["x", "residual"], ["sum"]),
             helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["normalized"], axis=-1, epsilon=1e-5),
             helper.make_node("Gather", ["normalized", "first"], ["row"], axis=gather_axis),
             helper.make_node("QuantizeLinear", ["row", "scale", "zero_point"], ["quantized"]),
             helper.make_node("MatMulIntegerToFloat", ["quantized", "weights", "scale", "weight_scales", "zero_point"],
                              ["logits"], domain="com.microsoft")]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, 1, width]) for name in ("x", "residual")]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(
        "logits", TensorProto.FLOAT, None)], inits), opset_imports=[helper.make_opsetid("", 18),
                                                                     helper.make_opsetid("com.microsoft", 1)])


def test_the_last_block_end_is_fused_with_its_position_taken_from_the_quantized_values():
    """The Gather of the one position moves after the fused node, onto its int8 output: the same
    logits as ONNX Runtime's nodes, to the bit."""
    model = last_block_end(32)
    fused = fuse_add_norm_quantize(last_block_end(32))
    assert [n.op_type for n in fused.graph.node] == ["AddLayerNormQuantize", "Gather", "MatMulIntegerToFloat"]
    rng = np.random.default_rng(2)
    feeds = {name: (rng.standard_normal((16, 1, 32)) * 3).astype(np.float32) for name in ("x", "residual")}
    expected, got = (fused_session(m).run(None, feeds)[0] for m in (model, fused))
    assert expected.shape == (16, 24)
    np.testing.assert_array_equal(got, expected)


def test_a_gather_that_could_take_the_normalized_axis_keeps_the_block_end_as_it_is():
    """A Gather of axis 2 selects across the norm's own axis: quantizing first would differ."""
    model = last_block_end(32, gather_axis=2)
    assert [n.op_type for n in fuse_add_norm_quantize(model).graph.node] == [
        "Add", "LayerNormalization", "Gather", "QuantizeLinear", "MatMulIntegerToFloat"]


VOCAB, WIDTH, POSITIONS = 50, 24, 12


def embedding_graph(int8_table: bool = True) -> onnx.ModelProto:
    """The int8 decoder step's embeddings as the export writes them: each token's int8 row
    dequantized by its row scale (two Gathers, Cast, Mul; a float table's row: one Gather), times
    sqrt(d), plus its position's row of the sinusoid table, then the first projection's
    QuantizeLinear; the embedded values are also the first block's residual (the Add)."""
    rng = np.random.default_rng(3)
    table = rng.integers(-127, 128, (VOCAB, WIDTH)).astype(np.int8)
    row_scale = rng.uniform(0.005, 0.05, (VOCAB, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(table, "table_s8"), numpy_helper.from_array(row_scale, "table_scale"),
             numpy_helper.from_array(np.array(np.sqrt(WIDTH), np.float32), "embed_scale"),
             numpy_helper.from_array(rng.uniform(-1, 1, (POSITIONS, WIDTH)).astype(np.float32), "position_table"),
             numpy_helper.from_array(np.array(0.03, np.float32), "scale"),  # |x| > 3.8 saturates
             numpy_helper.from_array(np.array(128, np.uint8), "zero_point"),
             numpy_helper.from_array(np.array([1], np.int64), "axis_1")]
    nodes = [helper.make_node("Unsqueeze", ["tokens", "axis_1"], ["token_ids"]),
             helper.make_node("Unsqueeze", ["positions", "axis_1"], ["position_ids"])]
    if int8_table:
        nodes += [helper.make_node("Gather", ["table_s8", "token_ids"], ["rows_s8"], axis=0),
                  helper.make_node("Gather", ["table_scale", "token_ids"], ["rows_scale"], axis=0),
                  helper.make_node("Cast", ["rows_s8"], ["rows_f32"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["rows_f32", "rows_scale"], ["dequantized"])]
    else:
        inits[:2] = [numpy_helper.from_array(table * row_scale, "table")]
        nodes.append(helper.make_node("Gather", ["table", "token_ids"], ["dequantized"], axis=0))
    nodes += [helper.make_node("Mul", ["dequantized", "embed_scale"], ["scaled"]),
             helper.make_node("Gather", ["position_table", "position_ids"], ["sinusoid"], axis=0),
             helper.make_node("Add", ["scaled", "sinusoid"], ["embedded"]),
             helper.make_node("QuantizeLinear", ["embedded", "scale", "zero_point"], ["quantized"]),
             helper.make_node("Add", ["embedded", "embedded"], ["residual"])]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, [None]) for name in ("tokens", "positions")]
    outputs = [helper.make_tensor_value_info("quantized", TensorProto.UINT8, None),
               helper.make_tensor_value_info("residual", TensorProto.FLOAT, None)]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                             opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("int8_table, threads", [(True, 1), (True, 2), (False, 1)])
def test_the_embeddings_fused_into_one_op_compute_what_onnx_runtime_did(int8_table, threads):
    """fuse_embedding: the same embedded values and int8 levels, to the bit, for every token and
    position, the first and last included (two threads share the rows)."""
    model = embedding_graph(int8_table)
    fused = fuse_embedding(embedding_graph(int8_table))
    assert [n.op_type for n in fused.graph.node] == ["TokenEmbedding", "Add"]
    assert (fused.graph.node[0].input[3] == "") != int8_table
    assert fused.graph.node[0].domain == PARLEY_DOMAIN
    tokens = np.concatenate([np.arange(VOCAB), np.random.default_rng(4).integers(0, VOCAB, 30)])
    feeds = {"tokens": tokens, "positions": np.arange(len(tokens)) % POSITIONS}
    expected, got = (fused_session(m, threads).run(None, feeds) for m in (model, fused))
    assert expected[0].shape == (len(tokens), 1, WIDTH)
    assert (expected[0] == 0).any() and (expected[0] == 255).any()
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("tokens, positions, named", [([3, VOCAB], [0, 1], f"row 1 has token {VOCAB} at position 1"),
                                                      ([-1], [0], "row 0 has token -1"),
                                                      ([3], [POSITIONS], f"at position {POSITIONS}")])
def test_a_token_or_position_beyond_the_tables_is_refused(tokens, positions, named):
    session = fused_session(fuse_embedding(embedding_graph()))
    with pytest.raises(Exception, match="TokenEmbedding") as error:
        session.run(None, {"tokens": np.array(tokens), "positions": np.array(positions)})
    assert named in str(error.value)
    assert f"the model has {VOCAB} tokens and {POSITIONS} positions" in str(error.value)


def test_an_int8_table_without_its_row_scales_is_refused():
    fused = fuse_embedding(embedding_graph())
    fused.graph.node[0].input[3] = ""
    with pytest.raises(Exception, match="the table must be int8 with row scales, or float without"):
        fused_session(fused).run(None, {"tokens": np.array([3]), "positions": np.array([0])})


def test_embeddings_quantized_with_per_row_scales_are_left_as_they_are():
    """Without calibration the first projection's scale is computed as the graph runs."""
    model = embedding_graph()
    scale = next(i for i in model.graph.initializer if i.name == "scale")
    model.graph.initializer.remove(scale)
    model.graph.input.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, []))
    assert "TokenEmbedding" not in [n.op_type for n in fuse_embedding(model).graph.node]


@pytest.mark.parametrize("k", [0, 1, 5, 64, 70, 300])
def test_the_fused_top_k_orders_as_onnx_runtime_does_ties_included(k):
    """RowTopK against ONNX Runtime's TopK on rows full of ties (a vocabulary of 200: three
    blocks of 64 and a short one; k beyond it takes every entry)."""
    rows = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 200])
    model = helper.make_model(helper.make_graph(
        [helper.make_node("TopK", ["x", "k"], ["values", "indices"])], "g", [rows],
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("indices", TensorProto.INT64, None)],
        [numpy_helper.from_array(np.array([min(k, 200)], np.int64), "k")]), opset_imports=[helper.make_opsetid("", 18)])
    fused = fuse_top_k(onnx.load_from_string(model.SerializeToString()), vocab_size=200)
    assert [n.op_type for n in fused.graph.node] == ["RowTopK"]
    fused.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array([k], np.int64), "k"))
    x = np.random.default_rng(k).integers(0, 6, (9, 200)).astype(np.float32)  # six values: ties everywhere
    x[3] = 1.0  # one row all equal
    expected, got = (fused_session(m).run(None, {"x": x}) for m in (model, fused))
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])


def attention_session(op_type: str, kernels: str | None = None) -> onnxruntime.InferenceSession:
    """One of the fused attention ops alone; kernels: its attribute ("portable"), or the best."""
    inputs = {"DecoderSelfAttention": ["qkv", "cache_k", "cache_v", "cache_mask"],
              "DecoderCrossAttention": ["q", "cross_k", "cross_v", "src_mask", "slot_row", "row_slot"]}[op_type]
    outputs = ["attention", "new_k", "new_v"] if op_type == "DecoderSelfAttention" else ["attention"]
    types = {"cache_mask": TensorProto.BOOL, "src_mask": TensorProto.BOOL, "slot_row": TensorProto.INT64,
             "row_slot": TensorProto.INT64}
    attributes = {"kernels": kernels} if kernels else {}
    graph = helper.make_graph(
        [helper.make_node(op_type, inputs, outputs, domain=PARLEY_DOMAIN, **attributes)], "g",
        [helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), None) for name in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs])
    return fused_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                                 helper.make_opsetid(PARLEY_DOMAIN, 1)]))


def softmax_attention(query, keys, values, valid):
    """Each row's attention in float64: query (R, H, dk), keys (R, H, dk, n) transposed, values
    (R, H, n, dk), valid (R, n); a row with no valid position gets zeros."""
    scores = np.einsum("rhd,rhdn->rhn", query.astype(np.float64), keys)
    scores = np.where(valid[:, None, :], scores, -np.inf)
    top = np.max(scores, axis=-1, keepdims=True, initial=-np.inf)
    weights = np.exp(scores - np.where(np.isfinite(top), top, 0))
    weights /= np.maximum(weights.sum(axis=-1, keepdims=True), 1e-300)
    return np.einsum("rhn,rhnd->rhd", weights, values)


def widened(array: np.ndarray, axis: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """The array padded along axis to width with random values (False for masks)."""
    shape = list(array.shape)
    shape[axis] = width - array.shape[axis]
    pad = np.zeros(shape, bool) if array.dtype == bool else rng.standard_normal(shape).astype(array.dtype)
    return np.concatenate([array, pad], axis=axis)


KERNELS = [None, "portable"]  # the processor's best (AVX2 with FMA where it has them), the portable C loops


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dk", [12, 40])
def test_cross_attention_is_softmax_attention_whatever_the_batch_width(kernels, dk):
    """Sources of 37, 19, 1 and 0 tokens (blocks of positions, whole and partial; a source with no
    tokens gives zeros) read by 7 rows; padded 16 positions wider with other values, every row's
    result stays the same to the bit."""
    rng = np.random.default_rng(dk)
    heads, lengths = 2, np.array([37, 19, 1, 0])
    row_source = np.array([1, 0, 3, 2, 1, 0, 1])
    slot_row, row_slot = query_grid(row_source, len(lengths))
    valid = np.arange(37) < lengths[:, None]
    keys = rng.standard_normal((4, heads, dk, 37)).astype(np.float32)
    values = rng.standard_normal((4, heads, 37, dk)).astype(np.float32)
    q = rng.standard_normal((7, 1, heads * dk)).astype(np.float32)
    session = attention_session("DecoderCrossAttention", kernels)
    (got,) = session.run(None, {"q": q, "cross_k": keys, "cross_v": values, "src_mask": valid,
                                "slot_row": slot_row, "row_slot": row_slot})
    expected = softmax_attention(q.reshape(7, heads, dk), keys[row_source], values[row_source], valid[row_source])
    np.testing.assert_allclose(got.reshape(7, heads, dk), expected, rtol=1e-5, atol=1e-5)
    (wide,) = session.run(None, {"q": q, "cross_k": widened(keys, 3, 53, rng), "cross_v": widened(values, 2, 53, rng),
                                 "src_mask": widened(valid, 1, 53, rng), "slot_row": slot_row, "row_slot": row_slot})
    np.testing.assert_array_equal(wide, got)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dk", [12, 40])
def test_self_attention_is_softmax_attention_over_the_cache_and_the_new_key(kernels, dk):
    """Rows that filled 0, 5, 16 and 21 of 21 cache slots attend to those and to their own new key
    and value, which the op also returns split into heads; with 19 more free slots, holding other
    values, every row's result stays the same to the bit."""
    rng = np.random.default_rng(dk)
    heads, lengths = 2, np.array([0, 5, 16, 21])
    valid = np.arange(21) < lengths[:, None]
    keys = rng.standard_normal((4, heads, dk, 21)).astype(np.float32)
    values = rng.standard_normal((4, heads, 21, dk)).astype(np.float32)
    qkv = rng.standard_normal((4, 1, 3 * heads * dk)).astype(np.float32)
    query, new_key, new_value = (part.reshape(4, heads, dk) for part in np.split(qkv[:, 0], 3, axis=-1))
    session = attention_session("DecoderSelfAttention", kernels)
    got = session.run(None, {"qkv": qkv, "cache_k": keys, "cache_v": values, "cache_mask": valid})
    expected = softmax_attention(query, np.concatenate([keys, new_key[..., None]], axis=3),
                                 np.concatenate([values, new_value[:, :, None]], axis=2),
                                 np.concatenate([valid, np.ones((4, 1), bool)], axis=1))
    np.testing.assert_allclose(got[0].reshape(4, heads, dk), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[1], new_key[..., None])
    np.testing.assert_array_equal(got[2], new_value[:, :, None])
    wide = session.run(None, {"qkv": qkv, "cache_k": widened(keys, 3, 40, rng), "cache_v": widened(values, 2, 40, rng),
                              "cache_mask": widened(valid, 1, 40, rng)})
    np.testing.assert_array_equal(wide[0], got[0])


def test_the_portable_attention_kernels_are_another_build():
    """A node's `kernels` attribute "portable" runs the portable loops: on a processor with AVX2 and
    FMA their sums round differently (FMA rounds once), which shows in the last bits. Any other
    value is refused."""
    if not {"avx2", "fma"} <= set(open("/proc/cpuinfo").read().split()):
        pytest.skip("this processor runs the portable kernels either way")
    rng = np.random.default_rng(0)
    feeds = {"qkv": rng.standard_normal((16, 1, 3 * 128)).astype(np.float32),
             "cache_k": rng.standard_normal((16, 2, 64, 40)).astype(np.float32),
             "cache_v": rng.standard_normal((16, 2, 40, 64)).astype(np.float32), "cache_mask": np.ones((16, 40), bool)}
    best, portable = (attention_session("DecoderSelfAttention", kernels).run(None, feeds)[0] for kernels in KERNELS)
    np.testing.assert_allclose(portable, best, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(portable, best)
    with pytest.raises(Exception, match='kernels attribute must be "portable" or absent'):
        attention_session("DecoderSelfAttention", "fast")
