"""The tables of named explainers and metrics, filled by a decorator where each class is defined.

As timm's ``register_model``: ``@register_explainer("sobol")`` above ``class Sobol`` puts the class in
:data:`EXPLAINERS` when its module is imported, so adding a method touches one file. The configs and the callbacks
then say ``explainers: [saliency, {sobol: {nb_design: 16}}]`` (parsed by :mod:`explain.callbacks.registry`).

This module imports nothing heavy: every explainer and metric module imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", bound=type)

#: registered explainer names -> classes (filled by :func:`register_explainer`)
EXPLAINERS: dict[str, type] = {}
#: registered metric names -> classes (filled by :func:`register_metric`)
METRICS: dict[str, type] = {}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[T], T]:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a registered {kind} name must be an identifier such as 'sobol', got {name!r}")

    def decorator(cls: T) -> T:
        taken = table.get(name)
        if taken is not None and _qualified(taken) != _qualified(cls):  # the same class again: a module reload
            raise ValueError(f"two {kind}s are registered as {name!r}: {_qualified(taken)} and {_qualified(cls)}")
        table[name] = cls
        return cls

    return decorator


def register_explainer(name: str) -> Callable[[T], T]:
    """Class decorator: register an :class:`~explain.base.Explainer` subclass under ``name``.

    Raises:
        ValueError: ``name`` is not an identifier, or another class is registered under it.
    """
    return _register(EXPLAINERS, "explainer", name)


def register_metric(name: str) -> Callable[[T], T]:
    """Class decorator: register an :class:`~explain.metrics.ExplanationMetric` subclass under ``name``.

    Raises:
        ValueError: ``name`` is not an identifier, or another class is registered under it.
    """
    return _register(METRICS, "metric", name)


def registered_name(cls: type) -> str | None:
    """The name ``cls`` is registered under, as an explainer or a metric (None if it is not registered).

    >>> from explain.attributions.sobol import Sobol
    >>> registered_name(Sobol)
    'sobol'
    """
    for table in (EXPLAINERS, METRICS):
        for name, registered in table.items():
            if registered is cls:
                return name
    return None
