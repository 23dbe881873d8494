"""The model package: what the export tool writes and the only thing the server loads.

    OUT_DIR/manifest.json        self-description (below), format_version 4
    OUT_DIR/spm.model            the SentencePiece model
    OUT_DIR/<precision>/encoder.onnx, decoder_step.onnx

This module has no torch dependency: the server reads packages with it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# 4: the int8 graphs' GEMMs of 7-bit weights are Parley's Int8MatMul op, which a server of format
# 3 lacks; 3: the int8 decoder step's embeddings are Parley's TokenEmbedding op, which a server
# of format 2 lacks; 2: the int8 decoder step runs Parley's fused attention, norm and top-k ops (domain
# ai.parley, server/engine/fused_ops.c), which a server of format 1 cannot load; 1: standard ONNX
# ops only.
FORMAT_VERSION = 4
READABLE_FORMATS = (1, 2, 3, 4)
MANIFEST_FILE = "manifest.json"
PRECISIONS = ("fp32", "int8", "fp16")
GRAPHS = ("encoder", "decoder_step")
# A model's name selects it in requests and labels its metrics, processes and temporary files.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def name_problem(name: str) -> str | None:
    if MODEL_NAME.fullmatch(name):
        return None
    return (f"model name {name!r} must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit")


class PackageError(ValueError):
    """A package that is missing, malformed or does not match its checksums."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(root: Path, path: Path) -> dict:
    return {"path": str(path.relative_to(root)), "sha256": sha256(path), "bytes": path.stat().st_size}


@dataclass(frozen=True)
class Variant:
    precision: str
    device: str  # "cpu", "cuda" or "any": where this variant is meant to run
    files: dict  # graph name -> {"path", "sha256", "bytes"}
    parity: dict  # figures measured against PyTorch at export
    settings: dict  # how it was built (e.g. int8 weight bits)


@dataclass(frozen=True)
class ModelPackage:
    root: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def source_language(self) -> str:
        return self.manifest["source_language"]

    @property
    def target_language(self) -> str:
        return self.manifest["target_language"]

    @property
    def special_tokens(self) -> dict:
        return self.manifest["special_tokens"]

    @property
    def architecture(self) -> dict:
        return self.manifest["architecture"]

    @property
    def max_source_tokens(self) -> int:
        return self.manifest["max_source_tokens"]

    @property
    def max_output_tokens(self) -> int:
        return self.manifest["max_output_tokens"]

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.manifest["tokenizer"]["path"]

    @property
    def precisions(self) -> list[str]:
        return list(self.manifest["variants"])

    def variant(self, precision: str) -> Variant:
        variants = self.manifest["variants"]
        if precision not in variants:
            raise PackageError(f"{self.root}: no {precision} variant (has {', '.join(variants) or 'none'})")
        record = variants[precision]
        return Variant(precision, record["device"], record["files"], record.get("parity", {}),
                       record.get("settings", {}))

    def graph_path(self, precision: str, graph: str) -> Path:
        return self.root / self.variant(precision).files[graph]["path"]

    def verify_files(self, precision: str | None = None) -> None:
        """Check sizes and sha256 of the tokenizer and of one variant (or all); name every mismatch."""
        records = [self.manifest["tokenizer"]]
        for name in [precision] if precision else self.precisions:
            records += list(self.variant(name).files.values())
        problems = []
        for record in records:
            path = self.root / record["path"]
            if not path.is_file():
                problems.append(f"{record['path']} is missing")
            elif path.stat().st_size != record["bytes"] or sha256(path) != record["sha256"]:
                problems.append(f"{record['path']} does not match its sha256 in the manifest (corrupted or replaced)")
        if problems:
            raise PackageError(f"{self.root}: " + "; ".join(problems) + ". Re-export the package.")

    @classmethod
    def load(cls, root: Path | str) -> "ModelPackage":
        """Read and validate a manifest (not the checksums: see verify_files)."""
        root = Path(root)
        path = root / MANIFEST_FILE
        if not path.is_file():
            raise PackageError(f"{root} is not a Parley model package: {MANIFEST_FILE} is missing")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise PackageError(f"{path} is not valid JSON: {error}") from None
        problems = validate_manifest(manifest)
        if problems:
            raise PackageError(f"{path} is invalid: " + "; ".join(problems))
        return cls(root, manifest)


REQUIRED = {
    "format_version": int, "name": str, "source_language": str, "target_language": str, "tokenizer": dict,
    "special_tokens": dict, "max_source_tokens": int, "max_output_tokens": int, "architecture": dict,
    "opset": int, "exporter": dict, "variants": dict,
}


def validate_manifest(manifest: dict) -> list[str]:
    """Every problem with a manifest, listed together."""
    if not isinstance(manifest, dict):
        return ["the manifest must be a JSON object"]
    problems = []
    for key, kind in REQUIRED.items():
        if key not in manifest:
            problems.append(f"missing '{key}'")
        elif not isinstance(manifest[key], kind):
            problems.append(f"'{key}' must be {kind.__name__}")
    if problems:
        return problems
    if problem := name_problem(manifest["name"]):
        problems.append(problem + "; re-export with --name")
    if manifest["format_version"] not in READABLE_FORMATS:
        remedy = "upgrade Parley, or re-export" if manifest["format_version"] > max(READABLE_FORMATS) else "re-export"
        problems.append(f"format_version {manifest['format_version']} is not supported (this Parley reads "
                        f"{', '.join(map(str, READABLE_FORMATS))}); {remedy} with this version's export tool")
    problems += _file_problems("tokenizer", manifest["tokenizer"])
    for token in ("pad", "unk", "bos", "eos"):
        if not isinstance(manifest["special_tokens"].get(token), int):
            problems.append(f"special_tokens.{token} must be an integer")
    for key in ("vocab_size", "d_model", "num_heads", "head_dim", "encoder_layers", "decoder_layers"):
        if not isinstance(manifest["architecture"].get(key), int):
            problems.append(f"architecture.{key} must be an integer")
    if not manifest["variants"]:
        problems.append("no variants")
    for precision, record in manifest["variants"].items():
        if precision not in PRECISIONS:
            problems.append(f"unknown precision '{precision}' (known: {', '.join(PRECISIONS)})")
            continue
        files = record.get("files") if isinstance(record, dict) else None
        if not isinstance(files, dict) or set(files) != set(GRAPHS):
            problems.append(f"variants.{precision}.files must name {' and '.join(GRAPHS)}")
            continue
        for graph, entry in files.items():
            problems += _file_problems(f"variants.{precision}.files.{graph}", entry)
    return problems


def _file_problems(where: str, entry) -> list[str]:
    """A file record's problems: path, sha256 and bytes, the path inside the package."""
    if not isinstance(entry, dict) or \
            not all(isinstance(entry.get(k), t) for k, t in (("path", str), ("sha256", str), ("bytes", int))):
        return [f"{where} needs path, sha256 and bytes"]
    path = PurePosixPath(entry["path"])
    if path.is_absolute() or ".." in path.parts:
        return [f"{where}.path '{entry['path']}' leaves the package (paths are relative to it, without '..')"]
    return []
