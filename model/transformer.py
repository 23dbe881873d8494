"""The encoder-decoder: encode() once per source batch, decode() for training, decode_step() for inference."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from model.config import ModelConfig
from model.layers import DecoderLayer, EncoderLayer, Packing, sinusoidal_table


class StepOutput(NamedTuple):
    log_probs: torch.Tensor  # (B, V)
    top_log_probs: torch.Tensor  # (B, K), best first
    top_tokens: torch.Tensor  # (B, K)
    eos_log_probs: torch.Tensor  # (B,)


def padding_mask(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, T) token ids -> (B, T) bool, True where a real token stands."""
    return tokens != pad_id


def causal_mask(length: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, T) bool, True on and below the diagonal: position i may attend to j <= i."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


class Transformer(nn.Module):
    """Shared source/target embeddings tied with the output projection (the vocabulary is joint)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.d_model)
        nn.init.normal_(self.embedding.weight, mean=0.0, std=c.d_model**-0.5)
        self.register_buffer("positional", sinusoidal_table(c.max_positions, c.d_model), persistent=False)
        self.embed_dropout = nn.Dropout(c.dropout)
        layer_args = (c.d_model, c.num_heads, c.d_ff, c.dropout, c.activation, c.pre_norm)
        self.encoder_layers = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(c.encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(c.decoder_layers))
        # Pre-LN stacks end un-normalised, so they get a final LayerNorm; post-LN ones do not need it.
        self.encoder_norm = nn.LayerNorm(c.d_model) if c.pre_norm else nn.Identity()
        self.decoder_norm = nn.LayerNorm(c.d_model) if c.pre_norm else nn.Identity()
        # Special tokens the decoder must never emit, as an additive mask on the logits: one add
        # over (B, V), where index_fill exported as a scatter copied the logits.
        never_generate = torch.zeros(c.vocab_size)
        never_generate[[c.pad_id, c.bos_id]] = torch.finfo(torch.float32).min
        self.register_buffer("never_generate", never_generate, persistent=False)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens and positions (B, T) -> (B, T, D): scaled embedding plus sinusoidal position."""
        x = self.embedding(tokens) * math.sqrt(self.config.d_model) + self.positional[positions]
        return self.embed_dropout(x)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) right-padded -> memory (B, S, D), src_mask (B, S)."""
        src_mask = padding_mask(src, self.config.pad_id)
        packing = Packing(src_mask)  # the layers run on the real positions only
        positions = torch.arange(src.size(1), device=src.device).expand_as(src)
        x = self.embed(packing.pack(src), packing.pack(positions))  # (T, D)
        attn_mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.encoder_layers:
            x = layer(x, packing, attn_mask)
        return packing.unpack(self.encoder_norm(x)), src_mask

    def cross_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys (B, H, dk, S) and values (B, H, S, dk) of every decoder layer, once per source."""
        return [layer.cross_attn.project_kv(memory) for layer in self.decoder_layers]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states -> vocabulary logits through the tied embedding matrix."""
        return x @ self.embedding.weight.t()

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced decoding: tgt_in (B, T) -> logits (B, T, V)."""
        positions = torch.arange(tgt_in.size(1), device=tgt_in.device).expand_as(tgt_in)
        x = self.embed(tgt_in, positions)
        tgt_mask = padding_mask(tgt_in, self.config.pad_id)
        self_mask = causal_mask(tgt_in.size(1), tgt_in.device)[None, None] & tgt_mask[:, None, None, :]
        cross_mask = src_mask[:, None, None, :]
        for layer, (k, v) in zip(self.decoder_layers, self.cross_kv(memory)):
            x = layer(x, k, v, self_mask, cross_mask)
        return self.project(self.decoder_norm(x))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory, src_mask = self.encode(src)
        return self.decode(tgt_in, memory, src_mask)

    def decode_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache_k: list[torch.Tensor],
        cache_v: list[torch.Tensor],
        cache_mask: torch.Tensor,
        cross_k: list[torch.Tensor],
        cross_v: list[torch.Tensor],
        src_mask: torch.Tensor,
        slot_row: torch.Tensor,
        row_slot: torch.Tensor,
        top_k: torch.Tensor,
    ) -> tuple[StepOutput, list[torch.Tensor], list[torch.Tensor]]:
        """One token for every row.

        tokens, positions (B,): each row's newest token and its own position, so rows of
        different ages can share a batch. cache_k[i] (B, H, dk, C) and cache_v[i] (B, H, C, dk),
        keys transposed (MultiHeadAttention.project_kv), valid where cache_mask (B, C).
        cross_k[i] (N, H, dk, S) and cross_v[i] (N, H, S, dk) with src_mask (N, S): once per
        source, shared by its rows (beams), which slot_row/row_slot place on a query grid
        (decoding.grid.query_grid).
        top_k: a 0-d int64 tensor. Returns the step's log-probabilities (fp32) with each
        row's top_k, and each layer's new key (B, H, dk, 1) and value (B, H, 1, dk).
        """
        x = self.embed(tokens[:, None], positions[:, None])  # (B, 1, D)
        cross_mask = src_mask[:, None, None, :]
        new_k, new_v = [], []
        for i, layer in enumerate(self.decoder_layers):
            x, k, v = layer.step(x, cache_k[i], cache_v[i], cache_mask, cross_k[i], cross_v[i], cross_mask,
                                 slot_row, row_slot)
            new_k.append(k)
            new_v.append(v)
        logits = self.project(self.decoder_norm(x)[:, 0]).float()  # (B, V); log-softmax in fp32 for fp16 models
        logits = logits + self.never_generate
        log_probs = torch.log_softmax(logits, dim=-1)
        top_log_probs, top_tokens = torch.topk(log_probs, top_k, dim=-1)
        step = StepOutput(log_probs, top_log_probs, top_tokens, log_probs[:, self.config.eos_id])
        return step, new_k, new_v
