"""Train the Transformer on a parallel corpus; resumable, seeded, CPU or CUDA.

    python -m model.train --data-dir ../shared/data/multi30k --out-dir runs/en-de

Writes into OUT_DIR: spm.model (trained on the train split if absent), epochs/NNN/
(per-epoch weights), state/ (the model's config, weights, optimizer and progress: the same
command run again resumes from it), log.jsonl, and final/ (the average of the last
--average epoch checkpoints: a model directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from tqdm import tqdm

from decoding.tokenizer import Tokenizer, train_tokenizer
from model.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, load_weights, save_model
from model.config import ACTIVATIONS, ModelConfig
from model.data import TokenBatches, read_parallel, split_path
from model.evaluate import bleu, translate
from model.transformer import Transformer


def inverse_sqrt_lr(step: int, d_model: int, warmup: int, factor: float) -> float:
    """The paper's schedule: linear warm-up, then decay with the inverse square root of the step."""
    step = max(step, 1)
    return factor * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def label_smoothed_loss(logits: torch.Tensor, target: torch.Tensor, pad_id: int, smoothing: float) -> torch.Tensor:
    """Summed cross-entropy with label smoothing over non-pad target positions."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1), ignore_index=pad_id,
        label_smoothing=smoothing, reduction="sum",
    )


def save_training_state(directory: Path, optimizer: torch.optim.Adam, model: Transformer, progress: dict) -> None:
    """Adam's moments as safetensors plus progress as JSON: resumable without pickle."""
    tmp = directory.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state:
                name = names[id(p)]
                tensors[f"exp_avg/{name}"] = state["exp_avg"].contiguous().cpu()
                tensors[f"exp_avg_sq/{name}"] = state["exp_avg_sq"].contiguous().cpu()
                tensors[f"step/{name}"] = torch.as_tensor(state["step"]).reshape(1).float().cpu()
    save_file(tensors, tmp / "optimizer.safetensors")
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, tmp / WEIGHTS_FILE)
    model.config.save(tmp / CONFIG_FILE)
    (tmp / "progress.json").write_text(json.dumps(progress, indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)  # the previous state survives a crash mid-save


def load_training_state(directory: Path, optimizer: torch.optim.Adam, model: Transformer) -> dict:
    """Resume: the model's and Adam's state and the progress saved in `directory`, refused
    (ValueError) if the run there trained another model than `model`'s config describes."""
    if (directory / CONFIG_FILE).is_file():  # states saved before the config was kept have none
        differences = config_differences(ModelConfig.load(directory / CONFIG_FILE), model.config)
        if differences:
            raise ValueError(f"{directory.parent} holds a training run of another model ({differences}): "
                             "run it again with its flags to resume it, or choose another --out-dir")
    load_weights(model, directory / WEIGHTS_FILE)
    tensors = load_file(str(directory / "optimizer.safetensors"))
    for name, p in model.named_parameters():
        if f"exp_avg/{name}" in tensors:
            optimizer.state[p] = {
                "step": tensors[f"step/{name}"].reshape(()),
                "exp_avg": tensors[f"exp_avg/{name}"].to(p.device),
                "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].to(p.device),
            }
    return json.loads((directory / "progress.json").read_text())


def config_differences(saved: ModelConfig, asked: ModelConfig) -> str:
    """'d_model 256 there, 512 asked; ...' for every field where the two differ ('' if none)."""
    return "; ".join(f"{f.name} {getattr(saved, f.name)} there, {getattr(asked, f.name)} asked"
                     for f in dataclasses.fields(ModelConfig) if getattr(saved, f.name) != getattr(asked, f.name))


def average_checkpoints(paths: Sequence[Path]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        for name, tensor in load_file(str(path)).items():
            total[name] = total.get(name, 0) + tensor.double()
    return {name: (t / len(paths)).float() for name, t in total.items()}


@torch.no_grad()
def validation_loss(model: Transformer, batches: TokenBatches, device: torch.device) -> float:
    model.eval()
    loss_sum, tokens = 0.0, 0
    for batch in batches.epoch(0, 0, device):
        loss_sum += float(label_smoothed_loss(model(batch.src, batch.tgt_in), batch.tgt_out, batches.pad_id, 0.0))
        tokens += batch.target_tokens
    model.train()
    return loss_sum / tokens


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parley-train", description="Train Parley's encoder-decoder Transformer.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data/multi30k"),
                   help="the corpus: {train,val}.{LANG}.gz, one sentence a line")
    p.add_argument("--out-dir", type=Path, required=True, help="the run's directory; the same command again resumes it")
    p.add_argument("--source-language", default="en", help="language code of the sources")
    p.add_argument("--target-language", default="de", help="language code of the targets")
    p.add_argument("--vocab-size", type=int, default=8000, help="pieces of the joint SentencePiece model")
    p.add_argument("--d-model", type=int, default=256, help="model width")
    p.add_argument("--num-heads", type=int, default=4, help="attention heads (d_model divisible by them)")
    p.add_argument("--d-ff", type=int, default=1024, help="feed-forward inner width")
    p.add_argument("--encoder-layers", type=int, default=3, help="encoder blocks")
    p.add_argument("--decoder-layers", type=int, default=3, help="decoder blocks")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout rate")
    p.add_argument("--activation", default="relu", help=f"feed-forward activation: {', '.join(ACTIVATIONS)}")
    p.add_argument("--pre-norm", action="store_true", help="pre-LN residual blocks instead of the paper's post-LN")
    p.add_argument("--max-positions", type=int, default=256, help="longest sequence the model takes (tokens)")
    p.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per batch (source or target side)")
    p.add_argument("--max-length", type=int, default=100, help="drop training pairs longer than this (tokens)")
    p.add_argument("--max-steps", type=int, default=6000, help="stop after this many optimizer steps")
    p.add_argument("--max-epochs", type=int, default=1000, help="or after this many epochs")
    p.add_argument("--warmup", type=int, default=2000, help="steps of the learning rate's linear warm-up")
    p.add_argument("--lr-factor", type=float, default=0.7,
                   help="learning rate = this * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the loss")
    p.add_argument("--seed", type=int, default=1, help="seeds batching, initialization and dropout")
    p.add_argument("--bleu-every", type=int, default=1, help="greedy val BLEU every N epochs (0: never)")
    p.add_argument("--average", type=int, default=5, help="average the last N epoch checkpoints into final/")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    # Checked before the tokenizer trains (minutes on a full corpus): a typo costs nothing.
    try:
        model_config(args)
        for split in ("train", "val"):
            for language in (args.source_language, args.target_language):
                split_path(args.data_dir, split, language)
    except (ValueError, FileNotFoundError) as error:
        p.error(str(error))
    problems = training_problems(args)
    if problems:
        p.error("; ".join(problems))
    return args


def training_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the flags that shape the training rather than the model."""
    problems = [f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}"
                for name, least in (("max_steps", 1), ("max_epochs", 1), ("warmup", 1), ("average", 1),
                                    ("bleu_every", 0), ("max_length", 2))
                if getattr(args, name) < least]
    if args.max_length > args.max_positions:  # a longer pair would fail in the middle of an epoch
        problems.append(f"--max-length ({args.max_length}) must not exceed --max-positions ({args.max_positions})")
    if args.max_tokens < args.max_length:
        problems.append(f"--max-tokens ({args.max_tokens}) must hold the longest pair a batch may take "
                        f"(--max-length {args.max_length})")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        problems.append(f"--out-dir {args.out_dir} is a file, not a run's directory")
    if args.lr_factor <= 0:
        problems.append(f"--lr-factor must be positive, got {args.lr_factor}")
    if not 0 <= args.label_smoothing < 1:
        problems.append(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        problems.append(f"--device must be auto, cpu or cuda, got {args.device!r}")
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {args.device}: this PyTorch sees no CUDA device (use --device cpu or auto)")
    return problems


def model_config(args: argparse.Namespace, tokenizer: Tokenizer | None = None) -> ModelConfig:
    """The architecture the flags ask for, with the tokenizer's vocabulary and special ids
    (before it exists: --vocab-size and the default ids)."""
    vocabulary = dict(vocab_size=args.vocab_size) if tokenizer is None else dict(
        vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, unk_id=tokenizer.unk_id, bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id)
    return ModelConfig(
        d_model=args.d_model, num_heads=args.num_heads, d_ff=args.d_ff, encoder_layers=args.encoder_layers,
        decoder_layers=args.decoder_layers, dropout=args.dropout, activation=args.activation,
        pre_norm=args.pre_norm, max_positions=args.max_positions, source_language=args.source_language,
        target_language=args.target_language, **vocabulary)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:  # before the tokenizer trains: misaligned files fail at once, not after it
        train_src, train_tgt = read_parallel(args.data_dir, "train", args.source_language, args.target_language)
        val_src, val_tgt = read_parallel(args.data_dir, "val", args.source_language, args.target_language)
    except ValueError as error:
        sys.exit(f"error: the corpus in {args.data_dir} is not line-aligned: {error}")

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.backends.cuda.matmul.allow_tf32 = True
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    spm_path = out / TOKENIZER_FILE
    if not spm_path.is_file():
        plain = []
        for language, lines in ((args.source_language, train_src), (args.target_language, train_tgt)):
            target = out / f"spm-input.train.{language}"  # SentencePiece reads plain text
            target.write_text("\n".join(lines) + "\n")
            plain.append(target)
        try:
            train_tokenizer(plain, out / "spm", args.vocab_size)
        except RuntimeError as error:  # e.g. fewer pieces than the corpus has characters
            sys.exit(f"error: SentencePiece could not train a tokenizer of {args.vocab_size} pieces: {error}")
        finally:
            for f in plain:
                f.unlink()
    tokenizer = Tokenizer(spm_path)
    if tokenizer.vocab_size != args.vocab_size:  # a tokenizer an earlier run of OUT_DIR trained
        sys.exit(f"error: {spm_path} has {tokenizer.vocab_size} pieces where --vocab-size asks {args.vocab_size}: "
                 f"run again with --vocab-size {tokenizer.vocab_size}, or choose another --out-dir")

    config = model_config(args, tokenizer)
    train = TokenBatches(tokenizer, train_src, train_tgt, args.max_tokens, args.max_length)
    val = TokenBatches(tokenizer, val_src, val_tgt, args.max_tokens, config.max_positions - 1)

    model = Transformer(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0, betas=(0.9, 0.98), eps=1e-9)
    state_dir, epochs_dir = out / "state", out / "epochs"
    progress = {"epoch": 0, "step": 0, "train_seconds": 0.0}
    if (state_dir / "progress.json").is_file():
        try:
            progress = load_training_state(state_dir, optimizer, model)
        except ValueError as error:
            sys.exit(f"error: {error}")
        print(f"resumed from epoch {progress['epoch']}, step {progress['step']}", flush=True)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{parameters:,} parameters, {len(train)} batches/epoch, device {device}", flush=True)

    step = progress["step"]
    model.train()
    while step < args.max_steps and progress["epoch"] < args.max_epochs:
        epoch = progress["epoch"] + 1
        started, tokens_seen, loss_sum = time.perf_counter(), 0, 0.0
        bar = tqdm(train.epoch(epoch, args.seed, device), total=len(train), desc=f"epoch {epoch}",
                   disable=args.no_progress, mininterval=2.0)
        torch.manual_seed(args.seed * 1000 + epoch)  # dropout masks are reproducible on resume
        for batch in bar:
            step += 1
            lr = inverse_sqrt_lr(step, config.d_model, args.warmup, args.lr_factor)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = model(batch.src, batch.tgt_in)
            loss = label_smoothed_loss(logits, batch.tgt_out, config.pad_id, args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            (loss / batch.target_tokens).backward()
            optimizer.step()
            tokens_seen += batch.target_tokens
            loss_sum += float(loss.detach())
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{loss_sum / tokens_seen:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_seen / elapsed:,.0f}",
                            refresh=False)
            if step >= args.max_steps:
                break
        progress.update(epoch=epoch, step=step, train_seconds=progress["train_seconds"] + time.perf_counter() - started)
        record = {"epoch": epoch, "step": step, "lr": lr, "train_loss": loss_sum / tokens_seen,
                  "val_loss": validation_loss(model, val, device), "train_seconds": round(progress["train_seconds"], 1)}
        if args.bleu_every and epoch % args.bleu_every == 0:
            model.eval()
            record["val_bleu_greedy"] = round(bleu(translate(model, tokenizer, val_src), val_tgt).score, 2)
            model.train()
        print(json.dumps(record), flush=True)
        with open(out / "log.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        epoch_dir = epochs_dir / f"{epoch:04d}"
        epoch_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, epoch_dir / WEIGHTS_FILE)
        for old in sorted(epochs_dir.iterdir())[: -args.average]:
            shutil.rmtree(old)
        save_training_state(state_dir, optimizer, model, progress)

    recent = sorted(epochs_dir.iterdir())[-args.average:]
    final = Transformer(config)
    final.load_state_dict(average_checkpoints([d / WEIGHTS_FILE for d in recent]))
    save_model(final, out / "final", spm_path)
    summary = {"parameters": parameters, "steps": step, "epochs": progress["epoch"],
               "train_seconds": round(progress["train_seconds"], 1), "averaged_epochs": [d.name for d in recent],
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    final.to(device).eval()
    summary["val_bleu_greedy_final"] = round(bleu(translate(final, tokenizer, val_src), val_tgt).score, 2)
    (out / "final" / "training.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                              **summary}, indent=2) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
