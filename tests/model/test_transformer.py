import math

import numpy as np
import pytest
import torch

from decoding.padding import pad_batch
from model.checkpoint import load_model, save_model
from model.config import ModelConfig
from model.generate import TorchStepBackend
from model.layers import Packing, scaled_dot_product, sinusoidal_table
from model.transformer import causal_mask
from tests.conftest import tiny_model


def test_positional_encoding_matches_formula():
    d_model = 8
    table = sinusoidal_table(50, d_model)
    for pos in (0, 1, 7, 49):
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_padded_keys_get_zero_attention_weight():
    torch.manual_seed(0)
    q, v = (torch.randn(2, 2, 3, 4) for _ in range(2))
    k = torch.randn(2, 2, 4, 3)  # keys transposed, as caches hold them
    mask = torch.tensor([[True, True, True], [True, False, False]])[:, None, None, :]
    out = scaled_dot_product(q, k, v, mask)
    v_poisoned = v.clone()
    v_poisoned[1, :, 1:] = 1e6  # values behind the mask: must not leak into the output
    assert torch.equal(scaled_dot_product(q, k, v_poisoned, mask), out)
    assert torch.allclose(out[1], v[1, :, :1].expand(2, 3, 4))  # only one key visible: its value, exactly


def test_source_padding_does_not_change_encoding(model):
    alone, _ = model.encode(torch.tensor([[5, 6, 7, 3]]))
    batch = torch.from_numpy(pad_batch([[5, 6, 7, 3], [8, 9, 10, 11, 12, 13, 3]], 0))
    padded, mask = model.encode(batch)
    assert mask[0].tolist() == [True] * 4 + [False] * 3
    assert torch.allclose(padded[0, :4], alone[0], atol=1e-5)


def test_the_encoder_layers_run_on_real_positions_only(model):
    """Projections and feed-forward see each source's tokens, never its padding (Packing)."""
    seen = []
    hook = model.encoder_layers[0].feed_forward.linear1.register_forward_hook(
        lambda _module, args, _out: seen.append(args[0].shape[0]))
    batch = torch.from_numpy(pad_batch([[5, 6, 3], [8, 9, 10, 11, 12, 13, 3], [7, 3]], 0))
    try:
        model.encode(batch)
    finally:
        hook.remove()
    assert seen == [3 + 7 + 2]


def test_packing_keeps_the_real_positions_in_order_and_puts_them_back():
    mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    packing = Packing(mask)
    x = torch.arange(18.0).view(3, 3, 2)
    packed = packing.pack(x)
    assert packed.tolist() == x[mask].tolist()
    assert torch.equal(packing.unpack(packed)[mask], x[mask])
    assert torch.isfinite(packing.unpack(packed)).all()


def test_causal_mask_forbids_the_future(model):
    assert causal_mask(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    src = torch.tensor([[5, 6, 7, 3]])
    tgt = torch.tensor([[2, 8, 9, 10, 11]])
    changed = tgt.clone()
    changed[0, 3:] = torch.tensor([12, 13])
    a, b = model(src, tgt), model(src, changed)
    assert torch.allclose(a[0, :3], b[0, :3], atol=1e-6)
    assert not torch.allclose(a[0, 3], b[0, 3], atol=1e-3)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_incremental_decoding_matches_full_recomputation(pre_norm):
    model = tiny_model(seed=3, pre_norm=pre_norm)
    src_lists = [[5, 6, 7, 3], [8, 9, 3]]
    src = torch.from_numpy(pad_batch(src_lists, 0))
    tgt = torch.tensor([[2, 10, 11, 12, 13], [2, 14, 15, 16, 17]])
    with torch.no_grad():
        full = torch.log_softmax(model(src, tgt), dim=-1)  # (B, T, V)
        backend = TorchStepBackend(model, src, capacity=tgt.size(1))
        for t in range(tgt.size(1)):
            step = torch.from_numpy(backend.step_log_probs(tgt[:, t].numpy()))
            allowed = [i for i in range(model.config.vocab_size) if i not in (model.config.pad_id, model.config.bos_id)]
            # The step forbids pad/bos, which renormalises; compare the allowed tokens' relative scores.
            expected = torch.log_softmax(full[:, t, allowed], dim=-1)
            assert torch.allclose(step[:, allowed], expected, atol=1e-5), t


def test_save_load_round_trip_is_exact(tmp_path, model):
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    src, tgt = torch.tensor([[5, 6, 3]]), torch.tensor([[2, 7]])
    assert torch.equal(model(src, tgt), loaded(src, tgt))


def test_load_names_every_problem(tmp_path, model):
    save_model(model, tmp_path)
    other = ModelConfig(**{**model.config.__dict__, "d_model": 32, "d_ff": 64})
    other.save(tmp_path / "config.json")
    with pytest.raises(ValueError, match="shape"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        load_model(tmp_path)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="divisible.*activation"):
        ModelConfig(vocab_size=10, d_model=10, num_heads=3, activation="tanh")
