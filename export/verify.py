"""Parity of an exported variant with the PyTorch model it came from.

Two checks, both on fixed inputs:
- logits: the decoder-step graph fed token by token (through the engine's step backend,
  cache and all) against PyTorch's full-sequence forward pass, max |difference| of the
  log-probabilities over the tokens the decoder may emit;
- translations: greedy search through ONNX Runtime against the PyTorch reference on a
  sample of sources: exact-match rate, token agreement, and BLEU of the variant's output
  against PyTorch's (and against references, when given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import sacrebleu
import torch

from decoding import DecodingParams, output_budget
from decoding.padding import pad_batch
from model.transformer import Transformer
from server.engine.backend import OnnxStepBackend
from server.engine.engine import Engine
from server.engine.session import VariantSessions


@dataclass
class Parity:
    precision: str
    provider: str
    max_abs_logprob_diff: float
    sentences: int
    exact_match_rate: float
    token_agreement: float
    bleu_vs_pytorch: float
    bleu_vs_references: float | None = None

    def as_record(self) -> dict:
        record = {k: v for k, v in self.__dict__.items() if v is not None}
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}


@torch.no_grad()
def max_logprob_difference(model: Transformer, sessions: VariantSessions, sources: Sequence[Sequence[int]],
                           steps: int = 12) -> float:
    """Teacher-force the same target prefix through both; compare every step's log-probabilities."""
    c = model.config
    src = pad_batch([list(s) + [c.eos_id] for s in sources], c.pad_id)
    rng = np.random.default_rng(0)
    emittable = np.array([t for t in range(c.vocab_size) if t not in (c.pad_id, c.bos_id)])
    targets = np.concatenate([np.full((len(sources), 1), c.bos_id), rng.choice(emittable, (len(sources), steps - 1))],
                             axis=1)
    logits = model(torch.from_numpy(src), torch.from_numpy(targets)).float()
    logits[..., [c.pad_id, c.bos_id]] = torch.finfo(torch.float32).min
    expected = torch.log_softmax(logits, dim=-1).numpy()[..., emittable]  # (B, T, V')
    backend = OnnxStepBackend(sessions, src)
    worst = 0.0
    for t in range(steps):
        got = backend.step_log_probs(targets[:, t]).astype(np.float32)[:, emittable]
        worst = max(worst, float(np.abs(got - expected[:, t]).max()))
    return worst


def token_agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """Share of positions (over the longer of each pair) holding the same token."""
    same = total = 0
    for x, y in zip(a, b):
        total += max(len(x), len(y), 1)
        same += sum(p == q for p, q in zip(x, y)) + (1 if not x and not y else 0)
    return same / max(total, 1)


def check_variant(
    model: Transformer, engine: Engine, sample: Sequence[str], references: Sequence[str] | None,
    reference_outputs: Sequence[Sequence[int]],
) -> Parity:
    """Compare an engine on one variant with PyTorch's greedy output on the same sample."""
    tokenizer = engine.tokenizer
    sources = tokenizer.encode(sample)
    diff = max_logprob_difference(model, engine.sessions, sources[:16])
    params = [DecodingParams(max_length=output_budget(len(s), engine.package.max_output_tokens)) for s in sources]
    outputs = [hyps[0].tokens for hyps in engine.decode(sources, params)]
    texts, expected_texts = tokenizer.decode(outputs), tokenizer.decode(reference_outputs)
    exact = float(np.mean([tuple(o) == tuple(r) for o, r in zip(outputs, reference_outputs)]))
    return Parity(
        precision=engine.precision,
        provider=engine.sessions.decoder.get_providers()[0],
        max_abs_logprob_diff=diff,
        sentences=len(sources),
        exact_match_rate=exact,
        token_agreement=token_agreement(outputs, reference_outputs),
        bleu_vs_pytorch=sacrebleu.corpus_bleu(texts, [expected_texts]).score,
        bleu_vs_references=sacrebleu.corpus_bleu(texts, [list(references)]).score if references else None,
    )
