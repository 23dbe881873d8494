"""The model's shape and vocabulary: one frozen record, saved as JSON beside the weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

ACTIVATIONS = ("relu", "gelu")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int = 256
    num_heads: int = 4
    d_ff: int = 1024
    encoder_layers: int = 3
    decoder_layers: int = 3
    dropout: float = 0.1
    activation: str = "relu"
    pre_norm: bool = False
    max_positions: int = 256
    pad_id: int = 0
    unk_id: int = 1
    bos_id: int = 2
    eos_id: int = 3
    source_language: str = "en"
    target_language: str = "de"

    def __post_init__(self) -> None:
        problems = [f"{name} must be at least 1, got {getattr(self, name)}" for name in
                    ("vocab_size", "d_model", "num_heads", "d_ff", "encoder_layers", "decoder_layers", "max_positions")
                    if getattr(self, name) < 1]
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if problems:  # the checks below divide by these
            raise ValueError("invalid model config: " + "; ".join(problems))
        if self.d_model % self.num_heads:
            problems.append(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if self.d_model % 2:
            problems.append(f"d_model ({self.d_model}) must be even for sinusoidal positions")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        ids = {"pad_id": self.pad_id, "unk_id": self.unk_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        for name, value in ids.items():
            if not 0 <= value < self.vocab_size:
                problems.append(f"{name} ({value}) must be in [0, vocab_size={self.vocab_size})")
        if len(set(ids.values())) != len(ids):
            problems.append(f"special token ids must be distinct, got {ids}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {unknown}")
        return cls(**data)
