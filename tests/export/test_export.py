import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import export.convert
from decoding import DecodingParams, output_budget
from decoding.grid import query_grid
from decoding.padding import pad_batch
from decoding.tokenizer import Tokenizer
from export.calibrate import input_ranges
from export.convert import ExportError, ExportOptions, default_int8_weight_bits, export_package
from export.io import decoder_input_names
from export.optimize import FUSED_ATTENTION_POSITIONS, PARLEY_DOMAIN, fuse_attention
from export.package import ModelPackage, PackageError
from export.quantize import weight_key
from export.verify import max_logprob_difference
from model.checkpoint import load_model, save_model
from model.generate import generate, translate_tokens
from model.data import read_lines, split_path
from server.engine.backend import OnnxStepBackend
from server.engine.engine import Engine
from server.engine.session import fused_ops_library, open_sessions
from tests.conftest import DATA_DIR, TINY_VOCAB, tiny_model

INTEGER_GEMMS = ("MatMulIntegerToFloat", "Int8MatMul")  # ONNX Runtime's; Parley's, for 7-bit weights


@pytest.fixture(scope="module")
def calibrated_package(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny model with int8 activation scales calibrated on training sentences."""
    out = tmp_path_factory.mktemp("packages") / "calibrated"
    options = ExportOptions(precisions=("fp32", "int8"), min_bleu_vs_pytorch=0.0, sample_size=16,
                            calibration=read_lines(split_path(DATA_DIR, "train", "en"))[:64])
    export_package(tiny_checkpoint, out, options, log=lambda message: None)
    return out


def test_package_has_every_precision_with_checksums_and_parity(tiny_package):
    package = ModelPackage.load(tiny_package)
    assert package.name == "tiny"
    assert sorted(package.precisions) == ["fp16", "fp32", "int8"]
    package.verify_files()
    fp32, int8 = package.variant("fp32"), package.variant("int8")
    assert fp32.parity["max_abs_logprob_diff"] <= 1e-4
    assert fp32.parity["exact_match_rate"] == 1.0
    assert int8.settings["activation_scales"] == "per row"
    assert package.variant("fp16").parity["provider"] == "CPUExecutionProvider"
    graph = onnx.load(str(package.graph_path("int8", "decoder_step"))).graph
    weights = {init.name for init in graph.initializer}
    ops = {n.op_type for n in graph.node}
    assert "QuantizeLinear" in ops and ops & set(INTEGER_GEMMS)
    assert "DynamicQuantizeLinear" not in {n.op_type for n in graph.node}  # per-tensor scales would break batching
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]


@pytest.mark.parametrize("saturates,bits", [(False, 8), (True, 7)])
def test_int8_weights_are_8_bit_only_where_the_cpus_gemms_cannot_saturate(monkeypatch, saturates, bits):
    monkeypatch.setattr(export.convert, "int8_gemm_can_saturate", lambda: saturates)
    assert ExportOptions().int8_weight_bits == bits


@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-4), ("int8", 0.5), ("fp16", 0.05)])
def test_decoder_step_graph_reproduces_full_sequence_logits(tiny_checkpoint, tiny_package, precision, tolerance):
    model = load_model(tiny_checkpoint)
    sessions = open_sessions(ModelPackage.load(tiny_package), precision)
    sources = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20]]
    # 20 steps: past the first cache block, so growing the cache is covered too.
    assert max_logprob_difference(model, sessions, sources, steps=20) <= tolerance


def run_alone_and_batched(sessions, sources, steps):
    """Log-probs of each source decoded alone and in one padded batch, same forced tokens."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(4, 100, size=(len(sources), steps))
    tokens[:, 0] = 2
    batched = OnnxStepBackend(sessions, pad_batch([s + [3] for s in sources], 0))
    together = [batched.step_log_probs(tokens[:, t]) for t in range(steps)]
    for i, source in enumerate(sources):
        alone = OnnxStepBackend(sessions, pad_batch([source + [3]], 0))
        for t in range(steps):
            yield alone.step_log_probs(tokens[i : i + 1, t])[0], together[t][i]


@pytest.mark.parametrize("precision", ["fp32", "int8", "int8-static"])
@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch_and_padding_do_not_change_a_row(tiny_package, calibrated_package, precision, batch):
    package = calibrated_package if precision == "int8-static" else tiny_package
    sessions = open_sessions(ModelPackage.load(package), precision.removesuffix("-static"))
    rng = np.random.default_rng(batch)
    sources = [list(rng.integers(4, 100, size=rng.integers(1, 15))) for _ in range(batch)]
    for alone, together in run_alone_and_batched(sessions, sources, steps=5):
        if precision != "fp32":  # per-row or static activation scales: integer matmuls are exact per row
            assert np.array_equal(alone.argmax(), together.argmax())
        np.testing.assert_allclose(alone, together, atol=2e-5 if precision == "fp32" else 1e-4)


def test_rows_at_different_positions_share_one_step(tiny_package):
    """A source joining a running batch (continuous batching): rows of different ages, one decoder run."""
    sessions = open_sessions(ModelPackage.load(tiny_package), "fp32")
    old_source, young_source = [5, 6, 7, 3], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 3]
    shared, old, young = (OnnxStepBackend(sessions) for _ in range(3))
    shared.extend(pad_batch([old_source], 0))
    old.extend(pad_batch([old_source], 0))
    young.extend(pad_batch([young_source], 0))
    for token in (2, 20, 21, 22, 23):
        np.testing.assert_allclose(shared.step_log_probs(np.array([token]))[0],
                                   old.step_log_probs(np.array([token]))[0], atol=2e-5)
    shared.extend(pad_batch([young_source], 0))  # wider source, position 0, next to a row at position 5
    for old_token, young_token in ((24, 2), (25, 30), (26, 31)):
        both = shared.step_log_probs(np.array([old_token, young_token]))
        np.testing.assert_allclose(both[0], old.step_log_probs(np.array([old_token]))[0], atol=2e-5)
        np.testing.assert_allclose(both[1], young.step_log_probs(np.array([young_token]))[0], atol=2e-5)
    assert list(shared.lengths[shared.live]) == [8, 3]


