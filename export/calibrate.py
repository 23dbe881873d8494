"""Activation ranges for static int8: the largest |input| each projection sees on real text.

The model translates the calibration sentences (greedy), then runs them again teacher-forced
on its own output, so the decoder sees the prefixes it meets when serving. One sentence per
forward pass: with no padding, every recorded activation belongs to a real token.

Projections are named by their weights, not by module or tensor names (which the ONNX
exporter does not keep): quantize.weight_key of the first output unit's input weights
identifies a projection in PyTorch and the MatMul that computes it in the graph, merged or not.
"""

from __future__ import annotations

from typing import Sequence

import torch

from export.quantize import weight_key
from model.generate import translate_tokens
from model.transformer import Transformer


@torch.no_grad()
def input_ranges(model: Transformer, sources: Sequence[Sequence[int]]) -> dict[bytes, float]:
    """weight_key -> max |input| over every token of every calibration sentence."""
    ranges: dict[bytes, float] = {}

    def record(key: bytes, x: torch.Tensor) -> None:
        ranges[key] = max(ranges.get(key, 0.0), float(x.abs().max()))

    hooks = [module.register_forward_pre_hook(
        lambda _module, args, key=weight_key(module.weight[0].numpy()): record(key, args[0]))
        for module in model.modules() if isinstance(module, torch.nn.Linear)]
    projection_key = weight_key(model.embedding.weight[0].numpy())  # the tied output projection
    project = model.project
    model.project = lambda x: (record(projection_key, x), project(x))[1]
    c = model.config
    try:
        for source, output in zip(sources, translate_tokens(model, sources)):
            model(torch.tensor([list(source) + [c.eos_id]]), torch.tensor([[c.bos_id, *output]]))
    finally:
        for hook in hooks:
            hook.remove()
        del model.project  # the instance attribute; the class method is back
    return ranges
