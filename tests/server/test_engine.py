"""The ONNX Runtime engine: batch independence, beams, n-best, length limits, parity with PyTorch."""

import itertools
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from decoding import DecodingParams
from export.package import ModelPackage, PackageError
from model.checkpoint import load_model
from model.generate import generate
from server.engine.engine import Engine, default_precision
from server.engine.lanes import STEP_ROWS, Job, LaneEngine, _LaneLoop, from_wire, length_shares, to_wire


@pytest.fixture(scope="module")
def engines(tiny_package):
    package = ModelPackage.load(tiny_package)
    engines = {precision: Engine(package, precision=precision, device="cpu") for precision in ("fp32", "int8")}
    # Caches kept as ONNX Runtime values with IO binding, as on CUDA, here on the CPU provider.
    engines["fp32-on-device"] = Engine(package, precision="fp32", device="cpu", cache_on_device=True)
    return engines


def mixed_sources(n, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(4, 120, size=rng.integers(1, 40))) for _ in range(n)]  # padding-heavy mix


@pytest.mark.parametrize("precision", ["fp32", "int8", "fp32-on-device"])
def test_a_sentence_decodes_the_same_alone_and_in_a_batch_of_64(engines, precision):
    engine = engines[precision]
    sources = mixed_sources(64)
    params = [DecodingParams(beam_size=(1, 2, 4)[i % 3], num_hypotheses=1, max_length=30) for i in range(64)]
    together = engine.decode(sources, params)
    for i in range(0, 64, 5):
        alone = engine.decode([sources[i]], [params[i]])[0]
        assert [h.tokens for h in alone] == [h.tokens for h in together[i]], i


@pytest.mark.parametrize("variant", ["fp32", "fp32-on-device"])
def test_sources_joining_a_running_batch_decode_as_alone(engines, variant):
    """Continuous batching: sources of several beam sizes join at different steps, some while
    others of their beam size are running, and cancellations reorder the rest."""
    engine = engines[variant]
    sources = mixed_sources(9, seed=4)
    params = [DecodingParams(beam_size=(2, 3, 1)[i % 3], num_hypotheses=1, max_length=20) for i in range(9)]
    batch, results = engine.new_search(), {}
    for first, last, steps in ((0, 2, 2), (2, 5, 1), (5, 6, 0), (6, 9, 3)):  # (5, 6, 0): two joins, no step between
        engine.admit(batch, range(first, last), sources[first:last], params[first:last])
        for _ in range(steps):
            results.update(batch.step())
    assert batch.cancel({7}) == [7]
    while len(batch):
        results.update(batch.step())
    for i in set(range(9)) - {7}:
        alone = engines["fp32"].decode([sources[i]], [params[i]])[0]
        assert [h.tokens for h in results[i]] == [h.tokens for h in alone], i


def test_an_emptied_batch_gives_up_its_cache_slots(engines):
    """A lane's batch lives on between bursts of work: sources joining an emptied batch start
    with no cache slots, as in a new batch, rather than attending over slots nobody fills."""
    engine = engines["int8"]
    sources = mixed_sources(6, seed=6)
    params = [DecodingParams(max_length=40, min_length=20)] * 6
    batch = engine.new_search()
    engine.admit(batch, range(3), sources[:3], params[:3])
    first = {}
    while len(batch):
        first.update(batch.step())
    assert batch.backend.buffers.capacity == 0
    engine.admit(batch, range(3, 6), sources[3:], params[3:])
    batch.step()
    assert batch.backend.buffers.capacity == 16  # one block, as a new batch has after its first step
    second = dict(batch.step())
    while len(batch):
        second.update(batch.step())
    assert [second[i][0].tokens for i in range(3, 6)] == [hyps[0].tokens for hyps in engine.decode(sources[3:], params[3:])]


def test_the_padding_ratio_follows_the_sources_as_they_join_and_leave(engines):
    """The lane reports it at every step; the backend keeps it until the sources change."""
    engine = engines["int8"]
    sources = [[5] * 2, [6] * 30, [7] * 9]
    params = [DecodingParams(beam_size=2, max_length=n, min_length=n) for n in (2, 12, 6)]  # they leave in turn
    batch = engine.new_search()
    engine.admit(batch, range(2), sources[:2], params[:2])
    checked = set()  # numbers of sources in use when the ratio was checked
    for step in range(20):
        if step == 1:
            engine.admit(batch, [2], sources[2:], params[2:])
        backend = batch.backend
        fresh = 1.0 - backend.src_mask[: backend.sources].mean() if backend.sources else 0.0
        assert backend.padding_ratio == pytest.approx(fresh), step
        checked.add(backend.sources)
        if not len(batch):
            break
        batch.step()
    assert checked == {0, 1, 2, 3}