def test_finished_rows_leave_and_reordered_beams_follow_their_cache(tiny_package):
    sessions = open_sessions(ModelPackage.load(tiny_package), "fp32")
    sources = [[5, 6, 3], [7, 8, 9, 3], [10, 3], [11, 12, 13, 14, 3]]
    batch = OnnxStepBackend(sessions, pad_batch(sources, 0))
    alone = [OnnxStepBackend(sessions, pad_batch([s], 0)) for s in sources]
    row_sources = [0, 1, 2, 3]
    # identity, a removal (the last row moves into the hole), a reorder (no row moves)
    for step, keep in enumerate(([0, 1, 2, 3], [0, 2, 3], [2, 0])):
        tokens = np.array([2 if step == 0 else 20 + step] * len(row_sources))
        out = batch.step_log_probs(tokens)
        for i, source in enumerate(row_sources):
            np.testing.assert_allclose(out[i], alone[source].step_log_probs(tokens[i : i + 1])[0], atol=2e-5)
        batch.select(np.array(keep))
        row_sources = [row_sources[k] for k in keep]
    assert row_sources == [3, 0]
    batch.select(np.array([1, 1, 0]))  # duplicated rows (beam search) decode identically
    out = batch.step_log_probs(np.array([40, 40, 41]))
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_allclose(out[0], alone[0].step_log_probs(np.array([40]))[0], atol=2e-5)
    np.testing.assert_allclose(out[2], alone[3].step_log_probs(np.array([41]))[0], atol=2e-5)


def test_finished_sources_leave_their_rows_and_entries_to_the_last_ones(tiny_package):
    sessions = open_sessions(ModelPackage.load(tiny_package), "fp32")
    sources = [[5, 6, 3], [7, 8, 9, 3], [10, 3], [11, 12, 3], [13, 14, 15, 16, 3]]
    batch = OnnxStepBackend(sessions, pad_batch(sources[:4], 0))
    alone = [OnnxStepBackend(sessions, pad_batch([s], 0)) for s in sources]
    for token in (2, 20):
        batch.step_log_probs(np.full(4, token))
        for i in (0, 2, 3):
            alone[i].step_log_probs(np.array([token]))
    batch.select(np.array([0, 2, 3]))  # source 1 finished: the last row and entry move into its places
    assert batch.used == 3 and list(batch.live) == [0, 2, 1]
    assert batch.sources == 3 and list(batch.row_source[:3]) == [0, 1, 2]
    batch.extend(pad_batch([sources[4]], 0))
    assert batch.used == 4 and list(batch.live) == [0, 2, 1, 3] and batch.sources == 4
    for step, token in enumerate((21, 22)):
        out = batch.step_log_probs(np.array([token, token, token, 2 if step == 0 else 30]))
        for row, i in enumerate((0, 2, 3)):
            np.testing.assert_allclose(out[row], alone[i].step_log_probs(np.array([token]))[0], atol=2e-5)
        np.testing.assert_allclose(out[3], alone[4].step_log_probs(np.array([2 if step == 0 else 30]))[0], atol=2e-5)


def test_the_source_width_shrinks_when_the_longest_source_leaves(tiny_package):
    sessions = open_sessions(ModelPackage.load(tiny_package), "fp32")
    short, long = [5, 6, 3], list(range(10, 40)) + [3]
    batch = OnnxStepBackend(sessions, pad_batch([long, short], 0))
    alone = OnnxStepBackend(sessions, pad_batch([short], 0))
    np.testing.assert_allclose(batch.step_log_probs(np.array([2, 2]))[1], alone.step_log_probs(np.array([2]))[0],
                               atol=2e-5)
    assert batch.src_mask.shape[1] == 32
    batch.select(np.array([1]))  # the long source finished
    assert batch.sources == 1 and batch.src_mask.shape[1] == 8
    assert all(c.shape[axis] == 8 for c, axis in zip(batch.buffers.cross, batch.buffers.layout.axes))
    np.testing.assert_allclose(batch.step_log_probs(np.array([20]))[0], alone.step_log_probs(np.array([20]))[0],
                               atol=2e-5)


def test_a_beam_step_copies_only_the_rows_that_must_move(tiny_package):
    sessions = open_sessions(ModelPackage.load(tiny_package), "fp32")
    batch = OnnxStepBackend(sessions, pad_batch([[5, 6, 3], [7, 8, 9, 3], [10, 3]], 0))
    batch.step_log_probs(np.array([2, 2, 2]))
    moves = []
    move_rows = batch.buffers.move_rows
    batch.buffers.move_rows = lambda rows, targets, used: moves.append((list(rows), list(targets))) or \
        move_rows(rows, targets, used)
    cache = [c[:3].copy() for c in batch.buffers.cache]
    batch.select(np.array([2, 0, 1]))  # a reorder
    assert moves == [] and list(batch.live) == [2, 0, 1]
    assert all(np.array_equal(a, b[:3]) for a, b in zip(cache, batch.buffers.cache))
    batch.select(np.array([1, 1, 0]))  # buffer row 0 kept twice, row 1 not kept: one copy, 0 -> 1
    assert moves == [([0], [1])] and list(batch.live) == [0, 1, 2] and batch.used == 3
    for buffer in batch.buffers.cache:
        np.testing.assert_array_equal(buffer[1], buffer[0])
    batch.select(np.array([2]))  # rows leave: the one kept moves down to buffer row 0
    assert moves[1] == ([2], [0]) and list(batch.live) == [0] and batch.used == 1


