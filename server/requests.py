"""Validation of translate requests and conversion between wire and domain types (the only place)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from decoding import DecodingParams, output_budget
from parley.v1 import translate_pb2 as pb
from server.config import ServerConfig
from server.engine.engine import TextHypothesis
from server.errors import InvalidRequest
from server.models import LoadedModel

MAX_LENGTH_PENALTY = 10.0


@dataclass
class ValidatedRequest:
    model: LoadedModel
    token_ids: list[list[int]]  # per text; empty texts have no tokens and are not decoded
    params: list[DecodingParams]


def validate(request: pb.TranslateRequest, model: LoadedModel, config: ServerConfig) -> ValidatedRequest:
    if not request.texts:
        raise InvalidRequest("texts is empty: send at least one text")
    if len(request.texts) > config.max_texts_per_request:
        raise InvalidRequest(f"{len(request.texts)} texts in one request; the limit is {config.max_texts_per_request} "
                             f"(split the request)")
    o = request.options
    beam = o.beam_size or config.default_beam_size
    hard_cap = min(config.max_output_tokens, model.package.max_output_tokens)
    problems = []
    if beam > config.max_beam_size:
        problems.append(f"beam_size {beam} exceeds the maximum of {config.max_beam_size}")
    hypotheses = o.num_hypotheses or 1
    if hypotheses > beam:
        problems.append(f"num_hypotheses {hypotheses} exceeds beam_size {beam}")
    penalty = o.length_penalty if o.HasField("length_penalty") else 1.0
    if not (math.isfinite(penalty) and 0.0 <= penalty <= MAX_LENGTH_PENALTY):
        problems.append(f"length_penalty must be between 0 and {MAX_LENGTH_PENALTY:g}, got {penalty}")
    if o.max_output_tokens > hard_cap:
        problems.append(f"max_output_tokens {o.max_output_tokens} exceeds the limit of {hard_cap}")
    if o.max_output_tokens and o.min_output_tokens > o.max_output_tokens:
        problems.append(f"min_output_tokens {o.min_output_tokens} exceeds max_output_tokens {o.max_output_tokens}")
    if o.min_output_tokens > hard_cap:
        problems.append(f"min_output_tokens {o.min_output_tokens} exceeds the limit of {hard_cap}")
    token_ids = model.engine.tokenizer.encode(list(request.texts))
    limit = min(config.max_tokens_per_text, model.max_input_tokens)
    too_long = [(i, len(ids)) for i, ids in enumerate(token_ids) if len(ids) > limit]
    for i, count in too_long[:5]:
        problems.append(f"text {i} has {count} tokens; the limit is {limit} tokens per text (split it)")
    if len(too_long) > 5:
        problems.append(f"and {len(too_long) - 5} more texts over the limit")
    if problems:
        raise InvalidRequest("; ".join(problems))
    params = [
        DecodingParams(
            beam_size=beam, num_hypotheses=hypotheses, length_penalty=penalty,
            max_length=o.max_output_tokens or max(output_budget(len(ids), hard_cap), o.min_output_tokens),
            min_length=o.min_output_tokens,
        )
        for ids in token_ids
    ]
    return ValidatedRequest(model, token_ids, params)


def translation_pb(index: int, hypotheses: list[TextHypothesis]) -> pb.Translation:
    return pb.Translation(
        index=index,
        hypotheses=[pb.Hypothesis(text=h.text, score=h.score, token_count=h.tokens) for h in hypotheses],
    )


def empty_translation() -> list[TextHypothesis]:
    """An empty text translates to an empty text, with certainty."""
    return [TextHypothesis("", 0.0, 0)]
