"""The Transformer's building blocks, written like the paper and kept export-friendly.

Masks are boolean with True = may attend; masked scores are filled with the dtype's
minimum (never -1e9, which overflows in fp16), so a masked position gets exactly zero weight.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def sinusoidal_table(max_positions: int, d_model: int) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d))."""
    positions = torch.arange(max_positions, dtype=torch.float64).unsqueeze(1)  # (P, 1)
    inverse_freq = torch.pow(10000.0, -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (D/2,)
    table = torch.zeros(max_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(positions * inverse_freq)
    table[:, 1::2] = torch.cos(positions * inverse_freq)
    return table.float()


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T) v with queries already scaled by 1/sqrt(d_k) (MultiHeadAttention.queries),
    q (B,H,Tq,dk), keys transposed k (B,H,dk,Tk), values v (B,H,Tk,dk), mask broadcastable to (B,H,Tq,Tk)."""
    scores = q @ k  # (B, H, Tq, Tk)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) @ v  # (B, H, Tq, dk)


class Packing:
    """The real (unpadded) positions of a right-padded batch, for the layers that work position
    by position: projections, feed-forward and norms run on the packed (T, D) real positions
    alone, and only attention sees the padded (B, S) layout. A batch of sources of unequal
    lengths then costs its real tokens, not its width (as CTranslate2's encoder does); the
    engine sorts sources by length before encoding, which leaves 8-16% padding at batches of 8
    to 64 of the test set.
    """

    def __init__(self, mask: torch.Tensor):
        """mask (B, S) bool, True at real positions."""
        self.real = mask.flatten().nonzero().squeeze(1)  # (T,): each real position's index in the flattened batch
        lengths = mask.sum(1)
        first = lengths.cumsum(0) - lengths  # (B,): each source's first index among the packed positions
        # (B, S): each real position's index among the packed ones; a padded position takes the
        # last real one before it (attention masks padding: any finite value does there)
        self.slot = (first[:, None] + mask.long().cumsum(1) - 1).clamp(min=0)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (T, ...): the real positions, in order."""
        return x.flatten(0, 1).index_select(0, self.real)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(T, D) -> (B, S, D), one Gather in the exported graph (see slot for padding's values)."""
        return x[self.slot]


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, dk)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)  # (B, T, D)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """The queries of x (B, T, D), scaled by 1/sqrt(dk) here rather than the scores after the
        product: the export folds this factor into the projection's weights
        (export.optimize.fold_output_scales), while a factor on the scores became a GEMM alpha
        that keeps ONNX Runtime's CPU GEMM off its fast path for one-query rows."""
        return self.q_proj(x) * self.scale

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of x split into heads, as a cache holds them: keys transposed (B, H, dk, T),
        values (B, H, T, dk).

        Both products of a decoding step then take the cache as it lies: q @ k and weights @ v.
        Keys in (B, H, T, dk) made q @ k^T a transposed GEMM operand, which ONNX Runtime's CPU
        GEMM packs more slowly. Measured on one thread, 64 rows, 4 heads, 40 positions, the
        cache out of CPU caches: 135 -> 82 us per product.
        """
        return self.kv_heads(self.k_proj(x), self.v_proj(x))

    def kv_heads(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected keys and values (B, T, D) split into heads in the layout of project_kv."""
        return self.split_heads(k).transpose(-2, -1), self.split_heads(v)

    def forward(self, query: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        k, v = self.project_kv(context)
        return self.attend(query, k, v, mask)

    def attend(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention of query (B,Tq,D) over keys/values laid out as project_kv returns them."""
        q = self.split_heads(self.queries(query))
        return self.out_proj(self.merge_heads(scaled_dot_product(q, k, v, mask)))

    def attend_packed(self, x: torch.Tensor, packing: Packing, mask: torch.Tensor) -> torch.Tensor:
        """Self-attention of a padded batch's real positions x (T, D) (see Packing): the
        projections run on them alone, the attention itself over the padded (B, S) layout."""
        q = self.split_heads(packing.unpack(self.queries(x)))
        k, v = self.kv_heads(packing.unpack(self.k_proj(x)), packing.unpack(self.v_proj(x)))
        return self.out_proj(packing.pack(self.merge_heads(scaled_dot_product(q, k, v, mask))))

    def attend_grid(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    slot_row: torch.Tensor, row_slot: torch.Tensor) -> torch.Tensor:
        """One step of attention over keys/values shared by several rows (see decoding.grid).

        query (R,1,D), one token per row; k (N,H,dk,S), v (N,H,S,dk) and mask (N,1,1,S) once per source;
        slot_row (N*W,) the row in each grid cell, row_slot (R,) each row's cell.
        Sizes come from the mask, shared by all layers, so the exported graph computes them once.
        """
        q = self.queries(query)[:, 0]  # (R, D)
        grid = q.index_select(0, slot_row).view(mask.size(0), -1, self.num_heads, self.head_dim).transpose(1, 2)
        out = scaled_dot_product(grid, k, v, mask)  # (N, H, W, dk)
        out = out.transpose(1, 2).reshape(-1, self.num_heads * self.head_dim).index_select(0, row_slot)
        return self.out_proj(out[:, None])  # (R, 1, D)

    def step(
        self, query: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, cache_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoding step of self-attention over a preallocated cache.

        query (B,1,D); cache_k (B,H,dk,C) and cache_v (B,H,C,dk) (see project_kv), valid where
        cache_mask (B,C) is True. The new token attends to the valid slots and to itself.
        Scores for the cache and for the new key are computed apart and only the (B,H,1,C+1)
        score row is concatenated, so the cache is never copied; the caller writes the
        returned new key (B,H,dk,1) and value (B,H,1,dk) into its slot.
        """
        q = self.split_heads(self.queries(query))  # (B, H, 1, dk)
        k_new, v_new = self.split_heads(self.k_proj(query)), self.split_heads(self.v_proj(query))  # (B, H, 1, dk)
        cache_scores = q @ cache_k  # (B, H, 1, C)
        cache_scores = cache_scores.masked_fill(~cache_mask[:, None, None, :], torch.finfo(q.dtype).min)
        self_score = (q * k_new).sum(-1, keepdim=True)  # (B, H, 1, 1)
        weights = torch.softmax(torch.cat([cache_scores, self_score], dim=-1), dim=-1)  # (B, H, 1, C+1)
        capacity = cache_mask.size(1)  # the mask's, shared by all layers: computed once in the graph
        out = weights[..., :capacity] @ cache_v + weights[..., capacity:] * v_new  # (B, H, 1, dk)
        return self.out_proj(self.merge_heads(out)), k_new.transpose(-2, -1), v_new


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = F.relu if activation == "relu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class Residual(nn.Module):
    """A residual connection with LayerNorm, post-LN (the paper) or pre-LN.

    Split into enter/leave so a sublayer that returns more than its output (a decoding
    step returns the new key/value too) fits the same wrapper.
    """

    def __init__(self, d_model: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) if self.pre_norm else x

    def leave(self, x: torch.Tensor, sublayer_out: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer_out)
        return self.norm(x + self.dropout(sublayer_out))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float, activation: str, pre_norm: bool):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, num_heads)
        self.feed_forward = FeedForward(d_model, d_ff, dropout, activation)
        self.attn_block = Residual(d_model, dropout, pre_norm)
        self.ff_block = Residual(d_model, dropout, pre_norm)

    def forward(self, x: torch.Tensor, packing: Packing, src_mask: torch.Tensor) -> torch.Tensor:
        """x (T, D): the source batch's real positions (Packing); src_mask (B, 1, 1, S)."""
        h = self.attn_block.enter(x)
        x = self.attn_block.leave(x, self.self_attn.attend_packed(h, packing, src_mask))
        return self.ff_block.leave(x, self.feed_forward(self.ff_block.enter(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float, activation: str, pre_norm: bool):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, num_heads)
        self.cross_attn = MultiHeadAttention(d_model, num_heads)
        self.feed_forward = FeedForward(d_model, d_ff, dropout, activation)
        self.self_block = Residual(d_model, dropout, pre_norm)
        self.cross_block = Residual(d_model, dropout, pre_norm)
        self.ff_block = Residual(d_model, dropout, pre_norm)

    def forward(
        self, x: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor, self_mask: torch.Tensor,
        src_mask: torch.Tensor,
    ) -> torch.Tensor:
        h = self.self_block.enter(x)
        x = self.self_block.leave(x, self.self_attn(h, h, self_mask))
        return self._cross_and_ff(x, cross_k, cross_v, src_mask)

    def step(
        self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, cache_mask: torch.Tensor,
        cross_k: torch.Tensor, cross_v: torch.Tensor, src_mask: torch.Tensor, slot_row: torch.Tensor,
        row_slot: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token per row; cross_k/v and src_mask are per source, rows find theirs through the grid."""
        out, k_new, v_new = self.self_attn.step(self.self_block.enter(x), cache_k, cache_v, cache_mask)
        x = self.self_block.leave(x, out)
        cross = self.cross_attn.attend_grid(self.cross_block.enter(x), cross_k, cross_v, src_mask, slot_row, row_slot)
        return self._feed_forward(self.cross_block.leave(x, cross)), k_new, v_new

    def _cross_and_ff(self, x, cross_k, cross_v, src_mask):
        x = self.cross_block.leave(x, self.cross_attn.attend(self.cross_block.enter(x), cross_k, cross_v, src_mask))
        return self._feed_forward(x)

    def _feed_forward(self, x):
        return self.ff_block.leave(x, self.feed_forward(self.ff_block.enter(x)))
