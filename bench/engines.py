"""The translators under benchmark, behind one interface: translate a batch of token lists."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from decoding import DecodingParams, output_budget
from decoding.tokenizer import Tokenizer


MAX_OUTPUT_TOKENS = 255  # the default model's positions allow 255 generated tokens


def output_cap(source_tokens: int) -> int:
    """The same output-length rule for every engine."""
    return output_budget(source_tokens, MAX_OUTPUT_TOKENS)


class ParleyEngine:
    def __init__(self, package_dir: Path, precision: str, threads: int, lanes: int):
        from export.package import ModelPackage
        from server.engine.lanes import LaneEngine

        self.engine = LaneEngine(ModelPackage.load(package_dir), precision=precision, device="cpu", threads=threads,
                                 lanes=lanes)
        self.worker_pids = [lane.process.pid for lane in self.engine.lanes]  # their memory counts too

    def translate(self, sources: Sequence[list[int]], beam_size: int) -> list[list[int]]:
        params = [DecodingParams(beam_size=beam_size, max_length=output_cap(len(s))) for s in sources]
        return [list(hyps[0].tokens) for hyps in self.engine.decode(sources, params)]


class CTranslate2Engine:
    """lanes > 1: CTranslate2's inter_threads, the batch split into that many sub-batches decoded
    in parallel, each on threads / lanes intra-op threads (its counterpart of Parley's lanes)."""

    def __init__(self, model_dir: Path, compute_type: str, threads: int, tokenizer: Tokenizer, lanes: int):
        import ctranslate2

        self.lanes = lanes
        self.translator = ctranslate2.Translator(str(model_dir), device="cpu", compute_type=compute_type,
                                                 intra_threads=max(1, threads // lanes), inter_threads=lanes)
        self.processor = tokenizer.processor

    def translate(self, sources: Sequence[list[int]], beam_size: int) -> list[list[int]]:
        pieces = [[self.processor.id_to_piece(t) for t in s] for s in sources]
        results = self.translator.translate_batch(
            pieces, beam_size=beam_size, max_decoding_length=max(output_cap(len(s)) for s in sources),
            length_penalty=1.0, max_batch_size=0 if self.lanes == 1 else -(-len(sources) // self.lanes))
        return [[self.processor.piece_to_id(p) for p in r.hypotheses[0]] for r in results]


class PyTorchEngine:
    def __init__(self, checkpoint_dir: Path, threads: int):
        import torch

        from model.checkpoint import load_model

        torch.set_num_threads(threads)
        self.model = load_model(checkpoint_dir)

    def translate(self, sources: Sequence[list[int]], beam_size: int) -> list[list[int]]:
        from model.generate import generate

        params = [DecodingParams(beam_size=beam_size, max_length=output_cap(len(s))) for s in sources]
        return [list(hyps[0].tokens) for hyps in generate(self.model, sources, params)]


class FullRecomputeBackend:
    """A step backend without a KV cache: every step reruns the decoder over the whole prefix.

    The baseline that KV-cache decoding is measured against (same model, same search).
    """

    def __init__(self, model, src):
        import torch

        self.model, self.torch = model, torch
        self.vocab_size = model.config.vocab_size
        self.memory, self.src_mask = model.encode(src)
        self.prefix = torch.zeros(src.size(0), 0, dtype=torch.long)

    def step(self, tokens: np.ndarray, top_k: int):
        from decoding import Candidates

        torch, c = self.torch, self.model.config
        self.prefix = torch.cat([self.prefix, torch.from_numpy(tokens)[:, None]], dim=1)
        logits = self.model.decode(self.prefix, self.memory, self.src_mask)[:, -1].float()
        logits[:, [c.pad_id, c.bos_id]] = torch.finfo(logits.dtype).min
        log_probs = torch.log_softmax(logits, dim=-1)
        values, indices = log_probs.topk(top_k, dim=-1)
        return Candidates(values.numpy(), indices.numpy(), log_probs[:, c.eos_id].numpy())

    def select(self, rows: np.ndarray) -> None:
        index = self.torch.from_numpy(rows)
        self.memory, self.src_mask = self.memory[index], self.src_mask[index]
        self.prefix = self.prefix[index]
