"""Argument validation shared by every explainer, metric, callback and pure function of ``explain``.

One place decides what a valid option is, so a function and its ``Metric``/``Explainer`` wrapper accept and refuse
exactly the same values (the torchmetrics pattern of one ``_..._arg_validation`` called by both). Each check
returns the value it accepted, so a constructor reads ``self.batch_size = positive_int("batch_size", batch_size)``.

``bool`` is refused wherever an ``int`` is asked for: ``True`` is an ``int`` to Python, never a batch size to a
user. Errors are ``ValueError``s that name the argument, say what to pass instead, and repeat what was given.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from numbers import Real
from typing import Any, TypeVar

T = TypeVar("T")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def positive_int(name: str, value: Any, *, allow_none: bool = False) -> Any:
    """``value`` if it is an ``int >= 1`` (not a ``bool``), or ``None`` when ``allow_none``.

    Raises:
        ValueError: ``"<name> must be a positive int, got <value>"``.

    >>> positive_int("batch_size", 32)
    32
    >>> positive_int("batch_size", True)
    Traceback (most recent call last):
    ...
    ValueError: batch_size must be a positive int, got True
    """
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return value


def int_at_least(name: str, value: Any, low: int, *, why: str = "") -> int:
    """``value`` if it is an ``int >= low`` (not a ``bool``); ``why`` is appended to the message.

    Raises:
        ValueError: ``"<name> must be an int >= <low>[ (<why>)], got <value>"``.

    >>> int_at_least("nb_samples", 2, 2)
    2
    >>> int_at_least("nb_samples", 1, 2, why="a correlation needs several subsets")
    Traceback (most recent call last):
    ...
    ValueError: nb_samples must be an int >= 2 (a correlation needs several subsets), got 1
    """
    if not _is_int(value) or value < low:
        raise ValueError(f"{name} must be an int >= {low}{f' ({why})' if why else ''}, got {value!r}")
    return value


def non_negative_int(name: str, value: Any, *, allow_none: bool = False) -> Any:
    """``value`` if it is an ``int >= 0`` (not a ``bool``), or ``None`` when ``allow_none``.

    Raises:
        ValueError: ``"<name> must be a non-negative int, got <value>"``.
    """
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative int{' or None' if allow_none else ''}, got {value!r}")
    return value


def one_of(name: str, value: T, choices: Collection[Any]) -> T:
    """``value`` if it is one of ``choices``.

    Raises:
        ValueError: ``"<name> must be one of <choices>, got <value>"``.

    >>> one_of("perturbation", "blur", ("inpainting", "blur", "amplitude"))
    'blur'
    """
    try:
        ok = value in choices
    except TypeError:  # an unhashable value against a set or dict
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def finite(name: str, value: Any) -> float:
    """``float(value)`` if ``value`` is a real number (not a ``bool``) that is neither NaN nor infinite.

    Raises:
        ValueError: ``"<name> must be a finite number, got <value>"``.
    """
    if not _is_real(value) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def in_interval(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``float(value)`` if it is a finite real in the interval from ``low`` to ``high`` (closed unless an end is
    marked open), e.g. ``in_interval("ratio", r, 0, 1, low_open=True)`` for ``0 < r <= 1``.

    Raises:
        ValueError: ``"<name> must be in <interval>, got <value>"`` (NaN and infinities are refused too).

    >>> in_interval("quantile", 0.9, 0, 1)
    0.9
    >>> in_interval("eps", 0.0, 0, low_open=True)
    Traceback (most recent call last):
    ...
    ValueError: eps must be in (0, inf), got 0.0
    """
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or math.isinf(high) else ']'}"
    if low_open or math.isinf(low):
        interval = "(" + interval[1:]
    if not _is_real(value) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    number = float(value)
    below = number <= low if low_open else number < low
    above = number >= high if high_open else number > high
    if below or above:
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return number


def batch_size_or_auto(name: str, value: Any) -> Any:
    """``value`` if it is a positive int (not a ``bool``) or the string ``"auto"`` (the largest batch that fits,
    :mod:`explain.batching`).

    Raises:
        ValueError: ``"<name> must be a positive int, got <value> (or 'auto': ...)"``.

    >>> batch_size_or_auto("batch_size", "auto")
    'auto'
    """
    if value == "auto" and isinstance(value, str):
        return value
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r} (or 'auto': the largest batch that fits)")
    return value
