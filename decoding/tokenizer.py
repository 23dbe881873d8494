"""SentencePiece tokenization shared by training, export and serving."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import sentencepiece as spm


class Tokenizer:
    def __init__(self, model_path: Path | str):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        self.processor = spm.SentencePieceProcessor(model_file=str(path))
        self.pad_id = self.processor.pad_id()
        self.unk_id = self.processor.unk_id()
        self.bos_id = self.processor.bos_id()
        self.eos_id = self.processor.eos_id()

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    # One call per text: SentencePiece's list calls start a thread pool each time, about 50 us
    # (70 us for one short text against 2.4 us; 83 us to decode 8 texts against 15 us).

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Texts -> token ids, without BOS/EOS (the caller adds what its side needs)."""
        return [self.processor.EncodeAsIds(text) for text in texts]

    def decode(self, token_ids: Sequence[Sequence[int]]) -> list[str]:
        return [self.processor.DecodeIds(list(ids)) for ids in token_ids]


def train_tokenizer(text_files: Sequence[Path], model_prefix: Path, vocab_size: int) -> Path:
    """Train a joint unigram SentencePiece model; ids: pad 0, unk 1, bos 2, eos 3."""
    spm.SentencePieceTrainer.train(
        input=",".join(str(f) for f in text_files),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        minloglevel=2,
    )
    return Path(f"{model_prefix}.model")
