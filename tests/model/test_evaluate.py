"""make eval's command line: beam sizes and limits it cannot use are refused, with the reason."""

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
