"""decoding/_native.c: the search's and the backend's per-step kernels, case by case.

The search and the engine tests cover them in use (against brute force and the PyTorch
reference); here each rule is pinned down on arrays small enough to check by hand, and bad
arguments must raise, never read or write out of bounds.
"""

import numpy as np
import pytest

from decoding import _native

EOS = 2


def beam_step(scores, values, choices, history=None, k=2, age=0, min_length=0, max_length=100, eos_values=None):
    scores, values = np.array(scores, np.float32), np.array(values, np.float32)
    n, w, _ = values.shape
    history = np.zeros((n, w, 0), np.int64) if history is None else np.array(history, np.int64)
    eos_values = np.full((n, w), -1.0, np.float32) if eos_values is None else np.array(eos_values, np.float32)
    full = lambda v: np.full(n, v, np.int64)  # noqa: E731
    return _native.beam_step(scores, values, np.array(choices, np.int64), eos_values, history, full(age),
                             full(min_length), full(max_length), k, EOS)


def test_beam_step_keeps_the_best_2k_with_ties_to_the_earlier_row_and_rank():
    top, beams, ended, capped, rows, tokens, next_scores, history, age = beam_step(
        scores=[[0.0, -1.0]], values=[[[-1.0, -2.0, -3.0], [0.0, -1.0, -5.0]]],
        choices=[[[10, 11, 12], [20, 21, 22]]], history=[[[5], [6]]])
    # totals: row 0: -1, -2, -3; row 1: -1, -2, -6 -> ties go to row 0
    np.testing.assert_array_equal(top, [[-1, -1, -2, -2]])
    np.testing.assert_array_equal(beams, [[0, 1, 0, 1]])
    assert ended == [] and capped == []
    np.testing.assert_array_equal(rows, [[0, 1]])
    np.testing.assert_array_equal(tokens, [[10, 20]])
    np.testing.assert_array_equal(next_scores, [[-1, -1]])
    np.testing.assert_array_equal(history, [[[5, 10], [6, 20]]])
    np.testing.assert_array_equal(age, [1])  # one token more


def test_beam_step_continues_the_first_k_not_ending_and_reports_ends_among_the_first_k():
    top, beams, ended, capped, rows, tokens, *_ = beam_step(
        scores=[[0.0, 0.0], [0.0, 0.0]], values=[[[-0.1, -0.2], [-0.3, -0.4]], [[-0.1, -0.2], [-0.3, -0.4]]],
        choices=[[[EOS, 11], [12, 13]], [[10, 11], [12, EOS]]])
    assert ended == [(0, 0)]  # source 1's EOS is 4th of 2k = 4, outside the first k = 2
    np.testing.assert_array_equal(tokens, [[11, 12], [10, 11]])
    np.testing.assert_array_equal(rows, [[0, 1], [2, 2]])  # numbered i * w + row


def test_beam_step_length_rules():
    values, choices = [[[-0.1, -0.5]]], [[[EOS, 7]]]
    tokens = beam_step([[0.0]], values, choices, k=1, age=1, min_length=2)[5]
    np.testing.assert_array_equal(tokens, [[7]])  # EOS masked before min_length
    top, _, ended, capped, _, tokens, *_ = beam_step([[0.0]], [[[-0.1, -0.5]]], [[[5, 7]]], k=1, age=3,
                                                     max_length=3, eos_values=[[-4.0]])
    assert capped == [0] and ended == [(0, 0)]  # at the cap only EOS is left, with its own log-probability
    np.testing.assert_array_equal(top, [[-4.0]])


def test_beam_step_fills_a_tiny_vocabulary_with_dead_candidates():
    top, beams, ended, _, rows, tokens, next_scores, *_ = beam_step([[0.0]], [[[-1.0]]], [[[EOS]]], k=2)
    np.testing.assert_array_equal(top, [[-1, -np.inf, -np.inf, -np.inf]])
    assert ended == [(0, 0)]
    np.testing.assert_array_equal(tokens, [[0, 0]])  # dead candidates continue with a token other than EOS
    assert np.isneginf(next_scores).all()