@pytest.fixture
def package_copy(tiny_package, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(tiny_package, target)
    return target


@pytest.mark.parametrize("graph", ["encoder", "decoder_step"])
def test_int8_quantizes_each_activation_in_one_pass_with_shared_zero_points(tiny_package, graph):
    """Blocked QuantizeLinear divides by the row scale itself (no Div pass); the (rows..., 1)
    zero points it needs are made once per leading shape, not once per matmul."""
    package = ModelPackage.load(tiny_package)
    model = onnx.load(str(package.graph_path("int8", graph)))
    nodes = model.graph.node
    quantizers = [n for n in nodes if n.op_type == "QuantizeLinear"]
    assert len(quantizers) == sum(n.op_type in INTEGER_GEMMS for n in nodes) > 0
    seven_bits = package.variant("int8").settings["int8_weight_bits"] == 7
    assert {n.op_type for n in nodes if n.op_type in INTEGER_GEMMS} == {"Int8MatMul" if seven_bits else
                                                                         "MatMulIntegerToFloat"}
    assert all({a.name for a in q.attribute} == {"axis", "block_size"} for q in quantizers)
    producer = {output: n.op_type for n in nodes for output in n.output}
    assert not [q.name for q in quantizers if producer.get(q.input[0]) == "Div"]
    # per graph: (rows, 1) and (rows, 1, 1), of 128s, and of 0s for the ReLUs' outputs
    assert 1 <= len({q.input[2] for q in quantizers}) <= 4
    assert not {"Relu", "DynamicQuantizeLinear"} & {n.op_type for n in nodes}
    matrices = {init.name for init in model.graph.initializer if len(init.dims) == 2}
    assert not [n.name for n in nodes if n.op_type in ("MatMul", "Gemm") and set(n.input) & matrices]  # all int8


def test_per_row_int8_quantizes_relu_outputs_from_zero_over_255_levels(tiny_package, tmp_path):
    """Each row of a ReLU's input h: scale max(h_row) / 255, zero point 0, so that the quantizer
    clamps negatives to 0 as the ReLU did and the positives get every level."""
    model = onnx.load(str(ModelPackage.load(tiny_package).graph_path("int8", "encoder")))
    producer = {output: n for n in model.graph.node for output in n.output}
    from_zero = [n for n in model.graph.node if n.op_type == "QuantizeLinear"
                 and producer[n.input[2]].input[0] == "q8_zero_point_row_0"]
    assert len(from_zero) == ModelPackage.load(tiny_package).architecture["encoder_layers"]
    quantizer = from_zero[0]
    h, scale, x_u8 = quantizer.input[0], quantizer.input[1], quantizer.output[0]
    assert producer[h].op_type == "Add"  # the first projection's bias: no Relu between
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in (h, scale, x_u8))
    path = tmp_path / "encoder.onnx"
    onnx.save(model, str(path))
    options = onnxruntime.SessionOptions()
    options.register_custom_ops_library(fused_ops_library())  # its GEMMs: Int8MatMul
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    src = pad_batch([[5, 6, 7, 8, 2], [9, 10, 2]], pad_id=0)
    h_values, scales, quantized = session.run([h, scale, x_u8], {"src_tokens": src})
    assert (h_values < 0).any() and (h_values > 0).any()
    assert np.allclose(scales, h_values.max(axis=-1, keepdims=True) / 255, rtol=1e-6)
    expected = np.clip(np.rint(np.maximum(h_values, 0) / scales), 0, 255)
    assert np.abs(quantized.astype(np.int64) - expected).max() <= 1  # rounding of x / s vs x * (1 / s)
    assert quantized.max() == 255


