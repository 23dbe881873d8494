"""Names of the graphs' inputs and outputs: the contract between the export tool and the engine.

Torch-free, so the server can import it.
"""

from __future__ import annotations

OPSET = 18
STEP_OUTPUTS = ["log_probs", "top_log_probs", "top_tokens", "eos_log_probs"]


def encoder_output_names(layers: int) -> list[str]:
    return ["src_mask"] + [f"cross_{kv}_{i}" for i in range(layers) for kv in ("k", "v")]


def decoder_input_names(layers: int) -> list[str]:
    names = ["tokens", "positions", "cache_mask", "src_mask", "slot_row", "row_slot", "top_k"]
    names += [f"cache_{kv}_{i}" for i in range(layers) for kv in ("k", "v")]
    names += [f"cross_{kv}_{i}" for i in range(layers) for kv in ("k", "v")]
    return names


def decoder_output_names(layers: int) -> list[str]:
    return STEP_OUTPUTS + [f"new_{kv}_{i}" for i in range(layers) for kv in ("k", "v")]