@pytest.mark.parametrize("n_scores, w", [(2, 1), (1, 0)])  # scores for 2 sources of 1; sources without rows
def test_beam_step_refuses_disagreeing_shapes(n_scores, w):
    with pytest.raises(ValueError, match="must agree"):
        _native.beam_step(np.zeros((n_scores, w), np.float32), np.zeros((1, w, 3), np.float32),
                          np.zeros((1, w, 3), np.int64), np.zeros((1, w), np.float32), np.zeros((1, w, 0), np.int64),
                          np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64), 1, EOS)


def test_plan_select_keeps_rows_in_place_and_copies_second_keeps_into_free_rows():
    lengths, row_source = np.array([3, 4, 5, 6, 0]), np.array([0, 0, 1, 1, 0])
    live = np.array([2, 0, 1, 3])  # the search's rows 0..3 are buffer rows 2, 0, 1, 3
    # keep the search's rows 1, 1, 3: buffer rows 0 (twice) and 3, which lies above the new end
    chosen, copied, targets, in_order, sources_kept, moving, holes = _native.plan_select(
        live, np.array([1, 1, 3]), 4, lengths, row_source, 2)
    np.testing.assert_array_equal(chosen, [0, 1, 2])  # row 0 stays; its second keep and row 3 fill 1 and 2
    np.testing.assert_array_equal(copied, [0, 3])
    np.testing.assert_array_equal(targets, [1, 2])
    np.testing.assert_array_equal(lengths[:3], [3, 3, 6])
    np.testing.assert_array_equal(row_source[:3], [0, 0, 1])
    assert in_order and sources_kept == 2 and len(moving) == len(holes) == 0  # both sources are still read


def test_plan_select_moves_the_sources_still_read_below_the_new_end():
    lengths, row_source = np.array([1, 1, 1, 1]), np.array([0, 1, 2, 3])
    _, _, _, in_order, sources_kept, moving, holes = _native.plan_select(np.arange(4), np.array([3, 1]), 4, lengths,
                                                                         row_source, 4)
    # rows 3 and 1 stay (row 3 moves to buffer row 0): sources 3 and 1 are read, 3 moves into entry 0
    assert in_order and sources_kept == 2 and moving.tolist() == [3] and holes.tolist() == [0]
    assert row_source[:2].tolist() == [0, 1]
    *_, in_order, _, _, _ = _native.plan_select(np.arange(3), np.array([1, 0]), 3, lengths, row_source, 3)
    assert not in_order  # rows 0 and 1 swapped places in the search's order, not in the buffers


