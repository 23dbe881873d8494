"""Checkpoint -> verified model package: load, build graphs, make variants, verify, save.

Nothing is written to OUT_DIR unless every requested variant passes verification: the
package is assembled in a staging directory beside it and moved into place at the end.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime
import torch

from decoding.tokenizer import Tokenizer
from export import EXPORTER_VERSION
from export.calibrate import input_ranges
from export.graphs import export_graphs
from export.io import OPSET
from export.optimize import (constants_as_initializers, fold_output_scales, fold_reshape_shapes,
                             fuse_add_norm_quantize, fuse_attention, fuse_embedding, fuse_top_k, gemms_as_matmuls,
                             merge_parallel_matmuls, merge_reshape_chains, pack_int8_matmuls,
                             reshape_unit_axis_transposes)
from export.package import FORMAT_VERSION, GRAPHS, MANIFEST_FILE, ModelPackage, file_record, name_problem
from export.quantize import convert_fp16, quantize_int8, weight_key
from export.verify import Parity, check_variant
from model.checkpoint import TOKENIZER_FILE, load_model
from model.generate import translate_tokens
from model.transformer import Transformer
from server.engine.engine import Engine
from server.engine.session import cuda_available, int8_gemm_can_saturate


class ExportError(Exception):
    """The export cannot go on; the message says what to do."""


def default_int8_weight_bits() -> int:
    """7 where this CPU's integer GEMMs can saturate with 8-bit weights, else 8 (export.quantize)."""
    return 7 if int8_gemm_can_saturate() else 8


@dataclass
class ExportOptions:
    precisions: Sequence[str] = ("fp32", "int8")
    name: str | None = None
    sample: Sequence[str] | None = None
    references: Sequence[str] | None = None
    sample_size: int = 200
    calibration: Sequence[str] | None = None  # source sentences for static int8 activation scales
    calibration_size: int = 1000
    int8_weight_bits: int = field(default_factory=default_int8_weight_bits)
    max_fp32_logprob_diff: float = 1e-4
    min_bleu_vs_pytorch: float = 60.0  # int8 / fp16 greedy output scored against PyTorch's
    verify_fp16_on_cpu: bool = False
    force: bool = False


def check_options(options: ExportOptions) -> None:
    """Refuse options that contradict each other before the (slow) export starts."""
    problems = []
    if options.sample_size < 1:
        problems.append(f"the sample size must be at least 1, got {options.sample_size}")
    if options.references is not None and options.sample is None:
        problems.append("references were given without a sample: they must be the translations of the sample's "
                        "sentences, line by line")
    elif options.references is not None and len(options.references) != len(options.sample):
        # Misaligned files would score every sentence against another's translation, silently.
        problems.append(f"the sample has {len(options.sample)} lines and its references {len(options.references)}: "
                        "line i of the references must translate line i of the sample")
    if options.calibration is not None:
        if "int8" not in options.precisions:
            problems.append(f"a calibration sets int8's activation scales, but int8 is not among the precisions "
                            f"exported ({', '.join(options.precisions)})")
        if options.calibration_size < 1:
            problems.append(f"the calibration size must be at least 1, got {options.calibration_size}")
    if not 0 <= options.min_bleu_vs_pytorch <= 100:
        problems.append(f"the minimum BLEU against PyTorch must be between 0 and 100, got "
                        f"{options.min_bleu_vs_pytorch:g}")
    if problems:
        raise ExportError("; ".join(problems))


