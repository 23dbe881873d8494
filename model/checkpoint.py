"""A model directory: config.json, model.safetensors and the SentencePiece model (never pickle)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.transformer import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "spm.model"


def save_model(model: Transformer, directory: Path, tokenizer_model: Path | None = None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / CONFIG_FILE)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, directory / WEIGHTS_FILE)
    if tokenizer_model is not None and Path(tokenizer_model).resolve() != (directory / TOKENIZER_FILE).resolve():
        shutil.copyfile(tokenizer_model, directory / TOKENIZER_FILE)


def load_model(directory: Path, device: str | torch.device = "cpu") -> Transformer:
    """Load and check a model directory; every missing file or weight is named in the error."""
    directory = Path(directory)
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a Parley model directory: missing {', '.join(missing)}")
    model = Transformer(ModelConfig.load(directory / CONFIG_FILE))
    load_weights(model, directory / WEIGHTS_FILE)
    return model.to(device).eval()


def load_weights(model: Transformer, path: Path) -> None:
    weights = load_file(str(path))
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in weights]
    problems += [f"unexpected {k}" for k in weights if k not in expected]
    problems += [
        f"{k}: shape {tuple(weights[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if problems:
        raise ValueError(f"{path} does not match the config: " + "; ".join(problems))
    model.load_state_dict(weights)
