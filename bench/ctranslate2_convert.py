"""Build a CTranslate2 model from a Parley checkpoint with CTranslate2's spec API.

    python -m bench.ctranslate2_convert model/default OUT_DIR [--quantization int8]

The spec is filled weight by weight from model.safetensors, so CTranslate2 runs the
very same network: same sinusoidal table, sqrt(d_model) embedding scale, post-LN blocks,
tied output projection, LayerNorm epsilon 1e-5, and EOS appended to every source.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ctranslate2
import numpy as np
from ctranslate2.specs import common_spec, transformer_spec
from safetensors.numpy import load_file

from decoding.tokenizer import Tokenizer
from model.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from model.config import ModelConfig
from model.layers import sinusoidal_table


class ParleyConverter(ctranslate2.converters.Converter):
    def __init__(self, checkpoint_dir: Path):
        self.checkpoint_dir = Path(checkpoint_dir)

    def _load(self) -> transformer_spec.TransformerSpec:
        config = ModelConfig.load(self.checkpoint_dir / CONFIG_FILE)
        weights = load_file(str(self.checkpoint_dir / WEIGHTS_FILE))
        activation = {"relu": common_spec.Activation.RELU, "gelu": common_spec.Activation.GELU}[config.activation]
        spec = transformer_spec.TransformerSpec.from_config(
            (config.encoder_layers, config.decoder_layers), config.num_heads, pre_norm=config.pre_norm,
            activation=activation)
        spec.config.layer_norm_epsilon = 1e-5  # torch.nn.LayerNorm's default
        spec.config.add_source_eos = True
        spec.config.decoder_start_token = "<s>"
        positions = sinusoidal_table(config.max_positions, config.d_model).numpy()
        for stack, prefix in ((spec.encoder, "encoder"), (spec.decoder, "decoder")):
            embeddings = stack.embeddings[0] if isinstance(stack.embeddings, list) else stack.embeddings
            embeddings.weight = weights["embedding.weight"]
            stack.position_encodings.encodings = positions
            stack.scale_embeddings = True
            if config.pre_norm:
                set_layer_norm(stack.layer_norm, weights, f"{prefix}_norm")
        for i, layer in enumerate(spec.encoder.layer):
            scope = f"encoder_layers.{i}"
            set_attention(layer.self_attention, weights, f"{scope}.self_attn", self_attention=True)
            set_layer_norm(layer.self_attention.layer_norm, weights, f"{scope}.attn_block.norm")
            set_ffn(layer.ffn, weights, scope)
        for i, layer in enumerate(spec.decoder.layer):
            scope = f"decoder_layers.{i}"
            set_attention(layer.self_attention, weights, f"{scope}.self_attn", self_attention=True)
            set_layer_norm(layer.self_attention.layer_norm, weights, f"{scope}.self_block.norm")
            set_attention(layer.attention, weights, f"{scope}.cross_attn", self_attention=False)
            set_layer_norm(layer.attention.layer_norm, weights, f"{scope}.cross_block.norm")
            set_ffn(layer.ffn, weights, scope)
        spec.decoder.projection.weight = weights["embedding.weight"]  # tied output projection
        spec.decoder.projection.bias = np.zeros(config.vocab_size, dtype=np.float32)
        tokenizer = Tokenizer(self.checkpoint_dir / TOKENIZER_FILE)
        pieces = [tokenizer.processor.id_to_piece(i) for i in range(tokenizer.vocab_size)]
        spec.register_source_vocabulary(pieces)
        spec.register_target_vocabulary(pieces)
        return spec


def set_linear(spec, weights, scope: str) -> None:
    spec.weight = weights[f"{scope}.weight"]
    spec.bias = weights[f"{scope}.bias"]


def set_layer_norm(spec, weights, scope: str) -> None:
    spec.gamma = weights[f"{scope}.weight"]
    spec.beta = weights[f"{scope}.bias"]


def set_attention(spec, weights, scope: str, self_attention: bool) -> None:
    q, k, v, out = (f"{scope}.{name}_proj" for name in ("q", "k", "v", "out"))
    if self_attention:  # CTranslate2 fuses Q, K and V into one matrix
        spec.linear[0].weight = np.concatenate([weights[f"{p}.weight"] for p in (q, k, v)])
        spec.linear[0].bias = np.concatenate([weights[f"{p}.bias"] for p in (q, k, v)])
    else:  # and K, V of cross-attention
        set_linear(spec.linear[0], weights, q)
        spec.linear[1].weight = np.concatenate([weights[f"{p}.weight"] for p in (k, v)])
        spec.linear[1].bias = np.concatenate([weights[f"{p}.bias"] for p in (k, v)])
    set_linear(spec.linear[-1], weights, out)


def set_ffn(spec, weights, scope: str) -> None:
    set_layer_norm(spec.layer_norm, weights, f"{scope}.ff_block.norm")
    set_linear(spec.linear_0, weights, f"{scope}.feed_forward.linear1")
    set_linear(spec.linear_1, weights, f"{scope}.feed_forward.linear2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--quantization", choices=["int8", "float32", "int8_float32"])
    args = parser.parse_args()
    ParleyConverter(args.checkpoint_dir).convert(str(args.out_dir), quantization=args.quantization, force=True)


if __name__ == "__main__":
    main()