def export_package(checkpoint_dir: Path, out_dir: Path, options: ExportOptions,
                   log: Callable[[str], None] = print) -> ModelPackage:
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    check_options(options)
    if out_dir.exists() and not options.force:
        raise ExportError(f"{out_dir} already exists; pass --force to replace it")
    if out_dir.exists() and not replaceable(out_dir):
        # --force removes OUT_DIR: never a model repository, a checkpoint or any other directory.
        raise ExportError(f"{out_dir} exists and is not a model package (no {MANIFEST_FILE}); --force replaces only "
                          "a package or an empty directory: choose another OUT_DIR")
    model, tokenizer = load_checkpoint(checkpoint_dir)
    if problem := name_problem(package_name(model, options)):  # the default is made of the language codes
        raise ExportError(problem + " (set --name)")
    sample, references = sample_sentences(model, tokenizer, options, log)
    try:  # the package is assembled beside OUT_DIR, then moved into place
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    except OSError as error:
        raise ExportError(f"cannot write a package into {out_dir.parent}: {error.strerror}") from None
    try:
        variants = build_variants(model, staging, options, calibrate(model, tokenizer, options, log), log)
        shutil.copyfile(checkpoint_dir / TOKENIZER_FILE, staging / TOKENIZER_FILE)
        records = {
            precision: {"device": "cuda" if precision == "fp16" else "cpu", "settings": settings,
                        "files": {g: file_record(staging, staging / precision / f"{g}.onnx") for g in GRAPHS}}
            for precision, settings in variants.items()
        }
        package = ModelPackage(staging, manifest(model, staging, options, records))
        log(f"PyTorch reference: greedy on {len(sample)} sample sentences")
        expected = translate_tokens(model, tokenizer.encode(sample))
        for precision in variants:
            records[precision]["parity"] = verify_variant(
                model, package, precision, sample, references, expected, options, log)
        for precision in set(variants) - set(options.precisions):
            shutil.rmtree(staging / precision)
            records.pop(precision)
        document = manifest(model, staging, options, records)
        (staging / MANIFEST_FILE).write_text(json.dumps(document, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp made it private
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"wrote {out_dir}")
    return ModelPackage.load(out_dir)


def replaceable(out_dir: Path) -> bool:
    """Whether --force may remove out_dir: a package an earlier export wrote, or an empty directory."""
    return out_dir.is_dir() and ((out_dir / MANIFEST_FILE).is_file() or not any(out_dir.iterdir()))


def load_checkpoint(checkpoint_dir: Path) -> tuple[Transformer, Tokenizer]:
    try:
        model = load_model(checkpoint_dir)
        tokenizer = Tokenizer(checkpoint_dir / TOKENIZER_FILE)
    except (FileNotFoundError, ValueError, TypeError, json.JSONDecodeError) as error:
        raise ExportError(f"cannot load the checkpoint: {error}") from None
    except Exception as error:  # e.g. a truncated safetensors file
        raise ExportError(f"cannot load the checkpoint {checkpoint_dir}: {type(error).__name__}: {error}") from None
    c = model.config
    ids = (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id)
    problems = []
    if tokenizer.vocab_size != c.vocab_size:
        problems.append(f"the tokenizer has {tokenizer.vocab_size} pieces but the model {c.vocab_size}")
    if ids != (c.pad_id, c.unk_id, c.bos_id, c.eos_id):
        problems.append(f"tokenizer ids pad/unk/bos/eos {ids} differ from the config's "
                        f"{(c.pad_id, c.unk_id, c.bos_id, c.eos_id)}")
    if problems:
        raise ExportError(f"{checkpoint_dir}: " + "; ".join(problems) + ". Use the spm.model the model was trained with.")
    return model, tokenizer


def within_positions(model: Transformer, tokenizer: Tokenizer, sentences: Sequence[str], role: str):
    """The indices and token ids of the sentences the model can take (fewer tokens than its
    positions: EOS is added); ExportError when none can."""
    encoded = [(i, ids) for i, ids in enumerate(tokenizer.encode(sentences)) if len(ids) < model.config.max_positions]
    if not encoded:
        raise ExportError(f"every {role} sentence is longer than the model's {model.config.max_positions} positions")
    return [i for i, _ in encoded], [ids for _, ids in encoded]


def left_out_note(left_out: int) -> str:
    return f" ({left_out} too long for the model left out)" if left_out else ""


def sample_sentences(model: Transformer, tokenizer: Tokenizer, options: ExportOptions, log):
    """The user's sample, or pseudo-sentences decoded from random token ids when none is given."""
    if options.sample is not None:
        sample = list(options.sample[: options.sample_size])
        if not any(line.strip() for line in sample):
            raise ExportError("the sample file has no sentences (one source sentence a line)")
        references = list(options.references[: len(sample)]) if options.references else None
        kept, _ = within_positions(model, tokenizer, sample, "sample")
        if len(kept) < len(sample):
            log("verifying on the sample" + left_out_note(len(sample) - len(kept)))
        return [sample[i] for i in kept], [references[i] for i in kept] if references else None
    rng = np.random.default_rng(0)
    c = model.config
    ordinary = [t for t in range(c.vocab_size) if t not in (c.pad_id, c.unk_id, c.bos_id, c.eos_id)]
    token_lists = [list(rng.choice(ordinary, rng.integers(3, 20))) for _ in range(min(options.sample_size, 64))]
    return tokenizer.decode(token_lists), None


@dataclass
class Calibration:
    """Static int8 activation ranges (export.calibrate) and how many sentences gave them."""
    ranges: dict[bytes, float]
    sentences: int


def calibrate(model: Transformer, tokenizer: Tokenizer, options: ExportOptions, log) -> Calibration | None:
    if "int8" not in options.precisions or options.calibration is None:
        return None
    sentences = [line for line in options.calibration if line.strip()][: options.calibration_size]
    if not sentences:
        raise ExportError("the calibration file has no sentences (one source sentence a line)")
    _, sources = within_positions(model, tokenizer, sentences, "calibration")
    log(f"int8: calibrating activation ranges on {len(sources)} sentences"
        + left_out_note(len(sentences) - len(sources)))
    return Calibration(input_ranges(model, sources), len(sources))


def build_variants(model: Transformer, staging: Path, options: ExportOptions, calibration: Calibration | None,
                   log) -> dict[str, dict]:
    """fp32 graphs always (the others derive from them); returns precision -> build settings."""
    (staging / "fp32").mkdir()
    log("exporting fp32 graphs")
    ranges = dict(calibration.ranges) if calibration else None
    for path in export_graphs(model, staging / "fp32"):
        graph, rescaled = fold_output_scales(gemms_as_matmuls(constants_as_initializers(onnx.load(str(path)))))
        for before, after in rescaled if ranges is not None else ():
            if weight_key(before) in ranges:  # the projection keeps its calibrated range under its new weights
                ranges[weight_key(after)] = ranges[weight_key(before)]
        graph = merge_parallel_matmuls(graph)
        onnx.save(merge_reshape_chains(reshape_unit_axis_transposes(fold_reshape_shapes(graph))), str(path))
    variants = {"fp32": {}}
    for precision in options.precisions:
        if precision == "fp32":
            continue
        (staging / precision).mkdir()
        for graph in GRAPHS:
            source = onnx.load(str(staging / "fp32" / f"{graph}.onnx"))
            if precision == "int8":
                converted = quantize_int8(source, options.int8_weight_bits, ranges)
                if graph == "decoder_step":  # int8 runs on CPUs only: CPU kernels for its top-k, attention, norms
                    converted = fuse_top_k(converted, model.config.vocab_size)
                    converted = fuse_add_norm_quantize(fuse_attention(converted, model.config.max_positions))
                    converted = fuse_embedding(converted)
                converted = pack_int8_matmuls(converted)
            else:
                converted = convert_fp16(source, fp32_outputs=["log_probs", "top_log_probs", "eos_log_probs"])
            onnx.checker.check_model(converted)
            onnx.save(converted, str(staging / precision / f"{graph}.onnx"))
        variants[precision] = int8_settings(options, calibration) if precision == "int8" else {}
        log(f"built {precision} graphs")
    return variants


def int8_settings(options: ExportOptions, calibration: Calibration | None) -> dict:
    if calibration is None:
        return {"int8_weight_bits": options.int8_weight_bits, "activation_scales": "per row"}
    return {"int8_weight_bits": options.int8_weight_bits, "activation_scales": "static",
            "calibration_sentences": calibration.sentences}


def verify_variant(model, package, precision, sample, references, expected, options, log) -> dict:
    if precision == "fp16" and not cuda_available() and not options.verify_fp16_on_cpu:
        log("fp16: parity check SKIPPED: no CUDA execution provider here (install onnxruntime-gpu on a GPU "
            "machine and re-export, or pass --verify-fp16-on-cpu for a slow CPU check)")
        return {"skipped": "no CUDA execution provider on the exporting machine"}
    device = "cuda" if precision == "fp16" and cuda_available() else "cpu"
    parity: Parity = check_variant(model, Engine(package, precision, device), sample, references, expected)
    log(f"{precision}: {json.dumps(parity.as_record())}")
    failures = []
    if precision == "fp32":
        if parity.max_abs_logprob_diff > options.max_fp32_logprob_diff:
            failures.append(f"max |log-prob difference| {parity.max_abs_logprob_diff:.2e} exceeds "
                            f"{options.max_fp32_logprob_diff:.0e}")
        if parity.exact_match_rate < 1.0:
            failures.append(f"greedy output differs from PyTorch on {1 - parity.exact_match_rate:.1%} of the sample")
    elif parity.bleu_vs_pytorch < options.min_bleu_vs_pytorch:
        failures.append(f"BLEU against PyTorch's output is {parity.bleu_vs_pytorch:.1f}, below "
                        f"{options.min_bleu_vs_pytorch:.1f}")
    if failures:
        raise ExportError(f"{precision} variant does not match PyTorch: " + "; ".join(failures) +
                          ". Nothing was written. Check that the model uses only supported layers; for int8 try "
                          "--int8-weight-bits 8, or lower the threshold if this accuracy is acceptable.")
    return parity.as_record()


def package_name(model: Transformer, options: ExportOptions) -> str:
    c = model.config
    return options.name or f"{c.source_language}-{c.target_language}"


def manifest(model: Transformer, staging: Path, options: ExportOptions, variants: dict) -> dict:
    c = model.config
    return {
        "format_version": FORMAT_VERSION,
        "name": package_name(model, options),
        "source_language": c.source_language,
        "target_language": c.target_language,
        "tokenizer": file_record(staging, staging / TOKENIZER_FILE),
        "special_tokens": {"pad": c.pad_id, "unk": c.unk_id, "bos": c.bos_id, "eos": c.eos_id},
        "max_source_tokens": c.max_positions,
        "max_output_tokens": c.max_positions - 1,
        "architecture": {"vocab_size": c.vocab_size, "d_model": c.d_model, "num_heads": c.num_heads,
                         "head_dim": c.head_dim, "d_ff": c.d_ff, "encoder_layers": c.encoder_layers,
                         "decoder_layers": c.decoder_layers, "pre_norm": c.pre_norm, "activation": c.activation},
        "opset": OPSET,
        "exporter": {"parley": EXPORTER_VERSION, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "variants": variants,
    }