def test_plan_select_refuses_rows_that_are_not_live():
    with pytest.raises(ValueError, match="not a live row"):
        _native.plan_select(np.arange(2), np.array([5]), 2, np.zeros(2, np.int64), np.zeros(2, np.int64), 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_write_slots_writes_each_row_at_its_slot_in_both_layouts_then_advances_the_slots(dtype):
    rows, heads, dim, positions = 3, 2, 4, 5
    keys = np.zeros((rows + 1, heads, dim, positions), dtype)  # positions last (axis 3)
    values = np.zeros((rows + 1, heads, positions, dim), dtype)  # positions on axis 2
    new_k = np.arange(rows * heads * dim, dtype=dtype).reshape(rows, heads, dim, 1) + 1
    new_v = -new_k.reshape(rows, heads, 1, dim)
    slots = np.array([0, 4, 2])
    _native.write_slots([keys, values], [3, 2], [new_k, new_v], slots)
    np.testing.assert_array_equal(slots, [1, 5, 3])
    for r, slot in enumerate([0, 4, 2]):
        np.testing.assert_array_equal(keys[r, :, :, slot], new_k[r, :, :, 0])
        np.testing.assert_array_equal(values[r, :, slot], new_v[r, :, 0])
    assert np.count_nonzero(keys) == new_k.size and np.count_nonzero(values) == new_v.size  # nothing else


def test_write_slots_refuses_a_slot_past_the_cache():
    cache = np.zeros((1, 1, 2, 3), np.float32)
    with pytest.raises(ValueError, match="slot 3 outside"):
        _native.write_slots([cache], [2], [np.zeros((1, 1, 1, 3), np.float32)], np.array([3]))
    with pytest.raises(ValueError, match="C-contiguous"):
        _native.write_slots([cache.swapaxes(2, 3)], [3], [np.zeros((1, 1, 3, 1), np.float32)], np.array([0]))


def test_cache_mask_marks_the_filled_slots_and_grows_the_capacity_in_blocks_when_a_row_needs_it():
    capacity, mask = _native.cache_mask(np.array([0, 3, 1]), 4, 16)
    assert capacity == 4
    np.testing.assert_array_equal(mask, np.arange(4) < np.array([[0], [3], [1]]))
    capacity, mask = _native.cache_mask(np.array([2, 16]), 16, 16)  # slot 16 is the 17th
    assert capacity == 32 and mask.shape == (2, 32) and mask.dtype == bool
    np.testing.assert_array_equal(mask.sum(axis=1), [2, 16])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_resized_keeps_the_used_rows_positions_and_zeroes_the_new_ones(dtype):
    values = np.arange(5 * 2 * 3 * 4, dtype=dtype).reshape(5, 2, 3, 4) + 1  # positions on axis 2: 3
    keys = values.swapaxes(2, 3).copy()  # positions on axis 3
    grown, cut = _native.resized([values, keys], [2, 3], 7, 5, 3), _native.resized([values, keys], [2, 3], 5, 2, 3)
    assert [a.shape for a in grown] == [(7, 2, 5, 4), (7, 2, 4, 5)] and [a.dtype for a in grown] == [dtype, dtype]
    assert [a.shape for a in cut] == [(5, 2, 2, 4), (5, 2, 4, 2)]
    for axis, before, after, smaller in zip((2, 3), (values, keys), grown, cut):
        if axis == 3:  # compare with the positions on axis 2
            before, after, smaller = before.swapaxes(2, 3), after.swapaxes(2, 3), smaller.swapaxes(2, 3)
        np.testing.assert_array_equal(after[:3, :, :3], before[:3])
        assert not after[:3, :, 3:].any()  # new positions are zero
        np.testing.assert_array_equal(smaller[:3], before[:3, :, :2])


def test_copy_rows_copies_whole_rows_of_every_buffer():
    a, b = np.arange(24, dtype=np.float32).reshape(4, 6), np.arange(8, dtype=np.float16).reshape(4, 1, 2)
    expected_a, expected_b = a.copy(), b.copy()
    expected_a[[0, 2]], expected_b[[0, 2]] = a[[3, 1]], b[[3, 1]]
    _native.copy_rows([a, b], np.array([3, 1]), np.array([0, 2]))
    np.testing.assert_array_equal(a, expected_a)
    np.testing.assert_array_equal(b, expected_b)
    with pytest.raises(ValueError, match="outside the buffer"):
        _native.copy_rows([a], np.array([4]), np.array([0]))


def test_query_grid_refuses_a_source_out_of_range():
    with pytest.raises(ValueError, match="reads source 3"):
        _native.query_grid(np.array([0, 3]), 2)


def reference_beam_step(scores, values, choices, eos_values, history, age, min_length, max_length, k, eos_id):
    """beam_step's documented rules, written plainly in numpy (the search's former implementation)."""
    n, w, per_row = values.shape
    values, choices = values.copy(), choices.copy()
    too_short, at_cap = age < min_length, age >= max_length
    values[too_short[:, None, None] & (choices == eos_id)] = -np.inf
    values[at_cap] = -np.inf
    values[at_cap, :, 0] = eos_values[at_cap]
    choices[at_cap, :, 0] = eos_id
    candidates = (scores[:, :, None] + values).reshape(n, w * per_row)
    width = 1 if k == 1 else 2 * k
    top = np.argsort(-candidates, axis=1, kind="stable")[:, :width]
    sources = np.arange(n)[:, None]
    top_scores, beams, tokens = candidates[sources, top], top // per_row, choices.reshape(n, -1)[sources, top]
    if top.shape[1] < width:
        missing = ((0, 0), (0, width - top.shape[1]))
        top_scores = np.pad(top_scores, missing, constant_values=-np.inf)
        beams, tokens = np.pad(beams, missing), np.pad(tokens, missing, constant_values=1 if eos_id == 0 else 0)
    ends = tokens == eos_id
    ended = [(int(i), int(j)) for i, j in zip(*np.nonzero(ends[:, :k] & np.isfinite(top_scores[:, :k])))]
    continuing = np.argsort(ends, axis=1, kind="stable")[:, :k]
    next_beams = beams[sources, continuing]
    history = np.concatenate([history[sources, next_beams], tokens[sources, continuing][:, :, None]], axis=2)
    return (top_scores, beams, ended, [int(i) for i in np.nonzero(at_cap)[0]], sources * w + next_beams,
            tokens[sources, continuing], top_scores[sources, continuing], history, age + 1)


@pytest.mark.parametrize("seed", range(40))
def test_beam_step_equals_the_plain_numpy_rules_on_random_steps(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.choice([1, 2, 4]))
    n, w = int(rng.integers(1, 6)), 1 if k == 1 else int(rng.choice([1, k]))  # newcomers have one row
    per_row, columns = int(rng.integers(1, 2 * k + 2)), int(rng.integers(0, 4))  # few candidates: dead ones fill in
    # small integers make ties common; -inf stands for masked or dead continuations
    scores = rng.integers(-3, 1, (n, w)).astype(np.float32)
    values = np.sort(rng.integers(-4, 1, (n, w, per_row)).astype(np.float32), axis=2)[:, :, ::-1].copy()
    values[rng.random(values.shape) < 0.1] = -np.inf
    choices = rng.integers(0, 5, (n, w, per_row))
    eos_values = rng.integers(-4, 0, (n, w)).astype(np.float32)
    history = rng.integers(0, 5, (n, w, columns))
    age = rng.integers(0, 4, n)
    min_length, max_length = rng.integers(0, 3, n), rng.integers(3, 5, n)
    got = _native.beam_step(scores, values, choices, eos_values, history, age, min_length, max_length, k, EOS)
    expected = reference_beam_step(scores, values, choices, eos_values, history, age, min_length, max_length, k, EOS)
    names = ["top_scores", "beams", "ended", "capped", "next_rows", "next_tokens", "next_scores", "next_history",
             "next_age"]
    assert len(got) == len(expected) == len(names)
    for name, g, e in zip(names, got, expected):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e), err_msg=name)


