"""python -m export CHECKPOINT_DIR OUT_DIR [--precision fp32,int8,fp16] ..."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from export.convert import ExportError, ExportOptions, export_package
from export.package import PRECISIONS
from model.data import read_lines


def read_sentences(path: Path | None, role: str) -> list[str] | None:
    if path is None:
        return None
    if not path.is_file():
        raise ExportError(f"{role} file {path} does not exist")
    return read_lines(path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="parley-export",
        description="Export a trained Parley checkpoint (config.json, model.safetensors, spm.model) to a "
                    "verified model package: ONNX encoder + decoder-step graphs per precision, and a manifest.")
    p.add_argument("checkpoint_dir", type=Path,
                   help="the trained checkpoint (config.json, model.safetensors, spm.model)")
    p.add_argument("out_dir", type=Path, help="where to write the package (a directory the server's repository holds)")
    p.add_argument("--precision", default="fp32,int8",
                   help=f"comma-separated variants to write, of {', '.join(PRECISIONS)} (default: fp32,int8)")
    p.add_argument("--name", help="model name in the manifest (default: SRC-TGT)")
    p.add_argument("--sample", type=Path, help="source sentences (plain or .gz, one a line) for verification "
                                               "(default: pseudo-sentences from random token ids)")
    p.add_argument("--sample-references", type=Path, help="their reference translations, for BLEU")
    p.add_argument("--sample-size", type=int, default=200, help="sample sentences used (default 200)")
    p.add_argument("--calibration", type=Path,
                   help="source sentences (plain or .gz, one a line) like those to be served: int8 gets static "
                        "activation scales from them, about a tenth faster (default: per-row scales at run time)")
    p.add_argument("--calibration-size", type=int, default=1000, help="calibration sentences used (default 1000)")
    p.add_argument("--int8-weight-bits", default="auto", choices=["auto", "7", "8"],
                   help="8 can saturate int16 sums on x86 CPUs without VNNI, which 7 avoids "
                        "(auto: 7 on such a CPU, else 8)")
    p.add_argument("--min-bleu-vs-pytorch", type=float, default=60.0,
                   help="int8/fp16 fail verification below this BLEU against PyTorch's greedy output (default 60)")
    p.add_argument("--verify-fp16-on-cpu", action="store_true",
                   help="check fp16 on the CPU execution provider when no CUDA one is present (slow)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        sys.exit(f"error: unknown precision {', '.join(unknown) or '(none given)'}; choose from {', '.join(PRECISIONS)}")
    # auto: ExportOptions' default, this CPU's choice
    weight_bits = {} if args.int8_weight_bits == "auto" else {"int8_weight_bits": int(args.int8_weight_bits)}
    try:
        options = ExportOptions(
            precisions=precisions, name=args.name, sample=read_sentences(args.sample, "sample"),
            references=read_sentences(args.sample_references, "references"), sample_size=args.sample_size,
            calibration=read_sentences(args.calibration, "calibration"), calibration_size=args.calibration_size,
            min_bleu_vs_pytorch=args.min_bleu_vs_pytorch, verify_fp16_on_cpu=args.verify_fp16_on_cpu,
            force=args.force, **weight_bits,
        )
        export_package(args.checkpoint_dir, args.out_dir, options, log=lambda m: print(m, flush=True))
    except ExportError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
