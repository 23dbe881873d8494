"""The PyTorch reference search against brute force, and the decoding parameters no search takes."""

import itertools

import numpy as np
import pytest
import torch

from decoding import DecodingParams
from model.generate import generate
from tests.conftest import tiny_model


def sequence_log_prob(model, src, tokens):
    """Log-probability of tokens + EOS by full recomputation, with the decoder's pad/bos exclusion."""
    c = model.config
    tgt_in = torch.tensor([[c.bos_id] + list(tokens)])
    logits = model(torch.tensor([list(src) + [c.eos_id]]), tgt_in)[0]
    logits[:, [c.pad_id, c.bos_id]] = torch.finfo(logits.dtype).min
    log_probs = torch.log_softmax(logits, dim=-1)
    return float(sum(log_probs[t, tok] for t, tok in enumerate(list(tokens) + [c.eos_id])))


def brute_force_greedy(model, src, max_length):
    c = model.config
    tokens = []
    with torch.no_grad():
        for _ in range(max_length):
            logits = model(torch.tensor([list(src) + [c.eos_id]]), torch.tensor([[c.bos_id] + tokens]))[0, -1]
            logits[[c.pad_id, c.bos_id]] = torch.finfo(logits.dtype).min
            token = int(logits.argmax())
            if token == c.eos_id:
                break
            tokens.append(token)
    return tokens


def test_greedy_matches_full_recomputation_in_a_padded_batch():
    model = tiny_model(seed=1)
    sources = [[5, 6, 7, 8, 9, 10], [11], [12, 13, 14]]
    results = generate(model, sources, DecodingParams(beam_size=1, max_length=12))
    for src, hyps in zip(sources, results):
        assert list(hyps[0].tokens) == brute_force_greedy(model, src, 12)


def test_beam_one_equals_greedy_and_scores_are_log_probs():
    model = tiny_model(seed=2)
    sources = [[5, 6, 7], [8, 9, 10, 11, 12]]
    greedy = generate(model, sources, DecodingParams(beam_size=1, max_length=10, length_penalty=0.0))
    beam_one = generate(model, sources, DecodingParams(beam_size=1, num_hypotheses=1, max_length=10,
                                                       length_penalty=0.0))
    assert greedy == beam_one
    with torch.no_grad():
        for src, hyps in zip(sources, greedy):
            assert abs(hyps[0].score - sequence_log_prob(model, src, hyps[0].tokens)) < 1e-4


def test_beam_search_finds_the_best_sequence_by_enumeration():
    # Vocabulary: pad, unk, bos, eos + 2 words: 3 emittable non-EOS tokens; every sequence up to
    # 3 tokens (40 of them) can be scored, and a beam wider than every candidate set is exhaustive.
    model = tiny_model(seed=4, vocab_size=6)
    with torch.no_grad():
        model.embedding.weight.mul_(0.5)
    src, max_length = [4, 5, 4], 3
    emittable = [1, 4, 5]
    every = [seq for n in range(max_length + 1) for seq in itertools.product(emittable, repeat=n)]
    with torch.no_grad():
        scored = sorted(((sequence_log_prob(model, src, s), s) for s in every), reverse=True)
    hyps = generate(model, [src], DecodingParams(beam_size=128, num_hypotheses=5, max_length=max_length,
                                                 length_penalty=0.0))[0]
    assert [h.tokens for h in hyps] == [s for _, s in scored[:5]]
    assert np.allclose([h.score for h in hyps], [score for score, _ in scored[:5]], atol=1e-4)


@pytest.mark.parametrize("fields,message", [
    (dict(beam_size=0), "beam_size must be >= 1, got 0"),
    (dict(beam_size=2, num_hypotheses=3), "num_hypotheses must be between 1 and beam_size (2), got 3"),
    (dict(num_hypotheses=0), "num_hypotheses must be between 1 and beam_size (1), got 0"),
    (dict(max_length=-1, min_length=0), "max_length and min_length must be >= 0"),
    (dict(max_length=3, min_length=4), "min_length (4) must not exceed max_length (3)"),
])
def test_decoding_params_refuse_what_no_search_can_do(fields, message):
    with pytest.raises(ValueError) as error:
        DecodingParams(**fields)
    assert message in str(error.value)