def test_calibration_records_each_projections_largest_input(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    source = [5, 6, 7, 8]
    ranges = input_ranges(model, [source])
    projections = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(ranges) == len(projections) + 1  # and the tied output projection
    first_layer = model.encoder_layers[0].self_attn.q_proj
    with torch.no_grad():
        embedded = model.embed(torch.tensor([source + [model.config.eos_id]]), torch.arange(len(source) + 1)[None])
    assert ranges[weight_key(first_layer.weight[0].detach().numpy())] == pytest.approx(float(embedded.abs().max()))
    assert all(value > 0 for value in ranges.values())


@pytest.mark.parametrize("graph", ["encoder", "decoder_step"])
def test_calibrated_int8_quantizes_with_fixed_scales_and_adds_biases_in_the_gemm(calibrated_package, graph):
    package = ModelPackage.load(calibrated_package)
    tokens = Tokenizer(calibrated_package / "spm.model").encode(read_lines(split_path(DATA_DIR, "train", "en"))[:64])
    fitting = sum(len(ids) < 64 for ids in tokens)  # room for EOS in the tiny model's 64 positions
    assert 0 < fitting < 64  # the test covers sentences left out
    assert package.variant("int8").settings == {"int8_weight_bits": default_int8_weight_bits(),
                                                "activation_scales": "static", "calibration_sentences": fitting}
    fp32 = onnx.load(str(package.graph_path("fp32", graph))).graph
    int8 = onnx.load(str(package.graph_path("int8", graph))).graph
    scalars = {init.name for init in int8.initializer if not init.dims}
    quantizers = [n for n in int8.node if n.op_type == "QuantizeLinear"]
    assert quantizers and all(q.input[1] in scalars for q in quantizers)
    assert "Abs" not in {n.op_type for n in int8.node}  # no per-row scale computed
    # Every Add of a constant vector (biases; the decoder's never-generate mask on the logits,
    # which the exporter writes behind a float-to-float Cast) is inside a GEMM now.
    vectors = {init.name for init in int8.initializer if len(init.dims) == 1}
    assert not [n.name for n in int8.node if n.op_type == "Add" and set(n.input) & vectors]
    gemms = [n for n in int8.node if n.op_type in INTEGER_GEMMS]
    assert gemms and all(len(n.input) == 7 and n.input[6] in vectors for n in gemms)  # every projection has one


@pytest.mark.parametrize("graph,layers", [("encoder", "encoder_layers"), ("decoder_step", "decoder_layers")])
def test_calibrated_int8_quantizes_relu_outputs_over_all_levels_without_the_relu(tiny_checkpoint, calibrated_package,
                                                                                  graph, layers):
    """A ReLU's output is >= 0: its projection's quantizer reads the ReLU's input with zero point
    0 and scale max / 255 (QuantizeLinear's clamp at 0 is the ReLU), not zero point 128 and
    max / 127, which left half the levels unused."""
    package, model = ModelPackage.load(calibrated_package), load_model(tiny_checkpoint)
    feed_forwards = [layer.feed_forward for layer in getattr(model, layers)]
    int8 = onnx.load(str(package.graph_path("int8", graph))).graph
    assert sum(n.op_type == "Relu" for n in onnx.load(str(package.graph_path("fp32", graph))).graph.node) == \
        len(feed_forwards)
    assert "Relu" not in {n.op_type for n in int8.node}
    values = {init.name: onnx.numpy_helper.to_array(init) for init in int8.initializer}
    nonnegative = [n for n in int8.node if n.op_type == "QuantizeLinear" and values[n.input[2]] == 0]
    readers = {n.input[0]: n for n in int8.node if n.op_type in INTEGER_GEMMS}
    assert len(nonnegative) == len(feed_forwards)
    assert all(values[readers[q.output[0]].input[4]] == 0 for q in nonnegative)  # the GEMM's zero point too
    assert all(values[n.input[2]] == 128 for n in int8.node if n.op_type == "QuantizeLinear" and n not in nonnegative)
    tokenizer = Tokenizer(calibrated_package / "spm.model")
    sources = [ids for ids in tokenizer.encode(read_lines(split_path(DATA_DIR, "train", "en"))[:64])
               if len(ids) < model.config.max_positions]
    ranges = input_ranges(model, sources)
    expected = [ranges[weight_key(f.linear2.weight[0].detach().numpy())] / 255 for f in feed_forwards]
    assert sorted(float(values[q.input[1]]) for q in nonnegative) == pytest.approx(sorted(expected), rel=1e-6)


def test_calibrated_int8_translates_like_pytorch_on_text_like_its_calibration(tiny_checkpoint, calibrated_package):
    """Held-out sentences of the calibration corpus. (Random token prefixes, as the logits check
    feeds, can leave the calibrated ranges and saturate: that check is for per-row scales.)"""
    model = load_model(tiny_checkpoint)
    engine = Engine(ModelPackage.load(calibrated_package), "int8", "cpu")
    sources = [ids for ids in engine.tokenizer.encode(read_lines(split_path(DATA_DIR, "train", "en"))[64:128])
               if len(ids) < model.config.max_positions]
    expected = translate_tokens(model, sources)
    params = [DecodingParams(max_length=output_budget(len(s), model.config.max_positions - 1)) for s in sources]
    got = [hyps[0].tokens for hyps in engine.decode(sources, params)]
    assert len(sources) > 50
    assert np.mean([tuple(g) == tuple(e) for g, e in zip(got, expected)]) >= 0.9


@pytest.mark.parametrize("top_k", [1, 2, 3, 9])
def test_int8_top_k_picks_what_a_full_sort_picks(tiny_package, top_k):
    """The int8 decoder's TopK is Parley's RowTopK (optimize.fuse_top_k), over block maxima
    first: its tokens and values are those of a stable sort of its own log-probs. (The tiny
    vocabulary has 3 blocks: k of 1 and 2 choose among them, 3 and 9 take them all.)"""
    session = open_sessions(ModelPackage.load(tiny_package), "int8").decoder
    graph = onnx.load(str(ModelPackage.load(tiny_package).graph_path("int8", "decoder_step"))).graph
    assert "RowTopK" in {n.op_type for n in graph.node} and "TopK" not in {n.op_type for n in graph.node}
    rng = np.random.default_rng(top_k)
    rows, capacity, sources, width = 6, 3, 6, 4
    feeds = {"tokens": rng.integers(4, 100, rows), "positions": np.full(rows, capacity), "top_k": np.array(top_k),
             "cache_mask": np.ones((rows, capacity), bool), "src_mask": np.ones((sources, width), bool),
             "slot_row": np.arange(rows), "row_slot": np.arange(rows)}
    for value in session.get_inputs():
        if value.name.startswith(("cache_k", "cache_v", "cross_")):
            count, length = (rows, capacity) if value.name.startswith("cache") else (sources, width)
            shape = [count] + [d if isinstance(d, int) else length for d in value.shape[1:]]
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    log_probs, values, tokens = session.run(["log_probs", "top_log_probs", "top_tokens"], feeds)
    expected = np.argsort(-log_probs, axis=1, kind="stable")[:, :top_k]
    np.testing.assert_array_equal(tokens, expected)
    np.testing.assert_array_equal(values, np.take_along_axis(log_probs, expected, axis=1))


def test_int8_attention_runs_as_one_fused_op_per_attention(tiny_package):
    graph = onnx.load(str(ModelPackage.load(tiny_package).graph_path("int8", "decoder_step"))).graph
    layers = ModelPackage.load(tiny_package).architecture["decoder_layers"]
    fused = [n.op_type for n in graph.node if n.domain == PARLEY_DOMAIN and n.op_type not in ("RowTopK", "Int8MatMul")]
    assert sorted(fused) == ["DecoderCrossAttention"] * layers + ["DecoderSelfAttention"] * layers
    producers = {name: n.op_type for n in graph.node for name in n.output}
    assert {producers[f"new_{kv}_{layer}"] for kv in "kv" for layer in range(layers)} == {"DecoderSelfAttention"}
    assert not [n.name for n in graph.node if n.op_type in ("MatMul", "Split") or "slot_row" in n.input[1:2]]
    model = onnx.load(str(ModelPackage.load(tiny_package).graph_path("int8", "decoder_step")))
    assert [o.domain for o in model.opset_import].count(PARLEY_DOMAIN) == 1  # each fusion imports it, once


def test_calibrated_int8_embeds_and_ends_its_blocks_in_fused_ops(calibrated_package):
    """With calibrated scales the embeddings and the first projection's QuantizeLinear are one
    TokenEmbedding, and each block's residual add, LayerNormalization and the next projection's
    QuantizeLinear one AddLayerNormQuantize, the last one's squeeze of its position moved onto
    the quantized values (per-row scales, the test above: none of them)."""
    package = ModelPackage.load(calibrated_package)
    nodes = onnx.load(str(package.graph_path("int8", "decoder_step"))).graph.node
    blocks = 3 * package.architecture["decoder_layers"]
    assert nodes[0].op_type == "TokenEmbedding" and list(nodes[0].input[:2]) == ["tokens", "positions"]
    assert not {"Cast", "Unsqueeze", "LayerNormalization"} & {n.op_type for n in nodes}
    assert sum(n.op_type == "AddLayerNormQuantize" for n in nodes) == blocks


def fused_attention_feed(session: onnxruntime.InferenceSession, seed: int) -> dict[str, np.ndarray]:
    """A decoder-step feed as a running batch makes one: 7 rows of 3 sources with 1, 2 and 4 rows
    (mixed beam sizes), in no particular order, on the query grid; rows that have filled none,
    some or all of the cache's 4 slots; sources of 5, 2 and 4 tokens, padded to 5."""
    rng = np.random.default_rng(seed)
    row_source = np.array([2, 0, 1, 2, 2, 1, 2])
    lengths = np.array([0, 1, 4, 3, 2, 0, 4])
    slot_row, row_slot = query_grid(row_source, 3)
    feeds = {"tokens": rng.integers(4, 100, 7), "positions": lengths, "top_k": np.array(3),
             "cache_mask": np.arange(4) < lengths[:, None], "src_mask": np.arange(5) < np.array([[5], [2], [4]]),
             "slot_row": slot_row, "row_slot": row_slot}
    for value in session.get_inputs():
        if value.name.startswith(("cache_k", "cache_v", "cross_")):
            count, length = (7, 4) if value.name.startswith("cache") else (3, 5)
            shape = [count] + [d if isinstance(d, int) else length for d in value.shape[1:]]
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_attention_computes_what_the_graph_did(tiny_package, tmp_path, threads):
    """optimize.fuse_attention on the fp32 decoder step (the same attention as int8's, without
    its quantization): every output as before, on a batch of mixed beams and lengths; with two
    threads the rows are shared among them."""
    path = ModelPackage.load(tiny_package).graph_path("fp32", "decoder_step")
    onnx.save(fuse_attention(onnx.load(str(path)), max_positions=64), str(tmp_path / "fused.onnx"))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(fused_ops_library())
    graph, fused = (onnxruntime.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                    for p in (path, tmp_path / "fused.onnx"))
    assert any(n.domain == PARLEY_DOMAIN for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node)
    names = [o.name for o in graph.get_outputs()]
    for seed in range(3):
        feeds = fused_attention_feed(graph, seed)
        for name, expected, got in zip(names, graph.run(names, feeds), fused.run(names, feeds)):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=name)


