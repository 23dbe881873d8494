"""make bench's bookkeeping: engines take turns, and a record is its median round."""

from bench.run import median_round, ratios_by_round, turns


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
