"""The two ONNX graphs of a model package, as thin wrappers with flat, named inputs and outputs.

Encoder graph, once per source batch:
    src_tokens (B, S) int64  ->  src_mask (B, S) bool, cross_k_i (B, H, dk, S), cross_v_i (B, H, S, dk)
Decoder-step graph, once per generated token, B rows of N sources (beams share a source):
    tokens (B,), positions (B,) int64; cache_mask (B, C) bool; src_mask (N, S) bool;
    slot_row (N * W,), row_slot (B,) int64 (decoding.grid); top_k () int64;
    cache_k_i (B, H, dk, C), cache_v_i (B, H, C, dk); cross_k_i (N, H, dk, S), cross_v_i (N, H, S, dk)
    ->  log_probs (B, V) float32, top_log_probs (B, K) float32, top_tokens (B, K) int64,
        eos_log_probs (B,) float32, new_k_i (B, H, dk, 1), new_v_i (B, H, 1, dk)

Keys are stored transposed (model.layers.MultiHeadAttention.project_kv); the engine reads
each tensor's position axis off the graph's input shapes.

The search needs only each row's best K tokens (K = 2 x beam + 1); selecting them with
TopK inside the graph is about 5x faster than numpy's argpartition over the vocabulary
and keeps the (B, V) matrix in ONNX Runtime. log_probs stays an output for verification.

The self-attention cache is preallocated by the engine and written in place there: the
graph reads it and returns only the new token's key and value. Growing the
cache by concatenation inside the graph would copy all of it at every step; here a step
copies nothing of the cache (see MultiHeadAttention.step), and C may exceed what is
valid: cache_mask says which slots hold keys, so rows of different ages share a batch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from export.io import OPSET, STEP_OUTPUTS, decoder_input_names, decoder_output_names, encoder_output_names
from model.transformer import Transformer

class EncoderGraph(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, src_tokens: torch.Tensor):
        memory, src_mask = self.model.encode(src_tokens)
        outputs = [src_mask]
        for k, v in self.model.cross_kv(memory):
            outputs += [k, v]
        return tuple(outputs)


class DecoderStepGraph(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        self.layers = model.config.decoder_layers

    def forward(self, tokens, positions, cache_mask, src_mask, slot_row, row_slot, top_k, *kv):
        n = self.layers
        cache, cross = kv[: 2 * n], kv[2 * n :]
        step, new_k, new_v = self.model.decode_step(
            tokens, positions, list(cache[0::2]), list(cache[1::2]), cache_mask, list(cross[0::2]), list(cross[1::2]),
            src_mask, slot_row, row_slot, top_k,
        )
        outputs = list(step)
        for k, v in zip(new_k, new_v):
            outputs += [k, v]
        return tuple(outputs)


def example_inputs(model: Transformer, sources: int = 2, beams: int = 3, src_len: int = 5, capacity: int = 4):
    """Inputs of the right shapes and types for tracing (values do not matter)."""
    c = model.config
    src = torch.full((sources, src_len), 5, dtype=torch.long)
    src[1, -2:] = c.pad_id
    rows = sources * beams
    decoder = [
        torch.full((rows,), 5, dtype=torch.long),
        torch.arange(rows, dtype=torch.long),
        torch.ones(rows, capacity, dtype=torch.bool),
        torch.ones(sources, src_len, dtype=torch.bool),
        torch.arange(rows, dtype=torch.long),
        torch.arange(rows, dtype=torch.long),
        torch.tensor(3),
    ]
    project_kv = model.decoder_layers[0].self_attn.project_kv  # the cache layout is defined there
    with torch.no_grad():
        for count, positions in ((rows, capacity), (sources, src_len)):  # self-attention cache, then cross
            key, value = project_kv(torch.zeros(count, positions, c.d_model))
            decoder += [t.clone() for _ in range(c.decoder_layers) for t in (key, value)]
    return (src,), tuple(decoder)


def position_axes(model: Transformer) -> dict[str, int]:
    """The positions' axis of a cached key ("k") and value ("v"): the axis that grows with the
    input of MultiHeadAttention.project_kv, so the layout is stated in one place."""
    project_kv = model.decoder_layers[0].self_attn.project_kv
    with torch.no_grad():
        one, two = (project_kv(torch.zeros(1, n, model.config.d_model)) for n in (1, 2))
    return {kv: next(axis for axis, (a, b) in enumerate(zip(x.shape, y.shape)) if a != b)
            for kv, x, y in zip("kv", one, two)}


def export_graphs(model: Transformer, directory: Path) -> tuple[Path, Path]:
    """Write encoder.onnx and decoder_step.onnx (fp32) with dynamic batch, source and cache lengths."""
    # The exporter restores the wrapper's train/eval mode afterwards, recursively: wrappers are
    # put in eval mode so the model is left in eval mode too (dropout off).
    model = model.eval()
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # shape arithmetic traced as constants: intended
    layers = model.config.decoder_layers
    axes = position_axes(model)
    encoder_args, decoder_args = example_inputs(model)
    encoder_path, decoder_path = directory / "encoder.onnx", directory / "decoder_step.onnx"
    torch.onnx.export(
        EncoderGraph(model).eval(), encoder_args, str(encoder_path), input_names=["src_tokens"],
        output_names=encoder_output_names(layers), opset_version=OPSET, dynamo=False,
        dynamic_axes={"src_tokens": {0: "batch", 1: "src_len"},
                      **{name: {0: "batch", axes[name.split("_")[1]]: "src_len"}
                         for name in encoder_output_names(layers)[1:]},
                      "src_mask": {0: "batch", 1: "src_len"}},
    )
    dynamic = {"tokens": {0: "batch"}, "positions": {0: "batch"}, "cache_mask": {0: "batch", 1: "capacity"},
               "src_mask": {0: "sources", 1: "src_len"}, "slot_row": {0: "slots"}, "row_slot": {0: "batch"},
               "log_probs": {0: "batch"}, "top_log_probs": {0: "batch", 1: "k"},
               "top_tokens": {0: "batch", 1: "k"}, "eos_log_probs": {0: "batch"}}
    for name in decoder_input_names(layers):
        if name.startswith("cache_") and name != "cache_mask":
            dynamic[name] = {0: "batch", axes[name.split("_")[1]]: "capacity"}
        elif name.startswith("cross_"):
            dynamic[name] = {0: "sources", axes[name.split("_")[1]]: "src_len"}
    for name in decoder_output_names(layers)[len(STEP_OUTPUTS):]:
        dynamic[name] = {0: "batch"}
    torch.onnx.export(
        DecoderStepGraph(model).eval(), decoder_args, str(decoder_path), input_names=decoder_input_names(layers),
        output_names=decoder_output_names(layers), opset_version=OPSET, dynamo=False, dynamic_axes=dynamic,
    )
    return encoder_path, decoder_path