def test_a_model_of_more_positions_than_the_fused_attention_takes_keeps_its_own(tiny_package):
    path = ModelPackage.load(tiny_package).graph_path("fp32", "decoder_step")
    model = fuse_attention(onnx.load(str(path)), max_positions=FUSED_ATTENTION_POSITIONS + 1)
    assert not [n.op_type for n in model.graph.node if n.domain == PARLEY_DOMAIN]


def test_fused_attention_refuses_a_feed_whose_shapes_disagree(tiny_package):
    session = open_sessions(ModelPackage.load(tiny_package), "int8").decoder
    feeds = fused_attention_feed(session, 0)
    feeds["cache_mask"] = feeds["cache_mask"][:, :3]
    with pytest.raises(Exception, match=r"DecoderSelfAttention: shapes disagree .*cache_mask \(R,C\)"):
        session.run(None, feeds)


def test_merged_projections_add_their_biases_once_and_unit_axis_transposes_are_reshapes(tiny_package):
    package = ModelPackage.load(tiny_package)
    for graph in ("encoder", "decoder_step"):
        model = onnx.load(str(package.graph_path("fp32", graph)))
        constants = {init.name for init in model.graph.initializer}
        producer = {output: n.op_type for n in model.graph.node for output in n.output}
        splits = [n for n in model.graph.node if n.op_type == "Split"]
        assert splits and all(producer[n.input[0]] == "Add" for n in splits)  # biases added before the split
        assert not [n.name for n in model.graph.node if n.op_type == "Add" and
                    any(producer.get(i) == "Split" for i in n.input) and any(i in constants for i in n.input)]
    decoder = onnx.load(str(package.graph_path("fp32", "decoder_step"))).graph
    # One position per row: only the cross-attention grid's two transposes per layer move data.
    assert sum(n.op_type == "Transpose" for n in decoder.node) == 2 * package.architecture["decoder_layers"]


