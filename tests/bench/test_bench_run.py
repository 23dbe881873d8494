"""make bench's bookkeeping: engines take turns, a record is its median round, the load
generator can be kept off the server's CPUs, a bad BENCH_* setting ends the run with its name."""

import os

import pytest

from bench.cpus import load_generator_cpus, parse_cpus
from bench.run import median_round, ratios_by_round, run_meta, settings, turns
from server.engine.session import int8_gemm_can_saturate


def test_each_round_starts_with_another_engine_and_single_round_engines_run_once():
    order = turns([3, 3, 1, 3])
    assert order == [[0, 1, 2, 3], [1, 3, 0], [3, 0, 1]]
    assert [sum(i in engines for engines in order) for i in range(4)] == [3, 3, 1, 3]


def test_a_record_is_its_median_round_with_the_first_rounds_scores():
    runs = [{"sentences_per_s": 90.0, "bleu": 38.1, "outputs": ["Ein Hund."]},
            {"sentences_per_s": 110.0}, {"sentences_per_s": 100.0}]
    record = median_round(runs)
    assert record["sentences_per_s"] == 100.0
    assert (record["bleu"], record["outputs"]) == (38.1, ["Ein Hund."])
    assert record["round_sentences_per_s"] == [90.0, 110.0, 100.0]
    assert median_round(runs[:2])["sentences_per_s"] == 90.0  # an even count: the lower middle
    assert "bleu" not in median_round(runs[1:])  # served paths are not scored


def test_ratios_pair_rounds_against_ctranslate2s_faster_configuration():
    def record(engine, lanes, rounds):
        return {"engine": engine, "precision": "int8", "lanes": lanes, "beam_size": 1, "batch_size": 8,
                "sentences_per_s": sorted(rounds)[(len(rounds) - 1) // 2], "round_sentences_per_s": rounds}

    records = [record("parley", 2, [80.0, 90.0, 70.0]), record("ctranslate2", 1, [20.0]),
               record("ctranslate2", 2, [100.0, 90.0, 100.0]), {"engine": "parley-grpc", "beam_size": 1}]
    assert ratios_by_round(records) == {"beam1_batch8": [0.8, 1.0, 0.7]}


def test_server_cpus_are_parsed_and_the_load_generator_gets_the_others():
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        pytest.skip("needs two CPUs: one for the server, one for the load generator")
    first, rest = available[0], available[1:]
    assert parse_cpus(f"{first}") == [first]
    assert parse_cpus(f"{first}-{first}") == [first]
    assert parse_cpus("") is None
    with pytest.raises(ValueError, match="at least one for the load generator"):
        parse_cpus(",".join(map(str, available)))
    with pytest.raises(ValueError, match="expected CPU numbers"):
        parse_cpus("zero")
    with load_generator_cpus([first]):
        assert sorted(os.sched_getaffinity(0)) == rest
    assert sorted(os.sched_getaffinity(0)) == available


def test_results_name_the_cpu_and_how_its_int8_gemms_sum():
    machine = run_meta({"rounds": 3})["machine"]
    assert f"{os.cpu_count()} cores" in machine
    assert ("summed in int16" in machine) == int8_gemm_can_saturate()
    assert not machine.startswith(",")


@pytest.mark.parametrize("variable,value,message", [
    ("BENCH_THREADS", "two", "bench: BENCH_THREADS='two': expected a whole number >= 1"),
    ("BENCH_ROUNDS", "0", "bench: BENCH_ROUNDS='0': expected a whole number >= 1"),
    ("BENCH_SERVER_CPUS", "zero", "bench: BENCH_SERVER_CPUS='zero': expected CPU numbers and ranges"),
])
def test_a_bad_setting_ends_the_run_with_its_name(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as ended:
        settings()
    assert str(ended.value).startswith(message)
