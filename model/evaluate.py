"""Translate with the PyTorch reference and score with sacreBLEU (cased, 13a, detokenized).

`python -m model.evaluate MODEL_DIR` is what `make eval` runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import sacrebleu

from decoding.tokenizer import Tokenizer
from model.checkpoint import TOKENIZER_FILE, load_model
from model.data import read_parallel
from model.generate import translate_tokens
from model.transformer import Transformer


def translate(
    model: Transformer, tokenizer: Tokenizer, texts: Sequence[str], beam_size: int = 1, batch_size: int = 128
) -> list[str]:
    """Translate texts with the PyTorch reference, returned in input order."""
    return tokenizer.decode(translate_tokens(model, tokenizer.encode(texts), beam_size, batch_size))


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> sacrebleu.metrics.bleu.BLEUScore:
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)])


def bleu_line(hypotheses: Sequence[str], references: Sequence[str]) -> str:
    """sacreBLEU's own text format: 'signature = score details'."""
    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return f"{metric.get_signature()} = {score.format()}"


def beam_sizes(text: str) -> list[int]:
    """'1,4' -> [1, 4]: beam sizes of at least 1."""
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, e.g. 1,4; got {text!r}") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"beam sizes are at least 1 (1 is greedy); got {text!r}")
    return sizes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", type=Path, help="a model directory (config.json, model.safetensors, spm.model)")
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data/multi30k"),
                   help="the corpus: SPLIT.{LANG}.gz, one sentence a line")
    p.add_argument("--split", default="test_2016_flickr", help="the split to translate and score")
    p.add_argument("--beams", type=beam_sizes, default="1,4", help="comma-separated beam sizes; 1 is greedy")
    p.add_argument("--limit", type=int, default=0, help="first N sentences only (0: all)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.limit < 0:  # a slice would drop the last sentences instead
        p.error(f"--limit must be >= 0 (0: all), got {args.limit}")
    try:
        model = load_model(args.model_dir)
        tokenizer = Tokenizer(args.model_dir / TOKENIZER_FILE)
        src, ref = read_parallel(args.data_dir, args.split, model.config.source_language,
                                 model.config.target_language)
    except (FileNotFoundError, ValueError) as error:  # no model or corpus there, or sides not line-aligned
        p.error(str(error))
    if args.limit:
        src, ref = src[: args.limit], ref[: args.limit]
    for beam in args.beams:
        hyps = translate(model, tokenizer, src, beam_size=beam)
        label = "greedy" if beam == 1 else f"beam {beam}"
        print(f"{args.split} {label}: {bleu_line(hyps, ref)}", flush=True)


if __name__ == "__main__":
    main()
