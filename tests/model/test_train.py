"""Training: flags checked before any work, a short run that writes a loadable model, and a
run stopped after an epoch that resumes to the same weights as one that never stopped."""

import gzip
import shutil

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import load_model
from model.data import read_lines, split_path
from model.train import main, parse_args
from tests.conftest import DATA_DIR

TINY = ["--vocab-size", "120", "--d-model", "16", "--num-heads", "2", "--d-ff", "32", "--encoder-layers", "1",
        "--decoder-layers", "1", "--max-tokens", "512", "--warmup", "10", "--bleu-every", "0", "--average", "1",
        "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small en-de corpus in the Multi30k layout: 160 training pairs, 16 validation pairs."""
    directory = tmp_path_factory.mktemp("corpus")
    for split, lines in (("train", slice(0, 160)), ("val", slice(160, 176))):
        for language in ("en", "de"):
            sentences = read_lines(split_path(DATA_DIR, "val", language))[lines]
            with gzip.open(directory / f"{split}.{language}.gz", "wt") as f:
                f.write("\n".join(sentences) + "\n")
    return directory


def test_a_run_is_resumed_only_as_the_model_it_trains(corpus, tmp_path):
    out = tmp_path / "run"
    main(["--data-dir", str(corpus), "--out-dir", str(out), "--max-epochs", "1", *TINY])
    with pytest.raises(SystemExit) as refused:  # same shapes: the weights would load, as another model
        main(["--data-dir", str(corpus), "--out-dir", str(out), "--max-epochs", "2", *TINY, "--num-heads", "4"])
    assert f"{out} holds a training run of another model (num_heads 2 there, 4 asked)" in str(refused.value)
    with pytest.raises(SystemExit) as refused:
        main(["--data-dir", str(corpus), "--out-dir", str(out), "--max-epochs", "2", *TINY, "--vocab-size", "200"])
    assert "spm.model has 120 pieces where --vocab-size asks 200" in str(refused.value)
    assert [line.split(",")[0] for line in (out / "log.jsonl").read_text().splitlines()] == ['{"epoch": 1']


@pytest.mark.parametrize("flags,message", [
    (["--d-model", "250"], "d_model (250) must be divisible by num_heads (4)"),
    (["--vocab-size", "3"], "eos_id (3) must be in [0, vocab_size=3)"),
    (["--activation", "swish"], "activation must be one of"),
    (["--source-language", "xx"], "missing corpus file"),
    (["--num-heads", "0"], "num_heads must be at least 1, got 0"),
    (["--dropout", "1.5"], "dropout must be in [0, 1), got 1.5"),
    (["--warmup", "0", "--average", "0"], "--warmup must be at least 1, got 0; --average must be at least 1, got 0"),
    (["--max-length", "300"], "--max-length (300) must not exceed --max-positions (256)"),
    (["--max-tokens", "64"], "--max-tokens (64) must hold the longest pair a batch may take (--max-length 100)"),
    (["--lr-factor", "0"], "--lr-factor must be positive, got 0.0"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1), got 1.0"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda, got 'tpu'"),
    (["--out-dir", __file__], f"--out-dir {__file__} is a file, not a run's directory"),
])
def test_bad_flags_are_refused_before_any_work(corpus, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        parse_args(["--data-dir", str(corpus), "--out-dir", str(tmp_path / "run"), *flags])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_corpus_whose_sides_are_not_line_aligned_is_refused_before_any_work(corpus, tmp_path):
    misaligned = tmp_path / "corpus"
    shutil.copytree(corpus, misaligned)
    lines = read_lines(misaligned / "train.de.gz")
    with gzip.open(misaligned / "train.de.gz", "wt") as f:
        f.write("\n".join(lines[:-1]) + "\n")
    with pytest.raises(SystemExit) as refused:
        main(["--data-dir", str(misaligned), "--out-dir", str(tmp_path / "run"), *TINY])
    assert f"the corpus in {misaligned} is not line-aligned: train: 160 en lines but 159 de lines" in str(refused.value)
    assert not (tmp_path / "run").exists()


def test_a_vocabulary_the_corpus_cannot_fill_is_refused_with_sentencepieces_reason(corpus, tmp_path):
    with pytest.raises(SystemExit) as refused:
        main(["--data-dir", str(corpus), "--out-dir", str(tmp_path / "run"), *TINY, "--vocab-size", "10"])
    assert "SentencePiece could not train a tokenizer of 10 pieces" in str(refused.value)
    assert "Vocabulary size is smaller than required_chars" in str(refused.value)
    assert list((tmp_path / "run").iterdir()) == []  # its plain-text input is removed


def test_a_stopped_run_resumes_to_the_weights_of_one_that_never_stopped(corpus, tmp_path, capsys):
    def train(out, epochs):
        main(["--data-dir", str(corpus), "--out-dir", str(out), "--max-epochs", str(epochs), *TINY])

    train(tmp_path / "straight", 2)
    train(tmp_path / "stopped", 1)
    train(tmp_path / "stopped", 2)
    assert "resumed from epoch 1" in capsys.readouterr().out
    straight = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "stopped" / "final" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    log = (tmp_path / "stopped" / "log.jsonl").read_text().splitlines()
    assert [line.split(",")[0] for line in log] == ['{"epoch": 1', '{"epoch": 2']
    model = load_model(tmp_path / "stopped" / "final")  # a model directory export/ and evaluate take
    assert model.config.d_model == 16 and (tmp_path / "stopped" / "final" / "spm.model").is_file()
