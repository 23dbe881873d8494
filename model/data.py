"""Parallel text: reading Multi30k-style gzipped files and building token-count batches."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from decoding.padding import pad_batch
from decoding.tokenizer import Tokenizer


def read_lines(path: Path) -> list[str]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def split_path(data_dir: Path, split: str, language: str) -> Path:
    path = Path(data_dir) / f"{split}.{language}.gz"
    if not path.is_file():
        raise FileNotFoundError(f"missing corpus file {path}")
    return path


def read_parallel(data_dir: Path, split: str, source: str, target: str) -> tuple[list[str], list[str]]:
    src = read_lines(split_path(data_dir, split, source))
    tgt = read_lines(split_path(data_dir, split, target))
    if len(src) != len(tgt):
        raise ValueError(f"{split}: {len(src)} {source} lines but {len(tgt)} {target} lines")
    return src, tgt


@dataclass
class Batch:
    src: torch.Tensor  # (B, S) source ids + EOS, right-padded
    tgt_in: torch.Tensor  # (B, T) BOS + target ids
    tgt_out: torch.Tensor  # (B, T) target ids + EOS
    target_tokens: int  # non-pad tokens in tgt_out


class TokenBatches:
    """Sentence pairs bucketed by length into batches of at most max_tokens padded tokens.

    The batches are fixed once (sorted by length, so padding is small); their order is
    shuffled per epoch with a seed derived from the epoch, so a resumed run sees the same order.
    """

    def __init__(self, tokenizer: Tokenizer, src: list[str], tgt: list[str], max_tokens: int, max_length: int):
        self.pad_id, self.bos_id, self.eos_id = tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id
        pairs = [
            (s + [self.eos_id], t)
            for s, t in zip(tokenizer.encode(src), tokenizer.encode(tgt))
            if 0 < len(s) < max_length and 0 < len(t) < max_length
        ]
        pairs.sort(key=lambda p: (len(p[0]), len(p[1])))
        self.batches: list[list[tuple[list[int], list[int]]]] = []
        current: list = []
        width = 0
        for pair in pairs:
            new_width = max(width, len(pair[0]), len(pair[1]) + 1)
            if current and new_width * (len(current) + 1) > max_tokens:
                self.batches.append(current)
                current, new_width = [], max(len(pair[0]), len(pair[1]) + 1)
            current.append(pair)
            width = new_width
        if current:
            self.batches.append(current)

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, seed: int, device: torch.device):
        order = np.random.default_rng(seed * 100_003 + epoch).permutation(len(self.batches))
        for i in order:
            yield self.collate(self.batches[i], device)

    def collate(self, pairs, device: torch.device) -> Batch:
        src = pad_batch([s for s, _ in pairs], self.pad_id)
        tgt_in = pad_batch([[self.bos_id] + t for _, t in pairs], self.pad_id)
        tgt_out = pad_batch([t + [self.eos_id] for _, t in pairs], self.pad_id)
        return Batch(
            src=torch.from_numpy(src).to(device),
            tgt_in=torch.from_numpy(tgt_in).to(device),
            tgt_out=torch.from_numpy(tgt_out).to(device),
            target_tokens=int((tgt_out != self.pad_id).sum()),
        )
