"""The engine: text in, hypotheses out. Tokenize, pad, encode, search, detokenize."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from decoding import DecodingParams, Hypothesis, search
from decoding.padding import pad_batch
from decoding.tokenizer import Tokenizer
from export.package import ModelPackage
from server.engine.backend import OnnxStepBackend
from server.engine.session import cuda_available, open_sessions


@dataclass(frozen=True)
class TextHypothesis:
    text: str
    score: float
    tokens: int  # generated tokens, EOS excluded


def default_precision(package: ModelPackage, device: str) -> str:
    """int8 on CPU, fp16 on CUDA, fp32 where the preferred variant is absent."""
    preferred = "fp16" if device == "cuda" else "int8"
    return preferred if preferred in package.precisions else "fp32"


class Engine:
    def __init__(self, package: ModelPackage, precision: str | None = None, device: str | None = None,
                 threads: int = 0, optimization: str = "all"):
        self.package = package
        self.device = device or ("cuda" if cuda_available() else "cpu")
        self.precision = precision or default_precision(package, self.device)
        self.sessions = open_sessions(package, self.precision, self.device, threads, optimization)
        self.tokenizer = Tokenizer(package.tokenizer_path)
        special = package.special_tokens
        self.pad_id, self.bos_id, self.eos_id = special["pad"], special["bos"], special["eos"]

    def decode(self, sources: Sequence[Sequence[int]], params: Sequence[DecodingParams]) -> list[list[Hypothesis]]:
        """Token-id sources (EOS appended here), one DecodingParams each."""
        too_long = [len(s) for s in sources if len(s) + 1 > self.package.max_source_tokens]
        if too_long:
            raise ValueError(f"source of {max(too_long)} tokens exceeds the model's limit of "
                             f"{self.package.max_source_tokens - 1}")
        if not sources:
            return []
        src = pad_batch([list(s) + [self.eos_id] for s in sources], self.pad_id)
        return search(OnnxStepBackend(self.sessions, src), params, self.bos_id, self.eos_id)

    def translate(self, texts: Sequence[str], params: Sequence[DecodingParams]) -> list[list[TextHypothesis]]:
        results = self.decode(self.tokenizer.encode(texts), params)
        return [
            [TextHypothesis(text, h.score, len(h.tokens))
             for h, text in zip(hyps, self.tokenizer.decode([h.tokens for h in hyps]))]
            for hyps in results
        ]
