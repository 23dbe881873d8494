"""Shared fixtures: tiny seeded models built in memory, never downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from decoding.tokenizer import train_tokenizer
from export.convert import ExportOptions, export_package
from model.checkpoint import save_model
from model.config import ModelConfig
from model.data import read_lines, split_path
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


DATA_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "multi30k"
TINY_VOCAB = 120


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A model directory (config, weights, SentencePiece) of a tiny random model."""
    directory = tmp_path_factory.mktemp("tiny-checkpoint")
    lines = read_lines(split_path(DATA_DIR, "val", "en"))[:300] + read_lines(split_path(DATA_DIR, "val", "de"))[:300]
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    train_tokenizer([corpus], directory / "spm", vocab_size=TINY_VOCAB)
    corpus.unlink()
    (directory / "spm.vocab").unlink()
    save_model(tiny_model(seed=7, vocab_size=TINY_VOCAB), directory)
    return directory


@pytest.fixture(scope="session")
def tiny_package(tiny_checkpoint, tmp_path_factory) -> Path:
    """An exported package (fp32, int8, fp16) of the tiny model."""
    out = tmp_path_factory.mktemp("packages") / "tiny"
    options = ExportOptions(precisions=("fp32", "int8", "fp16"), name="tiny", min_bleu_vs_pytorch=0.0,
                            verify_fp16_on_cpu=True, sample_size=16)
    export_package(tiny_checkpoint, out, options, log=lambda message: None)
    return out
