"""Shared fixtures: tiny seeded models built in memory, never downloaded."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer


def tiny_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=24, d_model=16, num_heads=2, d_ff=32, encoder_layers=2, decoder_layers=2,
                  dropout=0.0, max_positions=64)
    values.update(overrides)
    return ModelConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**overrides))
    # Larger random weights than the init gives sharper, more varied distributions to test search on.
    with torch.no_grad():
        model.embedding.weight.normal_(0, 1.0)
    return model.eval()


@pytest.fixture
def model() -> Transformer:
    return tiny_model()
