"""igpt_cli.layers: layer specs shared by extract (layers of a model) and probe (layers in a file)."""
from __future__ import annotations

import pytest

from igpt_cli.errors import InputError
from igpt_cli.layers import format_layers, parse_layers


def test_parse_layers():
    assert parse_layers("12", range(24 + 1)) == [12]
    assert parse_layers(["12", "16"], range(24 + 1)) == [12, 16]
    assert parse_layers("8-10", range(24 + 1)) == [8, 9, 10]
    assert parse_layers("all", range(4 + 1)) == [0, 1, 2, 3, 4]
    assert parse_layers(None, range(2 + 1)) == [0, 1, 2]
    assert parse_layers(["-1"], range(24 + 1)) == [24]
    assert parse_layers("-3--1", range(24 + 1)) == [22, 23, 24]
    assert parse_layers("1,3, 2", range(4 + 1)) == [1, 2, 3]
    assert parse_layers([0, 0, 4], range(4 + 1)) == [0, 4]
    for bad in ("25", "-26", "x", "5-3", "1-"):
        with pytest.raises(InputError):
            parse_layers(bad, range(24 + 1))
    with pytest.raises(InputError, match="0..24"):
        parse_layers("30", range(24 + 1))


@pytest.mark.parametrize("spec,avail,want", [
    (None, 4, [0, 1, 2, 3]), (["all"], [0, 4, 8], [0, 4, 8]), (["-1"], 25, [24]), (["8-10"], 25, [8, 9, 10]),
    (["0,2", "-2"], 5, [0, 2, 3]), (["0-8"], [0, 4, 8, 12], [0, 4, 8]), (["-1"], [0, 4, 8], [8]),
])
def test_parse_layers_against_available(spec, avail, want):
    """Layers of a file need not be contiguous: ranges and negatives select among those there are."""
    assert parse_layers(spec, range(avail) if isinstance(avail, int) else avail) == want


@pytest.mark.parametrize("spec", [["30"], ["x"], ["5-3"], ["-9"], ["40-50"]])
def test_parse_layers_bad(spec):
    with pytest.raises(InputError):
        parse_layers(spec, range(8))


def test_format_layers():
    assert format_layers([0, 1, 2, 3]) == "0..3"
    assert format_layers([0, 4, 8]) == "0,4,8"
    assert format_layers([3, 4]) == "3,4"
