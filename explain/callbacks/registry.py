"""Explainers and metrics from what a user writes, so a config can say
``explainers: [saliency, {sobol: {nb_design: 16}}]`` and ``metrics: [alignment, {deletion: {steps: 10}}]``.

One parser serves both kinds. An item is one of:

* a registered **name** (``"saliency"``; the classes register themselves with
  :func:`explain.registry.register_explainer` / :func:`~explain.registry.register_metric`);
* a mapping **{name: options}** (``{"sobol": {"nb_design": 16}}``), or **{key: item}** to choose the logging key
  of any other item (``{"fast_sobol": functools.partial(Sobol, nb_design=2)}``);
* a **callable**: a class, or a factory such as ``functools.partial(Sobol, nb_design=16)`` or
  ``explain.from_captum("IntegratedGradients")``. In YAML (LightningCLI) a callable is written
  ``{class_path: ..., init_args: {...}}``;
* an **instance**: an already-built explainer (it must be bound to the model the callback watches) or metric.

An explainer needs the model it explains, so explainers come back as :class:`ExplainerSpec` (a factory
``model -> Explainer`` or an instance, built on the LightningModule the callback watches); metrics come back built.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import import_module
from typing import Any, Union

from torch import nn

import explain.attributions.eva  # noqa: F401  (the imports register the built-in classes)
import explain.attributions.saliency  # noqa: F401
import explain.attributions.sobol  # noqa: F401
import explain.metrics  # noqa: F401
from explain.base import Explainer
from explain.metrics.base import ExplanationMetric
from explain.registry import EXPLAINERS, METRICS, registered_name

#: What the callbacks' ``explainers`` / ``metrics`` arguments take, one item or a list of them. The callable is
#: typed ``model -> Any`` (not ``-> Explainer``) on purpose: jsonargparse then hands a YAML ``class_path`` block
#: over as the mapping it is, which this module parses, instead of a callable of its own making.
ExplainerItem = Union[str, dict[str, Any], Callable[[nn.Module], Any]]
MetricItem = Union[str, dict[str, Any], ExplanationMetric]


@dataclass(frozen=True)
class _Kind:
    what: str
    table: dict[str, type]
    base: type
    public: str  # the base class as users import it


_EXPLAINER = _Kind("explainer", EXPLAINERS, Explainer, "explain.Explainer")
_METRIC = _Kind("metric", METRICS, ExplanationMetric, "explain.metrics.ExplanationMetric")


def load(kind: str, name: str) -> type:
    """The class registered as ``name`` in the ``kind`` (``"explainer"`` or ``"metric"``) table.

    Raises:
        ValueError: no class is registered under ``name``.
    """
    table = EXPLAINERS if kind == "explainer" else METRICS
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}: registered names are {sorted(table)}")
    return table[name]


def check_options(cls: type, options: Mapping[str, Any], what: str) -> None:
    """Raise a clear error if ``options`` are not keyword arguments of ``cls``.

    Raises:
        ValueError: an option ``cls`` does not accept (unless it takes ``**kwargs``).
    """
    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [name for name in parameters if name not in ("self", "model")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {what} ({cls.__name__} accepts {accepted})")


@dataclass
class ExplainerSpec:
    """A named way to get an explainer for a model: a ``factory(model)`` or an already-built ``instance``."""

    name: str
    factory: Callable[[nn.Module], Explainer] | None = None
    instance: Explainer | None = None

    def build(self, model: nn.Module) -> Explainer:
        """The explainer of ``model``.

        Raises:
            ValueError: the spec is an instance bound to another model.
            TypeError: the factory did not return an :class:`~explain.base.Explainer`.
        """
        if self.instance is not None:
            if self.instance.model is not model:
                raise ValueError(
                    f"explainer {self.name!r} is a {type(self.instance).__name__} already bound to a "
                    f"{type(self.instance.model).__name__}, not to the model this callback explains "
                    f"({type(model).__name__}); pass its class, a functools.partial of it or its name instead, "
                    "so the callback builds it on the model being trained"
                )
            return self.instance
        explainer = self.factory(model)
        if not isinstance(explainer, Explainer):
            raise TypeError(
                f"explainer {self.name!r}: the factory returned a {type(explainer).__name__}, not an "
                "explain.Explainer (a factory is called as factory(model) and must return an Explainer)"
            )
        return explainer


# ------------------------------------------------------------------------------------------------ the one parser
def _plain(item: Any) -> Any:
    """A jsonargparse ``Namespace`` (what LightningCLI leaves of a nested block) as a dict."""
    return item.as_dict() if hasattr(item, "as_dict") and callable(item.as_dict) else item


def _import(path: str) -> Any:
    module, _, attribute = path.rpartition(".")
    try:
        return getattr(import_module(module), attribute)
    except (ValueError, ImportError, AttributeError) as error:
        raise ImportError(f"cannot import {path!r} (class_path): {error}") from error


def _from_class_path(item: Mapping[str, Any], kind: _Kind) -> Callable[..., Any]:
    """The callable a ``{class_path, init_args}`` mapping stands for: the class with its options bound."""
    unknown = sorted(set(item) - {"class_path", "init_args"})
    if unknown:
        raise ValueError(f"a class_path mapping takes 'class_path' and 'init_args', got extra keys {unknown}")
    cls = _import(item["class_path"])
    options = dict(_plain(item.get("init_args")) or {})
    if options.get("model", 0) is None:  # jsonargparse fills an unset model argument with None
        del options["model"]
    if isinstance(cls, type) and issubclass(cls, kind.base):
        check_options(cls, options, f"{kind.what} {cls.__name__}")
    return functools.partial(cls, **options)


def _callable_name(obj: Any) -> str:
    """The default key of a callable: the registered name of the class it builds, else its ``__name__``.

    A ``functools.partial`` is named after the callable it wraps (``partial.func``), unless it was given a
    ``__name__`` of its own (:func:`~explain.attributions.captum.from_captum` names its factory after the method).
    """
    while isinstance(obj, functools.partial) and not hasattr(obj, "__name__"):
        obj = obj.func
    if isinstance(obj, type):
        return registered_name(obj) or obj.__name__.lower()
    return getattr(obj, "__name__", type(obj).__name__).lower()


def _described(kind: _Kind) -> str:
    return (
        f"a registered name {sorted(kind.table)}, {{name: {{options}}}}, an {kind.public} class or a callable "
        f"returning one ({{class_path: ..., init_args: ...}} in YAML), or an {kind.public} instance"
    )


def _entry(item: Any, kind: _Kind, name: str | None = None, options: Mapping[str, Any] | None = None):
    """``(name, callable or instance)`` of one item (module docstring)."""
    item = _plain(item)
    if isinstance(item, str):
        cls = load(kind.what, item)
        check_options(cls, options or {}, f"{kind.what} {item!r}")
        return name or item, functools.partial(cls, **(options or {})) if options else cls
    if isinstance(item, Mapping) and "class_path" in item:
        item = _from_class_path(item, kind)
    if isinstance(item, kind.base):
        return name or registered_name(type(item)) or item.name, item
    if isinstance(item, type) and not issubclass(item, kind.base):
        raise TypeError(f"{item.__name__} is not an {kind.public} subclass")
    if callable(item) and not isinstance(item, nn.Module):
        return name or _callable_name(item), item
    raise TypeError(f"cannot use {item!r} ({type(item).__name__}) as an {kind.what}: pass {_described(kind)}")


def _entries(spec: Any, kind: _Kind) -> list[tuple[str, Any]]:
    """``[(name, callable or instance)]`` of one item or a list of items, names unique."""
    spec = _plain(spec)
    items = list(spec) if isinstance(spec, Sequence) and not isinstance(spec, str) else [spec]
    entries = []
    for item in map(_plain, items):
        if isinstance(item, Mapping) and "class_path" not in item:
            for key, value in item.items():
                if not isinstance(key, str):
                    raise TypeError(f"{kind.what} keys must be names (str), got {key!r}")
                value = _plain(value)
                if value is None or (isinstance(value, Mapping) and "class_path" not in value):
                    entries.append(_entry(key, kind, options=value))  # {name: options}
                else:
                    entries.append(_entry(value, kind, name=key))  # {key: item}
        else:
            entries.append(_entry(item, kind))
    names = [name for name, _ in entries]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(
            f"two {kind.what}s are named {duplicates}: give each its own key with a mapping, e.g. "
            f"{{'{duplicates[0]}_a': ..., '{duplicates[0]}_b': ...}}"
        )
    return entries


def resolve_explainers(spec: Any) -> list[ExplainerSpec]:
    """Named explainer specs from one item or a list of items (module docstring).

    Raises:
        ValueError: an unknown name or option, two explainers under one name, or no explainer at all.
        TypeError: an item that is none of the accepted shapes.
        ImportError: a ``class_path`` that cannot be imported.
    """
    specs = []
    for name, target in _entries(spec, _EXPLAINER):
        if isinstance(target, Explainer):
            specs.append(ExplainerSpec(name, instance=target))
        else:
            specs.append(ExplainerSpec(name, factory=target))
    if not specs:
        raise ValueError("explainers is empty: pass at least one, e.g. explainers=['saliency']")
    return specs


def resolve_metrics(spec: Any) -> dict[str, ExplanationMetric]:
    """``{name: ExplanationMetric}`` from one item or a list of items (module docstring); may be empty.

    Raises:
        ValueError: an unknown name or option, or two metrics under one name.
        TypeError: an item that is none of the accepted shapes, or a callable that does not build a metric.
        ImportError: a ``class_path`` that cannot be imported.
    """
    metrics = {}
    for name, target in _entries(spec, _METRIC):
        try:
            metric = target if isinstance(target, ExplanationMetric) else target()
        except (TypeError, ValueError) as error:  # e.g. torchmetrics' "Unexpected keyword arguments"
            raise type(error)(f"metric {name!r}: {error}") from error
        if not isinstance(metric, ExplanationMetric):
            raise TypeError(
                f"metric {name!r}: the callable returned a {type(metric).__name__}, not an "
                "explain.metrics.ExplanationMetric (a torchmetrics Metric whose update takes keywords named by "
                "`requires`)"
            )
        metrics[name] = metric
    return metrics
