"""Greedy and beam search, one implementation for every backend.

A backend holds one decoder row per live hypothesis and exposes:
``step(tokens, top_k) -> Candidates`` advances every row by one token and returns each
row's top_k tokens with their log-probabilities (and the EOS log-probability);
``select(rows)`` keeps (reorders, duplicates) rows of its cache. The search decides; the
backend computes. Selecting per row in the backend (ONNX Runtime's TopK, torch.topk)
keeps the (rows x vocabulary) matrix out of Python: the best 2k continuations of a
source are always among the best 2k + 1 of each of its rows, EOS included or excluded.
The PyTorch reference (model/generate.py) and the ONNX Runtime engine (server/engine)
both plug in here, so they agree by construction.

Beam size 1 is greedy search. Sources with the same beam size form one vectorised
group, and a batch may mix groups. A new source starts with one row (all its beams would
be identical) and grows to beam_size rows after its first step, in a group of newcomers
that then merges into its beam size's group. Sources may join a running search at any step
(continuous batching: the backend appends their rows, ``Search.add`` adopts them) and
leave it as soon as they have ``beam_size`` finished hypotheses, reach their length
cap, or are cancelled, so finished work costs nothing more.

A step's arithmetic (the length rules, each source's best 2k continuations, the beams that go
on and their histories) is C, decoding/_native.c's beam_step: as numpy it was some twenty
calls of about a microsecond each on arrays of a few dozen numbers. What is decided here,
in Python, is which sources finish and with which hypotheses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Protocol, Sequence

import numpy as np

from decoding import _native


@dataclass(frozen=True)
class DecodingParams:
    beam_size: int = 1
    num_hypotheses: int = 1
    length_penalty: float = 1.0  # score = sum log p / length ** length_penalty
    max_length: int = 256  # output tokens, EOS not counted (the engine caps it at the model's positions)
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


def output_budget(source_tokens: int, hard_cap: int) -> int:
    """The default output-length rule: twice the input plus 10 tokens, under a hard cap."""
    return min(2 * source_tokens + 10, hard_cap)


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # generated tokens, EOS excluded
    score: float  # length-normalised log-probability


@dataclass
class Candidates:
    """The best continuations of every row after one step."""

    log_probs: np.ndarray  # (rows, K) float32, best first
    tokens: np.ndarray  # (rows, K) int64
    eos_log_probs: np.ndarray  # (rows,) float32


class StepBackend(Protocol):
    vocab_size: int

    def step(self, tokens: np.ndarray, top_k: int) -> Candidates:
        """Feed (rows,) int64 newest tokens; return each row's top_k continuations."""

    def select(self, rows: np.ndarray) -> None:
        """Keep these rows of the cache, in this order; a row may appear more than once."""


_PER_SOURCE = ("scores", "history", "age", "min_length", "max_length", "length_penalty")  # arrays, one row each


