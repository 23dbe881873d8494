"""Greedy and beam search, one implementation for every backend.

A backend holds one decoder row per live hypothesis and exposes two calls:
``step(tokens) -> log_probs`` advances every row by one token, and ``select(rows)``
keeps (and reorders, and duplicates) rows of its cache. The search decides; the backend
computes. The PyTorch reference (model/generate.py) and the ONNX Runtime engine
(server/engine) both plug in here, so they agree by construction.

Beam size 1 is greedy search. Sources with the same beam size are decoded as one
vectorised group; a batch may mix groups. A source leaves the batch (its rows are
dropped from the backend) as soon as it has ``beam_size`` finished hypotheses or
reaches its length cap, so finished work costs nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class DecodingParams:
    beam_size: int = 1
    num_hypotheses: int = 1
    length_penalty: float = 1.0  # score = sum log p / length ** length_penalty
    max_length: int = 256  # output tokens, EOS not counted
    min_length: int = 0  # output tokens before EOS is allowed

    def __post_init__(self) -> None:
        problems = []
        if self.beam_size < 1:
            problems.append(f"beam_size must be >= 1, got {self.beam_size}")
        if not 1 <= self.num_hypotheses <= max(self.beam_size, 1):
            problems.append(f"num_hypotheses must be between 1 and beam_size ({self.beam_size}), got {self.num_hypotheses}")
        if self.max_length < 0 or self.min_length < 0:
            problems.append("max_length and min_length must be >= 0")
        if self.min_length > self.max_length:
            problems.append(f"min_length ({self.min_length}) must not exceed max_length ({self.max_length})")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # generated tokens, EOS excluded
    score: float  # length-normalised log-probability


class StepBackend(Protocol):
    def step(self, tokens: np.ndarray) -> np.ndarray:
        """(rows,) int64 newest tokens -> (rows, vocab) float32 log-probabilities."""

    def select(self, rows: np.ndarray) -> None:
        """Keep these rows of the cache, in this order; a row may appear more than once."""


@dataclass
class _Group:
    """The live sources that share one beam size; their rows are contiguous in the backend."""

    beam_size: int
    sources: np.ndarray  # (n,) indices into the caller's source list
    scores: np.ndarray  # (n, k) cumulative log-probabilities
    history: np.ndarray  # (n, k, t) tokens generated so far
    min_length: np.ndarray  # (n,)
    max_length: np.ndarray  # (n,)
    length_penalty: np.ndarray  # (n,)
    finished: list[list[Hypothesis]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.sources) * self.beam_size


def search(backend: StepBackend, params: Sequence[DecodingParams], bos_id: int, eos_id: int) -> list[list[Hypothesis]]:
    """Decode every source; the backend starts with one row per source, in order.

    Returns, per source, its best ``num_hypotheses`` hypotheses, best first.
    """
    results: list[list[Hypothesis]] = [[] for _ in params]
    groups = _make_groups(params)
    initial_rows = np.concatenate([np.repeat(g.sources, g.beam_size) for g in groups])
    if not np.array_equal(initial_rows, np.arange(len(params))):
        backend.select(initial_rows)
    tokens = np.full(len(initial_rows), bos_id, dtype=np.int64)
    step = 0
    while groups:
        log_probs = backend.step(tokens)
        kept_rows, next_tokens, live_groups, offset = [], [], [], 0
        for group in groups:
            group_rows = group.rows
            group_log_probs = log_probs[offset : offset + group_rows].reshape(len(group.sources), group.beam_size, -1)
            rows, group_tokens = _advance(group, group_log_probs, step, eos_id, results, params)
            kept_rows.append(rows + offset)
            next_tokens.append(group_tokens)
            if len(group.sources):
                live_groups.append(group)
            offset += group_rows
        groups = live_groups
        if not groups:
            break
        backend.select(np.concatenate(kept_rows))
        tokens = np.concatenate(next_tokens)
        step += 1
    return results


def _make_groups(params: Sequence[DecodingParams]) -> list[_Group]:
    groups = []
    for beam_size in sorted({p.beam_size for p in params}):
        sources = np.array([i for i, p in enumerate(params) if p.beam_size == beam_size])
        scores = np.full((len(sources), beam_size), -np.inf, dtype=np.float32)
        scores[:, 0] = 0.0  # all beams start identical: only the first may expand at step 0
        groups.append(
            _Group(
                beam_size=beam_size,
                sources=sources,
                scores=scores,
                history=np.zeros((len(sources), beam_size, 0), dtype=np.int64),
                min_length=np.array([params[i].min_length for i in sources]),
                max_length=np.array([params[i].max_length for i in sources]),
                length_penalty=np.array([params[i].length_penalty for i in sources], dtype=np.float64),
                finished=[[] for _ in sources],
            )
        )
    return groups


def _advance(group, log_probs, step, eos_id, results, params):
    """One search step for one group. log_probs (n, k, V) is modified in place.

    Returns the backend rows (relative to the group) to keep and the next token of each.
    """
    n, k, vocab = log_probs.shape
    too_short = step < group.min_length
    log_probs[too_short, :, eos_id] = -np.inf
    at_cap = step >= group.max_length
    if at_cap.any():  # the length cap is reached: EOS is the only choice left
        eos_scores = log_probs[at_cap, :, eos_id].copy()
        log_probs[at_cap] = -np.inf
        log_probs[at_cap, :, eos_id] = eos_scores

    with np.errstate(over="ignore"):  # -inf scores of not-yet-distinct beams plus dtype-min log-probs
        candidates = (group.scores[:, :, None] + log_probs).reshape(n, k * vocab)
    if k == 1:
        top = candidates.argmax(axis=1)[:, None]
    else:
        width = min(2 * k, k * vocab)  # 2k: at most k candidates end in EOS, so k others always remain
        top = np.argpartition(-candidates, width - 1, axis=1)[:, :width]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(candidates, top, 1), axis=1, kind="stable"), 1)
    top_scores = np.take_along_axis(candidates, top, 1)
    beams, tokens = top // vocab, top % vocab
    ends = tokens == eos_id

    final = ends[:, :k] & np.isfinite(top_scores[:, :k])
    for i, j in zip(*np.nonzero(final)):
        length = step + 1
        normalised = float(top_scores[i, j]) / length ** group.length_penalty[i]
        group.finished[i].append(Hypothesis(tuple(int(t) for t in group.history[i, beams[i, j]]), normalised))

    done = np.array([len(f) >= k for f in group.finished]) | at_cap
    for i in np.nonzero(done)[0]:
        source = int(group.sources[i])
        ranked = sorted(group.finished[i], key=lambda h: -h.score)
        results[source] = ranked[: params[source].num_hypotheses]

    live = np.nonzero(~done)[0]
    continuing = np.argsort(ends[live], axis=1, kind="stable")[:, :k]  # first k candidates not ending in EOS
    live_beams = np.take_along_axis(beams[live], continuing, 1)
    live_tokens = np.take_along_axis(tokens[live], continuing, 1)
    group.scores = np.take_along_axis(top_scores[live], continuing, 1)
    group.history = np.concatenate(
        [np.take_along_axis(group.history[live], live_beams[:, :, None], 1), live_tokens[:, :, None]], axis=2
    )
    group.sources = group.sources[live]
    group.min_length, group.max_length = group.min_length[live], group.max_length[live]
    group.length_penalty = group.length_penalty[live]
    group.finished = [group.finished[i] for i in live]
    rows = (live[:, None] * k + live_beams).reshape(-1)
    return rows, live_tokens.reshape(-1)