def test_two_lane_processes_decode_what_one_engine_decodes(engines, tiny_package):
    two_lanes = LaneEngine(ModelPackage.load(tiny_package), precision="int8", device="cpu", threads=2, lanes=2)
    try:
        assert (two_lanes.precision, two_lanes.device) == ("int8", "cpu")
        sources = mixed_sources(9, seed=5)
        params = [DecodingParams(beam_size=(1, 3)[i % 2], num_hypotheses=(1, 2)[i % 2], max_length=20) for i in range(9)]
        expected = engines["int8"].decode(sources, params)

        def same(results, wanted):
            assert [[h.tokens for h in hyps] for hyps in results] == [[h.tokens for h in hyps] for hyps in wanted]
            assert [h.score for hyps in results for h in hyps] == \
                pytest.approx([h.score for hyps in wanted for h in hyps], abs=1e-5)  # other batch mates: float noise

        for lane in two_lanes.lanes:  # the weights packed once, in files every lane maps
            assert str(two_lanes.shared_dir) in Path(f"/proc/{lane.process.pid}/maps").read_text()
        for _ in range(2):  # the lanes' batches run on after the first call
            same(two_lanes.decode(sources, params), expected)
        with pytest.raises(ValueError, match="exceeds the model's limit"):
            two_lanes.decode([[5] * (two_lanes.max_source_tokens + 1)], params[:1])
        same(two_lanes.decode(sources[:1], params[:1]), expected[:1])  # the refusal left the lanes as they were
    finally:
        shared = two_lanes.shared_dir
        two_lanes.close()
    assert all(not lane.process.is_alive() for lane in two_lanes.lanes)
    assert not shared.exists()
    with pytest.raises(ValueError, match="lanes must be >= 1"):
        LaneEngine(ModelPackage.load(tiny_package), precision="int8", device="cpu", lanes=0)


def test_a_lane_admits_the_texts_of_all_waiting_messages_in_one_encoder_run(engines):
    """Under load the scheduler sends a lane one message per arriving text; the lane encodes
    every text that is waiting together, as the in-process engine would."""
    parent_end, lane_end = multiprocessing.Pipe()
    loop = _LaneLoop(engines["int8"], lane_end)
    runs = []
    encode = loop.batch.backend.buffers.encode
    loop.batch.backend.buffers.encode = lambda src_tokens: (runs.append(len(src_tokens)), encode(src_tokens))[1]
    sources = mixed_sources(3, seed=7)
    for i, source in enumerate(sources):
        parent_end.send(to_wire(("admit", [Job(i, source, DecodingParams(max_length=10))])))
    parent_end.send(("cancel", [2]))
    assert loop._take_messages()
    assert runs == [3]
    assert [e.key for e in loop.endings] == [2] and loop.endings[0].reason == "cancelled"
    assert sorted(loop.deadlines) == [0, 1]
    # One text that cannot be admitted fails alone, not the texts that arrived with it.
    too_long = [5] * (engines["int8"].max_source_tokens + 1)
    for key, source in ((3, sources[0]), (4, too_long), (5, sources[1])):
        parent_end.send(to_wire(("admit", [Job(key, source, DecodingParams(max_length=10))])))
    assert loop._take_messages()
    assert [(e.key, "exceeds the model's limit" in e.reason) for e in loop.endings[1:]] == [(4, True)]
    assert sorted(loop.deadlines) == [0, 1, 3, 5]


def test_an_idle_lane_returns_its_freed_memory_after_a_lull(engines, monkeypatch):
    import server.engine.lanes as lanes

    returned = []
    monkeypatch.setattr(lanes, "return_freed_memory", lambda: returned.append(time.monotonic()))
    monkeypatch.setattr(lanes, "IDLE_RETURN_S", 1.0)
    parent_end, lane_end = multiprocessing.Pipe()
    loop = _LaneLoop(engines["int8"], lane_end)
    job = to_wire(("admit", [Job(1, mixed_sources(1)[0], DecodingParams(max_length=10))]))
    parent_end.send(job)
    assert loop._take_messages() and returned == []  # work was waiting
    while len(loop.batch):
        loop._step()
    threading.Timer(0.05, parent_end.send, [job]).start()
    assert loop._take_messages() and returned == []  # work came before the lull
    while len(loop.batch):
        loop._step()
    idle_since = time.monotonic()
    threading.Timer(lanes.IDLE_RETURN_S + 0.5, parent_end.send, [job]).start()
    assert loop._take_messages()
    assert len(returned) == 1 and returned[0] - idle_since >= lanes.IDLE_RETURN_S


