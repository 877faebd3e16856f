"""The shared argument checks of explain.validation: what they accept, what they refuse, and the message."""

import math

import pytest

from explain.validation import finite, in_interval, int_at_least, non_negative_int, one_of, positive_int


@pytest.mark.parametrize("value", [1, 7, 10**9])
def test_positive_int_accepts(value):
    assert positive_int("n", value) == value


@pytest.mark.parametrize("value", [0, -1, True, False, 1.0, "2", None])
def test_positive_int_refuses(value):
    with pytest.raises(ValueError, match=r"^n must be a positive int, got "):
        positive_int("n", value)


def test_positive_int_none_when_allowed():
    assert positive_int("n", None, allow_none=True) is None
    with pytest.raises(ValueError, match="positive int or None"):
        positive_int("n", 0, allow_none=True)


def test_non_negative_int():
    assert non_negative_int("k", 0) == 0
    for bad in (-1, True, 0.5):
        with pytest.raises(ValueError, match="non-negative int"):
            non_negative_int("k", bad)


def test_one_of():
    assert one_of("m", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"m must be one of \('a', 'b'\), got 'c'"):
        one_of("m", "c", ("a", "b"))
    with pytest.raises(ValueError, match="must be one of"):
        one_of("m", ["a"], {"a", "b"})  # unhashable


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "1", None])
def test_finite_refuses(value):
    with pytest.raises(ValueError, match="must be a finite number"):
        finite("w", value)


def test_finite_accepts_ints_and_floats():
    assert finite("w", 3) == 3.0 and isinstance(finite("w", 3), float)


def test_in_interval_ends():
    assert in_interval("p", 0, 0, 1) == 0.0
    assert in_interval("p", 1, 0, 1) == 1.0
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\], got 0"):
        in_interval("p", 0, 0, 1, low_open=True)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        in_interval("p", 1, 0, 1, high_open=True)
    with pytest.raises(ValueError, match="must be in"):
        in_interval("p", math.nan, 0, 1)


def test_int_at_least():
    assert int_at_least("n", 2, 2) == 2 and int_at_least("n", 7, 2) == 7
    for bad in (1, True, 2.0, "3", None):
        with pytest.raises(ValueError, match=r"^n must be an int >= 2, got "):
            int_at_least("n", bad, 2)
    with pytest.raises(ValueError, match=r"must be an int >= 2 \(two or more\), got 1"):
        int_at_least("n", 1, 2, why="two or more")
