"""The PyTorch reference for incremental decoding: a step backend over a preallocated KV cache.

The ONNX engine is held to this token for token; both use decoding.search.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from decoding import Candidates, DecodingParams, Hypothesis, output_budget, search
from decoding.grid import query_grid
from decoding.padding import length_order, pad_batch
from model.transformer import StepOutput, Transformer


class TorchStepBackend:
    """Decoder rows for one source batch; the self-attention cache has one slot per step."""

    def __init__(self, model: Transformer, src: torch.Tensor, capacity: int):
        self.model = model
        self.vocab_size = model.config.vocab_size
        memory, self.src_mask = model.encode(src)
        cross = model.cross_kv(memory)
        self.cross_k = [k for k, _ in cross]
        self.cross_v = [v for _, v in cross]
        c = model.config
        rows = src.size(0)
        self.cache_k = [memory.new_zeros(rows, c.num_heads, c.head_dim, capacity) for _ in range(c.decoder_layers)]
        self.cache_v = [memory.new_zeros(rows, c.num_heads, capacity, c.head_dim) for _ in range(c.decoder_layers)]
        self.positions = torch.zeros(rows, dtype=torch.long, device=src.device)
        self.row_source = np.arange(rows)  # cross keys/values stay one per source; rows point at theirs

    def step(self, tokens: np.ndarray, top_k: int) -> Candidates:
        out = self._run(tokens, top_k)
        return Candidates(out.top_log_probs.cpu().numpy(), out.top_tokens.cpu().numpy(),
                          out.eos_log_probs.cpu().numpy())

    def step_log_probs(self, tokens: np.ndarray) -> np.ndarray:
        """Like step, but returns the full (rows, vocab) log-probabilities."""
        return self._run(tokens, 1).log_probs.cpu().numpy()

    def _run(self, tokens: np.ndarray, top_k: int) -> StepOutput:
        device = self.positions.device
        slot_row, row_slot = query_grid(self.row_source, len(self.src_mask))
        out, new_k, new_v = self.model.decode_step(
            torch.from_numpy(tokens).to(device), self.positions, self.cache_k, self.cache_v,
            # a row's keys fill slots 0 .. position-1, so validity follows from the positions
            torch.arange(self.cache_v[0].size(2), device=device) < self.positions[:, None],
            self.cross_k, self.cross_v, self.src_mask, torch.from_numpy(slot_row).to(device),
            torch.from_numpy(row_slot).to(device), torch.tensor(top_k),
        )
        # Every row of one search call is the same age, so the new slot is the same column for all.
        slot = int(self.positions[0]) if len(self.positions) else 0
        for layer in range(len(self.cache_k)):
            self.cache_k[layer][..., slot] = new_k[layer][..., 0]
            self.cache_v[layer][:, :, slot] = new_v[layer][:, :, 0]
        self.positions += 1
        return out

    def select(self, rows: np.ndarray) -> None:
        index = torch.from_numpy(rows).to(self.positions.device)
        self.cache_k = [k.index_select(0, index) for k in self.cache_k]
        self.cache_v = [v.index_select(0, index) for v in self.cache_v]
        self.row_source = self.row_source[rows]
        self.positions = self.positions.index_select(0, index)


def translate_tokens(model: Transformer, sources: Sequence[Sequence[int]], beam_size: int = 1,
                     batch_size: int = 64) -> list[tuple[int, ...]]:
    """Best hypothesis of every source, decoded in length-sorted batches (less padding), in input order."""
    order = length_order([len(s) for s in sources])
    outputs: list[tuple[int, ...]] = [()] * len(sources)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        params = [DecodingParams(beam_size=beam_size,
                                 max_length=output_budget(len(sources[i]), model.config.max_positions - 1))
                  for i in chunk]
        for i, hyps in zip(chunk, generate(model, [sources[i] for i in chunk], params)):
            outputs[i] = hyps[0].tokens
    return outputs


@torch.no_grad()
def generate(
    model: Transformer, sources: Sequence[Sequence[int]], params: Sequence[DecodingParams] | DecodingParams
) -> list[list[Hypothesis]]:
    """Decode token-id sources (EOS appended here) with greedy or beam search."""
    if isinstance(params, DecodingParams):
        params = [params] * len(sources)
    c = model.config
    device = next(model.parameters()).device
    src = torch.from_numpy(pad_batch([list(s) + [c.eos_id] for s in sources], c.pad_id)).to(device)
    capacity = max(p.max_length for p in params) + 1
    if capacity > c.max_positions or src.size(1) > c.max_positions:
        raise ValueError(
            f"source length {src.size(1)} and max_length + 1 = {capacity} must not exceed max_positions {c.max_positions}"
        )
    backend = TorchStepBackend(model, src, capacity)
    return search(backend, params, c.bos_id, c.eos_id)