def test_attention_products_run_as_plain_matmuls_with_the_scale_in_the_query_weights(tiny_package, tmp_path):
    """A factor on a score product becomes FusedMatMul's alpha in ONNX Runtime, which takes a
    one-query row off MLAS's matrix-vector path; the queries' 1/sqrt(d_k) is in their weights.
    (int8's attention is one fused op: test_int8_attention_runs_as_one_fused_op_per_attention.)"""
    package = ModelPackage.load(tiny_package)
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(str(package.graph_path("fp32", "decoder_step")), options,
                                 providers=["CPUExecutionProvider"])
    nodes = onnx.load(options.optimized_model_filepath).graph.node
    products = [n for n in nodes if n.op_type in ("MatMul", "FusedMatMul")]
    assert len(products) >= 4 * package.architecture["decoder_layers"]  # two products per attention
    assert not [n.name for n in products for a in n.attribute if a.name == "alpha" and a.f != 1.0]


@pytest.mark.parametrize("precision", ["fp32", "int8", "fp16"])
def test_reshapes_take_constant_shapes(tiny_package, precision):
    """The tracer's Shape -> Gather -> Concat chains for views are folded at export: only the
    decoder's query-grid views, whose (sources, cells) split is not a function of their
    input's shape, still compute theirs (int8's are inside its fused cross-attention)."""
    package = ModelPackage.load(tiny_package)

    def computed_reshapes(graph: str) -> int:
        model = onnx.load(str(package.graph_path(precision, graph)))
        constants = {init.name for init in model.graph.initializer}
        return sum(n.op_type == "Reshape" and n.input[1] not in constants for n in model.graph.node)

    assert computed_reshapes("encoder") == 0
    assert computed_reshapes("decoder_step") == (0 if precision == "int8" else package.architecture["decoder_layers"])


def test_corrupted_variant_file_is_refused(package_copy):
    path = package_copy / "int8" / "decoder_step.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    package = ModelPackage.load(package_copy)
    package.verify_files("fp32")  # other variants are untouched
    with pytest.raises(PackageError, match=r"int8/decoder_step.onnx does not match its sha256.*Re-export"):
        open_sessions(package, "int8")


def test_missing_file_and_wrong_checksum_are_named_together(package_copy):
    (package_copy / "fp32" / "encoder.onnx").unlink()
    manifest = json.loads((package_copy / "manifest.json").read_text())
    manifest["variants"]["fp32"]["files"]["decoder_step"]["sha256"] = "0" * 64
    (package_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError) as error:
        ModelPackage.load(package_copy).verify_files("fp32")
    assert "fp32/encoder.onnx is missing" in str(error.value)
    assert "fp32/decoder_step.onnx does not match its sha256" in str(error.value)


@pytest.mark.parametrize("earlier", [1, 2, 3])
def test_packages_of_earlier_formats_still_load(package_copy, earlier):
    """1: before the fused ops, 2: before TokenEmbedding, 3: before Int8MatMul; this server runs
    what they hold."""
    manifest = json.loads((package_copy / "manifest.json").read_text())
    assert manifest["format_version"] == 4
    manifest["format_version"] = earlier
    (package_copy / "manifest.json").write_text(json.dumps(manifest))
    assert ModelPackage.load(package_copy).name == manifest["name"]