def test_output_lengths_beyond_the_models_positions_are_capped_at_them(engines, tiny_package):
    cap = ModelPackage.load(tiny_package).max_output_tokens
    forced = DecodingParams(beam_size=2, min_length=cap + 40, max_length=cap + 50)  # EOS never allowed in time
    [[best, *_]] = engines["int8"].decode([mixed_sources(1)[0]], [forced])
    assert len(best.tokens) == cap


def test_lane_messages_cross_the_pipe_as_plain_tuples_and_arrive_whole():
    import pickle

    from decoding import Hypothesis
    from server.engine.lanes import Ending

    admit = ("admit", [Job(("req", 3), [5, 6, 7], DecodingParams(beam_size=4, num_hypotheses=2, length_penalty=0.6,
                                                                  max_length=30, min_length=2), 12.5)])
    ended = ("ended", [Ending(1, [Hypothesis((9, 8), -1.5), Hypothesis((9,), -2.0)]), Ending(2, []),
                       Ending(3, reason="cancelled")], [(4, 0.25, 0.0015)])
    for message in (admit, ended, ("cancel", [1, 2]), ("stop",)):
        wire = to_wire(message)
        # only tuples, lists and plain values: nothing pickle would reduce in Python
        assert "dataclass" not in repr(type(wire)) and b"decoding" not in pickle.dumps(wire)
        assert from_wire(pickle.loads(pickle.dumps(wire))) == message


def test_a_program_that_never_closes_its_lanes_still_exits(tiny_package):
    script = ("from export.package import ModelPackage; from server.engine.lanes import LaneEngine; "
              f"engine = LaneEngine(ModelPackage.load({str(tiny_package)!r}), 'int8', 'cpu', lanes=2); "
              "print(engine.shared_dir); "
              "print(engine.translate(['A dog.'], [__import__('decoding').DecodingParams(max_length=10)])[0][0].tokens)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    shared, tokens = result.stdout.split()
    assert int(tokens) > 0  # generated tokens
    assert not Path(shared).exists()  # the lanes' shared graphs go with them


@pytest.mark.parametrize("failing", ["tempfile.mkdtemp", "server.engine.lanes.shared_graphs"])
def test_lanes_that_cannot_share_packed_weights_each_pack_their_own(tiny_package, monkeypatch, caplog, failing):
    """No writable temporary directory, or a full one: the model still loads."""
    made = []
    real_mkdtemp = tempfile.mkdtemp

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kwargs: made.append(real_mkdtemp(**kwargs)) or made[-1])
    monkeypatch.setattr(failing, fail)
    engine = LaneEngine(ModelPackage.load(tiny_package), precision="int8", device="cpu", lanes=2)
    try:
        assert engine.shared_dir is None
        warning = next(r for r in caplog.records if "each lane packs its own" in r.getMessage())
        assert "No space left" in warning.reason
        assert not any(Path(d).exists() for d in made)  # a directory made before the failure is gone
        assert engine.decode(mixed_sources(2), [DecodingParams(max_length=10)] * 2)[0][0].tokens
    finally:
        engine.close()


def test_offline_decoding_on_a_dead_lane_says_so(tiny_package):
    engine = LaneEngine(ModelPackage.load(tiny_package), precision="int8", device="cpu")
    try:
        engine.lanes[0].process.kill()
        engine.lanes[0].process.join(10)
        with pytest.raises(RuntimeError, match=r"decode lane .* died \(exit code -9\)"):
            engine.decode(mixed_sources(2), [DecodingParams()] * 2)
    finally:
        engine.close()


def test_a_lane_that_cannot_load_raises_its_error_in_the_parent(tiny_package, tmp_path):
    shutil.copytree(tiny_package, tmp_path / "pkg")
    with open(tmp_path / "pkg" / "int8" / "decoder_step.onnx", "r+b") as graph:
        graph.seek(100)
        graph.write(b"corrupted")
    with pytest.raises(PackageError, match="decoder_step.onnx does not match its sha256"):
        LaneEngine(ModelPackage.load(tmp_path / "pkg"), precision="int8", device="cpu", lanes=2)


def test_a_failed_encoder_run_leaves_the_running_batch_as_it_was(engines):
    engine = engines["fp32"]
    sources = mixed_sources(14, seed=3)
    params = [DecodingParams(max_length=20)] * 14
    batch = engine.new_search()
    engine.admit(batch, range(4), sources[:4], params[:4])
    results = dict(batch.step())
    backend = batch.backend
    before = (backend.rows, backend.used, backend.sources, backend.lengths[backend.live].tolist())
    encode, runs = backend.buffers.encode, []

    def second_run_fails(src_tokens):
        runs.append(len(src_tokens))
        if len(runs) == 2:
            raise RuntimeError("encoder failure")
        return encode(src_tokens)

    backend.buffers.encode = second_run_fails
    with pytest.raises(RuntimeError, match="encoder failure"):
        engine.admit(batch, range(4, 14), sources[4:], params[4:])  # 10 sources: two encoder runs
    assert len(runs) == 2
    assert (backend.rows, backend.used, backend.sources, backend.lengths[backend.live].tolist()) == before
    backend.buffers.encode = encode
    while len(batch):
        results.update(batch.step())
    alone = engine.decode(sources[:4], params[:4])
    assert [results[i][0].tokens for i in range(4)] == [hyps[0].tokens for hyps in alone]


