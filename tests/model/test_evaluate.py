"""make eval's command line: beam sizes, limits and corpora it cannot use are refused, with the reason."""

import gzip

import pytest

from model.evaluate import main, parser


@pytest.mark.parametrize("beams,message", [("0", "beam sizes are at least 1 (1 is greedy); got '0'"),
                                           ("1,x", "expected comma-separated whole numbers, e.g. 1,4; got '1,x'")])
def test_unusable_beam_sizes_are_refused(beams, message, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["model/default", "--beams", beams])
    assert message in capsys.readouterr().err


def test_beam_sizes_default_to_greedy_and_beam_4():
    assert parser().parse_args(["model/default"]).beams == [1, 4]
    assert parser().parse_args(["model/default", "--beams", "2,8"]).beams == [2, 8]


def test_a_negative_limit_is_refused_before_loading(capsys):
    with pytest.raises(SystemExit):
        main(["/nonexistent", "--limit", "-1"])
    assert "--limit must be >= 0 (0: all), got -1" in capsys.readouterr().err


def test_a_split_whose_sides_are_not_line_aligned_is_refused(tmp_path, capsys):
    for language, lines in (("en", ["A dog.", "A cat."]), ("de", ["Ein Hund."])):
        with gzip.open(tmp_path / f"test_2016_flickr.{language}.gz", "wt") as f:
            f.write("\n".join(lines) + "\n")
    with pytest.raises(SystemExit):
        main(["model/default", "--data-dir", str(tmp_path)])
    assert "test_2016_flickr: 2 en lines but 1 de lines" in capsys.readouterr().err