class _Group:
    """Live sources sharing one beam size k and one number of rows each (width: 1 before their
    first step, then k); their n * width rows are contiguous in the backend.

    history holds each source's tokens right-aligned: source i's are the last age[i] columns.
    """

    def __init__(self, beam_size: int, width: int):
        self.k, self.width = beam_size, width
        self.keys: list[Hashable] = []
        self.scores = np.zeros((0, width), np.float32)  # cumulative log-probabilities
        self.history = np.zeros((0, width, 0), np.int64)
        self.age = np.zeros(0, np.int64)  # tokens generated so far
        self.min_length = np.zeros(0, np.int64)
        self.max_length = np.zeros(0, np.int64)
        self.length_penalty = np.zeros(0, np.float64)
        self.num_hypotheses: list[int] = []
        self.finished: list[list[Hypothesis]] = []

    @property
    def rows(self) -> int:
        return len(self.keys) * self.width

    def append(self, keys: Sequence[Hashable], params: Sequence[DecodingParams]) -> None:
        """New sources, one row each (a group of newcomers, width 1)."""
        m = len(keys)
        self.keys += list(keys)
        self.scores = np.concatenate([self.scores, np.zeros((m, 1), np.float32)])
        self.history = np.concatenate([self.history, np.zeros((m, 1, self.history.shape[2]), np.int64)])
        self.age = np.concatenate([self.age, np.zeros(m, np.int64)])
        self.min_length = np.concatenate([self.min_length, [p.min_length for p in params]]).astype(np.int64)
        self.max_length = np.concatenate([self.max_length, [p.max_length for p in params]]).astype(np.int64)
        self.length_penalty = np.concatenate([self.length_penalty, [p.length_penalty for p in params]])
        self.num_hypotheses += [p.num_hypotheses for p in params]
        self.finished += [[] for _ in keys]

    def absorb(self, other: _Group) -> None:
        """Append another group's sources (same beam size and width), in order."""
        columns = max(self.history.shape[2], other.history.shape[2])
        for group in (self, other):  # histories are right-aligned: pad the shorter on the left
            group.history = np.pad(group.history, ((0, 0), (0, 0), (columns - group.history.shape[2], 0)))
        self.keys += other.keys
        self.num_hypotheses += other.num_hypotheses
        self.finished += other.finished
        for name in _PER_SOURCE:
            setattr(self, name, np.concatenate([getattr(self, name), getattr(other, name)]))

    def keep(self, live: np.ndarray) -> None:
        """Keep these sources (indices), dropping the rest."""
        indices = live.tolist()  # Python ints index lists several times faster than numpy's
        self.keys = [self.keys[i] for i in indices]
        self.num_hypotheses = [self.num_hypotheses[i] for i in indices]
        self.finished = [self.finished[i] for i in indices]
        for name in _PER_SOURCE:
            setattr(self, name, getattr(self, name)[live])
        width = int(self.age.max(initial=0))
        self.history = self.history[:, :, self.history.shape[2] - width :]  # drop columns no live source uses

    def tokens_of(self, i: int, beam: int) -> tuple[int, ...]:
        age = int(self.age[i])
        return tuple(self.history[i, beam, self.history.shape[2] - age :].tolist()) if age else ()

    def _ended(self, i: int, beam: int, total: float) -> Hypothesis:
        """Source i's beam ending with EOS at this step: its tokens and length-normalised score."""
        length = int(self.age[i]) + 1
        return Hypothesis(self.tokens_of(i, beam), float(total) / length ** self.length_penalty[i])

    def advance(self, values: np.ndarray, choices: np.ndarray, eos_values: np.ndarray,
                eos_id: int) -> tuple[np.ndarray, np.ndarray, list]:
        """One step for this group, from each row's best K continuations.

        values, choices (n, width, K): each row's best K log-probabilities and tokens;
        eos_values (n, width). Returns the rows (relative to the group) to keep, k per live
        source from now on, each kept row's next token, and the (key, hypotheses) of sources
        that finished. The step's arithmetic is decoding/_native.c's beam_step.
        """
        n, k = len(values), self.k
        top_scores, beams, ended, capped, rows, next_tokens, next_scores, history, next_age = _native.beam_step(
            self.scores, values, choices, eos_values, self.history, self.age, self.min_length, self.max_length,
            k, eos_id)
        done = set(capped)  # at their length cap, or with k finished hypotheses (they had fewer before)
        for i, j in ended:
            self.finished[i].append(self._ended(i, int(beams[i, j]), top_scores[i, j]))
            if len(self.finished[i]) >= k:
                done.add(i)
        self.history, self.scores, self.age = history, next_scores, next_age
        self.width = k
        if not done:
            return rows.reshape(-1), next_tokens.reshape(-1), []
        results = [(self.keys[i], sorted(self.finished[i], key=lambda h: -h.score)[: self.num_hypotheses[i]])
                   for i in sorted(done)]
        live = np.array([i for i in range(n) if i not in done], np.int64)
        self.keep(live)
        return rows[live].reshape(-1), next_tokens[live].reshape(-1), results