def share_cost(lengths, rows, share):
    return STEP_ROWS * max(lengths[i] + 1 for i in share) + sum(rows[i] * (lengths[i] + 1) for i in share)


@pytest.mark.parametrize("lanes", [2, 3])
def test_lanes_get_length_sorted_shares_of_the_least_largest_cost(lanes):
    rng = np.random.default_rng(lanes)
    for _ in range(50):
        lengths = rng.integers(1, 40, size=int(rng.integers(lanes, 12))).tolist()
        rows = rng.choice([1, 4], size=len(lengths)).tolist()
        shares = length_shares(lengths, rows, lanes)
        assert sorted(i for share in shares for i in share) == list(range(len(lengths)))  # every source once
        assert len(shares) <= lanes and all(shares)
        for short, long in zip(shares, shares[1:]):  # short ones together
            assert max(lengths[i] for i in short) <= min(lengths[i] for i in long)
        # No contiguous cut of the length order does better (brute force).
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        best = min(max(share_cost(lengths, rows, order[a:b]) for a, b in zip((0,) + cuts, cuts + (len(order),)))
                   for cuts in itertools.combinations(range(1, len(order)), lanes - 1))
        assert max(share_cost(lengths, rows, share) for share in shares) == best
    assert [len(s) for s in length_shares([3, 3], [1, 1], 2)] == [1, 1]
    # A step's fixed cost counts: eight short texts and one long one are not split by tokens.
    assert [len(s) for s in length_shares([2] * 8 + [20], [1] * 9, 2)] == [8, 1]


@pytest.mark.parametrize("variant", ["fp32", "fp32-on-device"])
def test_engine_matches_the_pytorch_reference(engines, tiny_checkpoint, variant):
    model = load_model(tiny_checkpoint)
    sources = mixed_sources(12, seed=1)
    for beam in (1, 4):
        params = [DecodingParams(beam_size=beam, num_hypotheses=beam, max_length=25)] * len(sources)
        reference = generate(model, sources, params)
        onnx = engines[variant].decode(sources, params)
        for ref, got in zip(reference, onnx):
            assert [h.tokens for h in got] == [h.tokens for h in ref]
            assert np.allclose([h.score for h in got], [h.score for h in ref], atol=1e-4)


def test_n_best_is_ordered_and_distinct(engines):
    hyps = engines["fp32"].decode(mixed_sources(3, seed=2), [DecodingParams(beam_size=5, num_hypotheses=5,
                                                                            max_length=20)] * 3)
    for n_best in hyps:
        scores = [h.score for h in n_best]
        assert len(n_best) == 5 and scores == sorted(scores, reverse=True)
        assert len({h.tokens for h in n_best}) == 5


def test_length_limits(engines):
    sources = mixed_sources(6, seed=3)
    capped = engines["fp32"].decode(sources, [DecodingParams(beam_size=2, max_length=3)] * 6)
    assert all(len(h.tokens) <= 3 for hyps in capped for h in hyps)
    long = engines["fp32"].decode(sources, [DecodingParams(beam_size=2, min_length=12, max_length=20)] * 6)
    assert all(12 <= len(h.tokens) <= 20 for hyps in long for h in hyps)
    with pytest.raises(ValueError, match="exceeds the model's limit of 63"):
        engines["fp32"].decode([[5] * 64], [DecodingParams()])


def test_a_package_without_a_variant_for_the_device_says_what_to_do(tiny_package):
    package = ModelPackage.load(tiny_package)
    assert default_precision(package, "cpu") == "int8" and default_precision(package, "cuda") == "fp16"
    variants = package.manifest["variants"]
    fp16_only = ModelPackage(package.root, {**package.manifest, "variants": {"fp16": variants["fp16"]}})
    with pytest.raises(PackageError, match=r"tiny has no variant for cpu \(int8 or fp32; it has fp16\): pass "
                                           r"--precision fp16 to run it there anyway, or re-export it with "
                                           r"--precision fp32,int8"):
        default_precision(fp16_only, "cpu")
    int8_only = ModelPackage(package.root, {**package.manifest, "variants": {"int8": variants["int8"]}})
    assert default_precision(int8_only, "cpu") == "int8"
    with pytest.raises(PackageError, match="re-export it with --precision fp32,fp16"):
        default_precision(int8_only, "cuda")
