"""Right-padding of token lists into one array, and the length order that keeps padding low."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> np.ndarray:
    """Right-pad token lists into a (B, max_len) int64 array (at least one column)."""
    width = max([len(s) for s in sequences] + [1])
    batch = np.full((len(sequences), width), pad_id, dtype=np.int64)
    for i, seq in enumerate(sequences):
        batch[i, : len(seq)] = seq
    return batch


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices shortest first (stable): batches cut from this order pad little."""
    return sorted(range(len(lengths)), key=lengths.__getitem__)