class Search:
    """The decoding state of every live source on one backend."""

    def __init__(self, backend: StepBackend, bos_id: int, eos_id: int):
        self.backend = backend
        self.bos_id, self.eos_id = bos_id, eos_id
        # In backend row order: by beam size, and within one beam size the older (wider) groups first.
        self.groups: list[_Group] = []
        self.tokens = np.zeros(0, np.int64)  # next input token of every backend row

    @property
    def rows(self) -> int:
        return sum(g.rows for g in self.groups)

    def __len__(self) -> int:
        return sum(len(g.keys) for g in self.groups)

    def add(self, keys: Sequence[Hashable], params: Sequence[DecodingParams]) -> None:
        """Adopt new sources whose rows the backend has just appended, one row each, in order."""
        existing = self.rows
        old_rows, offset = {}, 0
        for group in self.groups:
            old_rows[id(group)] = np.arange(offset, offset + group.rows)
            offset += group.rows
        joining: dict[int, list[int]] = {}  # id(group) -> the new sources it takes
        for k in sorted({p.beam_size for p in params}):
            at = sum(g.k <= k for g in self.groups)  # newcomers go after the groups of their beam size
            if at and self.groups[at - 1].k == k and self.groups[at - 1].width == 1:
                target = self.groups[at - 1]
            else:
                target = _Group(k, 1)
                self.groups.insert(at, target)
            joining[id(target)] = [j for j, p in enumerate(params) if p.beam_size == k]
        layout, tokens = [], []
        for group in self.groups:
            old, new = old_rows.get(id(group), np.zeros(0, np.int64)), joining.get(id(group), [])
            layout += [old, existing + np.array(new, dtype=np.int64)]
            tokens += [self.tokens[old], np.full(len(new), self.bos_id, np.int64)]
            if new:
                group.append([keys[j] for j in new], [params[j] for j in new])
        self._select(np.concatenate(layout), existing + len(keys))
        self.tokens = np.concatenate(tokens)

    def step(self) -> list[tuple[Hashable, list[Hypothesis]]]:
        """Advance every live source by one token; returns the sources that finished."""
        groups = self.groups
        widest = max([g.k for g in groups])
        step = self.backend.step(self.tokens, min(2 * widest + 1, self.backend.vocab_size))
        kept, next_tokens, finished, offset = [], [], [], 0
        for group in groups:
            rows, shape = group.rows, (len(group.keys), group.width)
            values, choices, eos_values = step.log_probs, step.tokens, step.eos_log_probs
            if len(groups) > 1:  # this group's rows of the step's
                values, choices, eos_values = (a[offset : offset + rows] for a in (values, choices, eos_values))
            kept_rows, tokens, results = group.advance(values.reshape(*shape, -1), choices.reshape(*shape, -1),
                                                       eos_values.reshape(shape), self.eos_id)
            kept.append(kept_rows + offset if offset else kept_rows)
            next_tokens.append(tokens)
            finished += results
            offset += rows
        if finished:
            self._forget_empty_groups()
        if widest > 1 or finished:  # greedy rows stay where they are until a source finishes
            self._select(_joined(kept), offset)
        self.tokens = _joined(next_tokens)
        if len(self.groups) > 1:
            self._merge_equal_neighbours()
        return finished

    def cancel(self, keys: set) -> list[Hashable]:
        """Drop these sources if live; returns the keys that were dropped."""
        kept, tokens, dropped, offset = [], [], [], 0
        for group in self.groups:
            live = np.array([i for i, key in enumerate(group.keys) if key not in keys], dtype=np.int64)
            dropped += [key for key in group.keys if key in keys]
            rows = (offset + live[:, None] * group.width + np.arange(group.width)).reshape(-1)
            kept.append(rows)
            tokens.append(self.tokens[rows])
            offset += group.rows
            group.keep(live)
        if dropped:
            self._forget_empty_groups()
            self._select(np.concatenate(kept), offset)
            self.tokens = np.concatenate(tokens)
        return dropped

    def _forget_empty_groups(self) -> None:
        self.groups = [g for g in self.groups if g.keys]

    def _merge_equal_neighbours(self) -> None:
        """Newcomers have k rows each after their first step: they join the group before them,
        whose rows they directly follow, so the backend's rows stay where they are."""
        merged: list[_Group] = []
        for group in self.groups:
            if merged and (merged[-1].k, merged[-1].width) == (group.k, group.width):
                merged[-1].absorb(group)
            else:
                merged.append(group)
        self.groups = merged

    def _select(self, rows: np.ndarray, current_rows: int) -> None:
        if not np.array_equal(rows, np.arange(current_rows)):
            self.backend.select(rows)


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """The groups' arrays end to end (a step has at least one group; most have one)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def search(backend: StepBackend, params: Sequence[DecodingParams], bos_id: int, eos_id: int) -> list[list[Hypothesis]]:
    """Decode every source; the backend starts with one row per source, in order.

    Returns, per source, its best ``num_hypotheses`` hypotheses, best first.
    """
    state = Search(backend, bos_id, eos_id)
    state.add(list(range(len(params))), params)
    results: list[list[Hypothesis]] = [[] for _ in params]
    while len(state):
        for key, hypotheses in state.step():
            results[key] = hypotheses
    return results