@pytest.mark.parametrize("seed", range(20))
def test_plan_select_equals_the_plain_numpy_rules_on_random_selections(seed):
    rng = np.random.default_rng(seed)
    used, sources = int(rng.integers(1, 12)), int(rng.integers(1, 5))
    live = rng.permutation(used)
    rows = rng.integers(0, used, int(rng.integers(0, used + 3)))  # repeats: beams continued more than once
    lengths, row_source = rng.integers(0, 9, used + 4), rng.integers(0, sources, used + 4)
    kept = len(rows)
    # the backend's former numpy version
    chosen = live[rows]
    by_row = np.argsort(chosen, kind="stable")
    stays = chosen < kept
    stays[by_row[1:][chosen[by_row[1:]] == chosen[by_row[:-1]]]] = False
    held = np.zeros(kept, bool)
    held[chosen[stays]] = True
    targets, copied = np.flatnonzero(~held), chosen[~stays]
    expected_lengths, expected_sources = lengths.copy(), row_source.copy()
    expected_lengths[targets], expected_sources[targets] = lengths[copied], row_source[copied]
    chosen[~stays] = targets
    read = np.isin(np.arange(sources), expected_sources[:kept])  # and the source entries the same way
    sources_kept = int(read.sum())
    moving, holes = np.flatnonzero(read[sources_kept:]) + sources_kept, np.flatnonzero(~read[:sources_kept])
    renumbered = np.arange(sources)
    renumbered[moving] = holes
    expected_sources[:kept] = renumbered[expected_sources[:kept]]
    got = _native.plan_select(live, rows, used, lengths, row_source, sources)
    np.testing.assert_array_equal(got[0], chosen)
    np.testing.assert_array_equal(got[1], copied)
    np.testing.assert_array_equal(got[2], targets)
    assert got[3] == np.array_equal(chosen, np.arange(kept))
    assert got[4] == sources_kept
    np.testing.assert_array_equal(got[5], moving)
    np.testing.assert_array_equal(got[6], holes)
    np.testing.assert_array_equal(lengths, expected_lengths)
    np.testing.assert_array_equal(row_source, expected_sources)
