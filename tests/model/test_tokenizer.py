from decoding.tokenizer import Tokenizer, train_tokenizer
from model.data import read_lines, split_path

DATA = "../shared/data/multi30k"


def test_tokenizer_round_trip(tmp_path):
    lines = read_lines(split_path(DATA, "val", "en"))[:400] + read_lines(split_path(DATA, "val", "de"))[:400]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    tokenizer = Tokenizer(train_tokenizer([corpus], tmp_path / "spm", vocab_size=300))
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    texts = ["A man in a blue shirt is standing on a ladder.", "Ein Mann läuft über die Straße."]
    ids = tokenizer.encode(texts)
    assert all(len(seq) > 3 and min(seq) > 3 for seq in ids)
    assert tokenizer.decode(ids) == texts
