"""ONNX Runtime sessions for one variant of a model package."""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from export.package import GRAPHS, ModelPackage

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass
class VariantSessions:
    precision: str
    device: str
    encoder: ort.InferenceSession
    decoder: ort.InferenceSession


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def int8_gemm_can_saturate() -> bool:
    """Whether ONNX Runtime's U8S8 GEMM sums pairs of int8 products in int16 on this CPU, which
    8-bit weights can saturate (export.quantize): on x86 without VNNI (AVX512-VNNI or
    AVX-VNNI). With VNNI, and on ARM, the products accumulate in int32."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" not in flags and "avx_vnni" not in flags


def int8_saturation_warning(package: ModelPackage, precision: str, device: str) -> str | None:
    """What to tell an operator who runs 8-bit int8 weights where their GEMMs can saturate."""
    if precision != "int8" or device != "cpu" or not int8_gemm_can_saturate():
        return None
    if package.variant("int8").settings.get("int8_weight_bits") != 8:
        return None
    return (f"{package.name}: its int8 weights are 8-bit, exported for CPUs with VNNI; this x86 CPU has none, "
            f"so some integer products can saturate and translations may drift from fp32. Re-export with "
            f"--int8-weight-bits 7 (the export tool's choice on such CPUs) or serve --precision fp32")


def fused_ops_library() -> str:
    """The path of Parley's fused ops' library (server/engine/fused_ops.c), which the int8
    graphs use (export.optimize.fuse_attention, fuse_add_norm_quantize, pack_int8_matmuls, ...);
    built by the package's install."""
    spec = importlib.util.find_spec("server.engine._fused_ops")
    if spec is None or not spec.origin:
        raise RuntimeError("Parley's fused ops library (server/engine/fused_ops.c) is not built: "
                           "run `make setup` (or `pip install -e .` in the repository)")
    return spec.origin


def load_cuda_libraries() -> None:
    """Make CUDA/cuDNN libraries installed as wheels (onnxruntime-gpu[cuda,cudnn]) loadable."""
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def open_sessions(
    package: ModelPackage, precision: str, device: str = "cpu", threads: int = 0, optimization: str = "all",
    graphs: dict[str, Path] | None = None,
) -> VariantSessions:
    """Verify the variant's checksums and open its two graphs.

    threads: intra-op threads (0: ONNX Runtime's default, one per physical core).
    graphs: open these files instead of the package's: shared_graphs built them from the
    package after verifying it, so they are not verified again here.
    """
    if device not in PROVIDERS:
        raise ValueError(f"device must be one of {', '.join(PROVIDERS)}, got {device!r}")
    if device == "cuda":
        load_cuda_libraries()
    if device == "cuda" and not cuda_available():
        raise RuntimeError("device 'cuda' asked for, but this onnxruntime has no CUDAExecutionProvider "
                           "(install onnxruntime-gpu)")
    if not graphs:
        package.verify_files(precision)
    options = _session_options(threads, optimization)

    def session(graph: str) -> ort.InferenceSession:
        path = graphs[graph] if graphs else package.graph_path(precision, graph)
        return ort.InferenceSession(str(path), options, providers=PROVIDERS[device])

    return VariantSessions(precision, device, session("encoder"), session("decoder_step"))


def shared_graphs(package: ModelPackage, precision: str, optimization: str, directory: Path) -> dict[str, Path]:
    """The variant's graphs as ONNX Runtime optimizes them for the CPU, saved in `directory`
    with their weights already packed for this machine's kernels, in a file that sessions
    opened on it (open_sessions' graphs) map instead of copying.

    Processes that each open the package's graphs each pack their own copy of the weights;
    the lanes (server.engine.lanes) open these instead, so they read one copy: the mapped
    file's pages, shared. Measured, 2 lanes, int8 (7 MB of packed weights each): greedy
    batch 8 981-1,049 vs 933-1,009 sentences/s, beam 4 603-633 vs 510-585 (four rounds
    alternated). The files suit this machine and this onnxruntime only: they are rebuilt
    whenever an engine starts.
    """
    package.verify_files(precision)
    paths = {}
    for graph in GRAPHS:
        options = _session_options(1, optimization)
        paths[graph] = directory / f"{graph}.onnx"
        options.optimized_model_filepath = str(paths[graph])
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{graph}.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        ort.InferenceSession(str(package.graph_path(precision, graph)), options, providers=PROVIDERS["cpu"])
    return paths


def _session_options(threads: int, optimization: str) -> ort.SessionOptions:
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}, got {optimization!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.log_severity_level = 3
    # The engine interleaves Python (search, cache bookkeeping, detokenising) with ONNX Runtime
    # runs on the same cores: worker threads that spin after a run take those cores from it.
    # Measured with continuous batching on 2 cores: 182 -> 319 sentences/s.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.register_custom_ops_library(fused_ops_library())
    return options