def test_malformed_manifest_lists_every_problem(package_copy):
    manifest = json.loads((package_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    del manifest["special_tokens"]["eos"]
    manifest["variants"]["int4"] = {}
    manifest["variants"]["fp32"]["files"]["encoder"]["path"] = "../../elsewhere.onnx"
    manifest["tokenizer"]["path"] = "/etc/spm.model"
    manifest["name"] = "wmt/en-de"
    (package_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError) as error:
        ModelPackage.load(package_copy)
    message = str(error.value)
    assert "format_version 99 is not supported (this Parley reads 1, 2, 3, 4); upgrade Parley" in message
    assert "special_tokens.eos" in message and "unknown precision 'int4'" in message
    assert "variants.fp32.files.encoder.path '../../elsewhere.onnx' leaves the package" in message
    assert "tokenizer.path '/etc/spm.model' leaves the package" in message
    assert "model name 'wmt/en-de' must be 1 to 64 letters, digits, '.', '_' or '-'" in message
    (package_copy / "manifest.json").write_text("{not json")
    with pytest.raises(PackageError, match="not valid JSON"):
        ModelPackage.load(package_copy)
    (package_copy / "manifest.json").unlink()
    with pytest.raises(PackageError, match="manifest.json is missing"):
        ModelPackage.load(package_copy)


def export_cli(*args):
    return subprocess.run([sys.executable, "-m", "export", *map(str, args)], capture_output=True, text=True)


def test_other_architectures_export_and_decode_like_pytorch(tiny_checkpoint, tmp_path):
    """Pre-LN blocks, GELU, four heads and unequal layer counts: what users may train."""
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    shutil.copy(tiny_checkpoint / "spm.model", checkpoint / "spm.model")
    save_model(tiny_model(seed=5, vocab_size=TINY_VOCAB, pre_norm=True, activation="gelu", num_heads=4, d_model=32,
                          d_ff=64, encoder_layers=3, decoder_layers=1), checkpoint)
    options = ExportOptions(precisions=("fp32", "int8"), min_bleu_vs_pytorch=0.0, sample_size=16)
    export_package(checkpoint, tmp_path / "pkg", options, log=lambda message: None)
    package = ModelPackage.load(tmp_path / "pkg")
    assert package.manifest["variants"]["fp32"]["parity"]["exact_match_rate"] == 1.0
    assert package.manifest["variants"]["fp32"]["parity"]["max_abs_logprob_diff"] < 1e-4
    texts = read_lines(split_path(DATA_DIR, "val", "en"))[:8]
    sources = [ids[:40] for ids in Tokenizer(checkpoint / "spm.model").encode(texts)]  # within 64 positions
    params = [DecodingParams(beam_size=3, max_length=20)] * len(sources)
    expected = generate(load_model(checkpoint), sources, params)
    decoded = Engine(package, precision="fp32", device="cpu").decode(sources, params)
    assert [h[0].tokens for h in decoded] == [h[0].tokens for h in expected]


def test_cli_failure_messages(tiny_checkpoint, tmp_path):
    result = export_cli(tmp_path / "nowhere", tmp_path / "out")
    assert result.returncode != 0 and "missing config.json, model.safetensors" in result.stderr

    result = export_cli(tiny_checkpoint, tmp_path / "out", "--precision", "fp32,int4")
    assert result.returncode != 0 and "unknown precision int4" in result.stderr

    result = export_cli(tiny_checkpoint, tmp_path / "out", "--calibration", tmp_path / "missing.en")
    assert result.returncode != 0 and f"calibration file {tmp_path / 'missing.en'} does not exist" in result.stderr
    (tmp_path / "blank.en").write_text("\n  \n")
    result = export_cli(tiny_checkpoint, tmp_path / "out", "--calibration", tmp_path / "blank.en")
    assert result.returncode != 0 and "the calibration file has no sentences" in result.stderr
    (tmp_path / "empty.en").write_text("")
    result = export_cli(tiny_checkpoint, tmp_path / "out", "--calibration", tmp_path / "empty.en")
    assert result.returncode != 0 and "the calibration file has no sentences" in result.stderr
    result = export_cli(tiny_checkpoint, tmp_path / "out", "--sample", tmp_path / "empty.en")
    assert result.returncode != 0 and "the sample file has no sentences" in result.stderr
    result = export_cli(tiny_checkpoint, tmp_path / "out", "--sample-size", "0")
    assert result.returncode != 0 and "the sample size must be at least 1, got 0" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_contradictory_options_before_exporting(tiny_checkpoint, tmp_path):
    (tmp_path / "sample.en").write_text("A dog.\nA cat.\nA bird.\n")
    (tmp_path / "references.de").write_text("Ein Hund.\nEine Katze.\n")
    result = export_cli(tiny_checkpoint, tmp_path / "out", "--sample", tmp_path / "sample.en",
                        "--sample-references", tmp_path / "references.de")
    assert result.returncode != 0
    assert "the sample has 3 lines and its references 2: line i of the references must translate" in result.stderr

    result = export_cli(tiny_checkpoint, tmp_path / "out", "--sample-references", tmp_path / "references.de")
    assert result.returncode != 0 and "references were given without a sample" in result.stderr

    result = export_cli(tiny_checkpoint, tmp_path / "out", "--name", "en de")
    assert result.returncode != 0 and "model name 'en de' must be 1 to 64 letters, digits" in result.stderr

    result = export_cli(tiny_checkpoint, tmp_path / "out", "--precision", "fp32",
                        "--calibration", tmp_path / "sample.en")
    assert result.returncode != 0 and "int8 is not among the precisions exported (fp32)" in result.stderr

    result = export_cli(tiny_checkpoint, tmp_path / "out", "--calibration", tmp_path / "sample.en",
                        "--calibration-size", "0", "--min-bleu-vs-pytorch", "150")
    assert result.returncode != 0
    assert "the calibration size must be at least 1, got 0; the minimum BLEU against PyTorch must be between 0 " \
           "and 100, got 150" in result.stderr
    assert "exporting" not in result.stdout  # refused before any work
    assert not (tmp_path / "out").exists()

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"truncated")
    result = export_cli(broken, tmp_path / "out")
    assert result.returncode != 0 and "cannot load the checkpoint" in result.stderr
    assert not (tmp_path / "out").exists()

    (tmp_path / "exists").mkdir()
    result = export_cli(tiny_checkpoint, tmp_path / "exists")
    assert result.returncode != 0 and "--force" in result.stderr


def test_cli_refuses_a_tokenizer_that_does_not_fit(tiny_checkpoint, tmp_path):
    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_checkpoint, mismatched)
    shutil.copyfile("model/default/spm.model", mismatched / "spm.model")
    result = export_cli(mismatched, tmp_path / "out")
    assert result.returncode != 0 and "the tokenizer has 8000 pieces but the model 120" in result.stderr


def test_sentences_longer_than_the_model_are_left_out_of_verification_and_calibration(tiny_checkpoint, tmp_path):
    too_long = " ".join(["dog"] * 300)  # the tiny model has 64 positions
    logged = []
    options = ExportOptions(precisions=("fp32",), sample=["A dog runs.", too_long, "A cat sleeps."],
                            references=["Ein Hund rennt.", "Hunde.", "Eine Katze schläft."])
    package = export_package(tiny_checkpoint, tmp_path / "pkg", options, log=logged.append)
    assert "verifying on the sample (1 too long for the model left out)" in logged
    assert package.manifest["variants"]["fp32"]["parity"]["sentences"] == 2
    with pytest.raises(ExportError, match="every sample sentence is longer than the model's 64 positions"):
        export_package(tiny_checkpoint, tmp_path / "none", ExportOptions(precisions=("fp32",), sample=[too_long]),
                       log=lambda message: None)
    with pytest.raises(ExportError, match="every calibration sentence is longer than the model's 64 positions"):
        export_package(tiny_checkpoint, tmp_path / "none", ExportOptions(calibration=[too_long]),
                       log=lambda message: None)
    assert not (tmp_path / "none").exists()


def test_force_replaces_only_a_package_or_an_empty_directory_and_an_unwritable_place_is_named(
        tiny_checkpoint, tmp_path):
    options = ExportOptions(precisions=("fp32",), sample_size=4, force=True)
    checkpoint = tmp_path / "checkpoint"  # a copy: the shared one must survive a regression
    shutil.copytree(tiny_checkpoint, checkpoint)
    repository = tmp_path / "models"
    (repository / "other-model").mkdir(parents=True)
    (repository / "other-model" / "manifest.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    for out_dir in (repository, tmp_path / "notes.txt", checkpoint):  # a slip of the path, not a package
        with pytest.raises(ExportError, match="is not a model package .no manifest.json.; --force replaces only a "
                                              "package or an empty directory"):
            export_package(checkpoint, out_dir, options, log=lambda message: None)
    assert (repository / "other-model" / "manifest.json").is_file() and (tmp_path / "notes.txt").is_file()
    assert (checkpoint / "model.safetensors").is_file()
    with pytest.raises(ExportError, match="cannot write a package into .*notes.txt: "):
        export_package(checkpoint, tmp_path / "notes.txt" / "pkg", options, log=lambda message: None)
    (repository / "empty").mkdir()
    export_package(checkpoint, repository / "empty", options, log=lambda message: None)
    (repository / "empty" / "stale.onnx").write_text("left by hand")
    export_package(checkpoint, repository / "empty", options, log=lambda message: None)  # now a package
    assert sorted(p.name for p in (repository / "empty").iterdir()) == ["fp32", "manifest.json", "spm.model"]


def test_a_default_name_made_of_unusable_language_codes_asks_for_a_name(tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "source_language": "en/us"}))
    with pytest.raises(ExportError, match="model name 'en/us-de' must be 1 to 64 letters.* \\(set --name\\)"):
        export_package(checkpoint, tmp_path / "pkg", ExportOptions(precisions=("fp32",)), log=lambda message: None)
    assert not (tmp_path / "pkg").exists()


def test_a_variant_that_fails_verification_writes_nothing(tiny_checkpoint, tmp_path):
    # ONNX Runtime's fp32 log-probabilities are never bit-identical to PyTorch's (other summation
    # orders, fused kernels): a zero tolerance must fail verification.
    options = ExportOptions(precisions=("fp32",), max_fp32_logprob_diff=0.0, sample_size=8)
    with pytest.raises(ExportError, match="fp32 variant does not match PyTorch: max .log-prob difference. .* "
                                          "exceeds 0e.00. Nothing was written"):
        export_package(tiny_checkpoint, tmp_path / "out", options, log=lambda message: None)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.staging-*"))


def test_cli_writes_a_package(tiny_checkpoint, tmp_path):
    result = export_cli(tiny_checkpoint, tmp_path / "pkg", "--precision", "fp32", "--name", "cli-tiny")
    assert result.returncode == 0, result.stderr
    assert "fp32:" in result.stdout and "wrote" in result.stdout
    package = ModelPackage.load(tmp_path / "pkg")
    assert package.precisions == ["fp32"] and package.name == "cli-tiny"
    assert not (tmp_path / "pkg" / "int8").exists()


def test_rows_joining_reuse_spare_rows_whatever_they_held(tiny_package):
    """Regression: a new row written into a spare buffer row must not see the row's old bytes."""
    sessions = open_sessions(ModelPackage.load(tiny_package), "fp32")
    batch = OnnxStepBackend(sessions, pad_batch([[5, 6, 3], [7, 8, 9, 3]], 0))
    batch.step_log_probs(np.array([2, 2]))
    batch.select(np.array([1, 0]))
    for buffer in batch.buffers.cache + batch.buffers.cross:
        buffer[batch.used :] = np.nan  # what np.empty may hand out
    batch.extend(pad_batch([[10, 11, 3]], 0))
    joined = batch.step_log_probs(np.array([20, 21, 2]))[2]
    alone = OnnxStepBackend(sessions, pad_batch([[10, 11, 3]], 0)).step_log_probs(np.array([2]))[0]
    assert np.isfinite(joined).all()
    np.testing.assert_allclose(joined, alone, atol=2e-5)

