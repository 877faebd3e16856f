"""Explainers and metrics by name, so a config can say ``explainers: [saliency, {sobol: {nb_design: 16}}]``.

An explainer needs the model it explains, so the callbacks hold *factories* ``model -> Explainer`` and build
the explainers on the LightningModule they watch. A spec is any of:

* a registered name (``"saliency"``), or a mapping ``{name: {options}}``;
* an :class:`~explain.base.Explainer` subclass, or any callable ``model -> Explainer`` such as
  ``functools.partial(Sobol, nb_design=16)`` or ``explain.from_captum("IntegratedGradients")``;
* a ``{"class_path": ..., "init_args": {...}}`` mapping (LightningCLI style; jsonargparse may also hand over
  the callable it built from one);
* a mapping ``{key: class or callable}`` to choose the logging key;
* an already-built explainer (it must be bound to the model the callback watches).

Metrics are :class:`~explain.metrics.ExplanationMetric` instances, registered names, ``{name: {options}}``
mappings or classes.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from torch import nn

from explain.base import Explainer
from explain.metrics.base import ExplanationMetric

#: registered explainer names -> "module:Class"
EXPLAINERS: dict[str, str] = {
    "saliency": "explain.attributions.saliency:Saliency",
    "smoothgrad": "explain.attributions.saliency:SmoothGrad",
    "gradient_input": "explain.attributions.saliency:GradientInput",
    "sobol": "explain.attributions.sobol:Sobol",
    "eva": "explain.attributions.eva:EVA",
}

#: registered metric names -> "module:Class"
METRICS: dict[str, str] = {
    "alignment": "explain.metrics.alignment:HumanAlignment",
    "deletion": "explain.metrics.fidelity:Deletion",
    "insertion": "explain.metrics.fidelity:Insertion",
    "mufidelity": "explain.metrics.fidelity:MuFidelity",
    "stability": "explain.metrics.stability:AverageStability",
    "spurious": "explain.metrics.spurious:SpuriousMass",
}


def load(kind: str, name: str) -> type:
    """The class registered as ``name`` in the ``kind`` ("explainer" or "metric") table."""
    table = EXPLAINERS if kind == "explainer" else METRICS
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}: registered names are {sorted(table)}")
    module, attribute = table[name].split(":")
    try:
        return getattr(import_module(module), attribute)
    except (ImportError, AttributeError) as error:
        raise ImportError(f"{kind} {name!r} needs {module}.{attribute}, which cannot be imported: {error}") from error


def registered_name(cls: type, kind: str) -> str | None:
    """The registered name of ``cls`` (None if it is not registered)."""
    table = EXPLAINERS if kind == "explainer" else METRICS
    for name, path in table.items():
        module, attribute = path.split(":")
        if attribute != cls.__name__:
            continue
        try:
            if getattr(import_module(module), attribute) is cls:
                return name
        except (ImportError, AttributeError):
            continue
    return None


def check_options(cls: type, options: Mapping[str, Any], what: str) -> None:
    """Raise a clear error if ``options`` are not keyword arguments of ``cls``."""
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


def import_path(path: str) -> Any:
    """The object at a dotted import path such as ``"explain.attributions.sobol.Sobol"``."""
    module, _, attribute = path.rpartition(".")
    try:
        return getattr(import_module(module), attribute)
    except (ValueError, ImportError, AttributeError) as error:
        raise ImportError(f"cannot import {path!r} (class_path): {error}") from error


def _plain(item: Any) -> Any:
    """A jsonargparse ``Namespace`` (what LightningCLI leaves of a nested ``class_path`` block) as a dict."""
    return item.as_dict() if hasattr(item, "class_path") and hasattr(item, "as_dict") else item


def _class_path(item: Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
    """``(class, init_args)`` of a ``{"class_path": ..., "init_args": {...}}`` mapping (LightningCLI style)."""
    unknown = sorted(set(item) - {"class_path", "init_args"})
    if unknown:
        raise ValueError(f"a class_path mapping takes 'class_path' and 'init_args', got extra keys {unknown}")
    options = dict(item.get("init_args") or {})
    if options.get("model", 0) is None:  # jsonargparse fills the unset model argument with None
        del options["model"]
    return import_path(item["class_path"]), options


def _callable_name(obj: Any) -> str:
    while isinstance(obj, functools.partial):
        method = obj.keywords.get("method")  # from_captum: partial(CaptumExplainer, method=<captum class>)
        if method is not None and hasattr(method, "__name__"):
            return method.__name__.lower()
        # jsonargparse wraps a class_path callable as partial(instantiate, <instantiator>, cls, **init_args)
        classes = [arg for arg in obj.args if isinstance(arg, type)]
        obj = classes[-1] if classes else obj.func
    if isinstance(obj, type):
        return registered_name(obj, "explainer") or obj.__name__.lower()
    return getattr(obj, "__name__", type(obj).__name__).lower()


def _explainer_spec(item: Any, name: str | None = None) -> ExplainerSpec:
    item = _plain(item)
    if isinstance(item, Mapping) and "class_path" in item:
        return _from_class_path(item, name=name)
    if isinstance(item, str):
        cls = load("explainer", item)
        return ExplainerSpec(name or item, factory=cls)
    if isinstance(item, Explainer):
        cls = type(item)
        return ExplainerSpec(name or registered_name(cls, "explainer") or item.name, instance=item)
    if isinstance(item, type) and not issubclass(item, Explainer):
        raise TypeError(f"{item.__name__} is not an explain.Explainer subclass")
    if callable(item):
        return ExplainerSpec(name or _callable_name(item), factory=item)
    raise TypeError(
        f"cannot make an explainer of {item!r} ({type(item).__name__}): pass a registered name "
        f"{sorted(EXPLAINERS)}, {{name: {{options}}}}, an Explainer class, a callable model -> Explainer or an "
        "Explainer instance"
    )


def _from_class_path(item: Mapping[str, Any], name: str | None = None) -> ExplainerSpec:
    cls, options = _class_path(item)
    if isinstance(cls, type) and issubclass(cls, Explainer):
        check_options(cls, options, f"explainer {cls.__name__}")
    return _explainer_spec(functools.partial(cls, **options), name=name)


def _from_mapping(items: Mapping[str, Any]) -> list[ExplainerSpec]:
    if "class_path" in items:
        return [_from_class_path(items)]
    specs = []
    for key, value in items.items():
        value = _plain(value)
        if not isinstance(key, str):
            raise TypeError(f"explainer keys must be names (str), got {key!r}")
        if isinstance(value, Mapping) and "class_path" in value:
            specs.append(_from_class_path(value, name=key))
        elif value is None or isinstance(value, Mapping):
            cls = load("explainer", key)
            options = dict(value or {})
            check_options(cls, options, f"explainer {key!r}")
            specs.append(ExplainerSpec(key, factory=functools.partial(cls, **options)))
        else:
            specs.append(_explainer_spec(value, name=key))
    return specs


def resolve_explainers(spec: Any) -> list[ExplainerSpec]:
    """Named explainer specs from a name, a mapping, a class/callable/instance, or a sequence of those."""
    spec = _plain(spec)
    if isinstance(spec, Mapping):
        specs = _from_mapping(spec)
    elif isinstance(spec, (str, Explainer)) or callable(spec):
        specs = [_explainer_spec(spec)]
    elif isinstance(spec, Sequence):
        specs = []
        for item in map(_plain, spec):
            specs.extend(_from_mapping(item) if isinstance(item, Mapping) else [_explainer_spec(item)])
    else:
        raise TypeError(f"explainers must be a name, a mapping or a list of explainers, got {type(spec).__name__}")
    if not specs:
        raise ValueError("explainers is empty: pass at least one, e.g. explainers=['saliency']")
    _check_unique([s.name for s in specs], "explainers")
    return specs


def _check_unique(names: list[str], what: str) -> None:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(
            f"two {what} are named {duplicates}: give each its own key with a mapping, e.g. "
            f"{{'{duplicates[0]}_a': ..., '{duplicates[0]}_b': ...}}"
        )


def _metric(item: Any, name: str | None = None, options: Mapping[str, Any] | None = None):
    if isinstance(item, str):
        cls = load("metric", item)
        check_options(cls, options or {}, f"metric {item!r}")
        return name or item, cls(**(options or {}))
    if isinstance(item, type) and issubclass(item, ExplanationMetric):
        metric = item(**(options or {}))
        return name or registered_name(item, "metric") or metric.name, metric
    if isinstance(item, ExplanationMetric):
        return name or registered_name(type(item), "metric") or item.name, item
    raise TypeError(
        f"cannot use {item!r} ({type(item).__name__}) as an explanation metric: pass a registered name "
        f"{sorted(METRICS)}, {{name: {{options}}}}, or an explain.metrics.ExplanationMetric (a torchmetrics Metric "
        "whose update takes keywords named by `requires`)"
    )


def resolve_metrics(spec: Any) -> dict[str, Any]:
    """``{name: ExplanationMetric}`` from a name, a metric, a mapping or a sequence of those (may be empty)."""
    pairs = []
    spec = _plain(spec)
    items = [spec] if isinstance(spec, (str, Mapping)) or not isinstance(spec, Sequence) else list(spec)
    for item in map(_plain, items):
        if isinstance(item, Mapping) and "class_path" in item:
            cls, options = _class_path(item)
            pairs.append(_metric(cls, options=options))
        elif isinstance(item, Mapping):
            for key, value in item.items():
                value = _plain(value)
                if isinstance(value, Mapping) and "class_path" in value:
                    cls, options = _class_path(value)
                    pairs.append(_metric(cls, name=key, options=options))
                elif value is None or isinstance(value, Mapping):
                    pairs.append(_metric(key, options=value))
                else:
                    pairs.append(_metric(value, name=key))
        else:
            pairs.append(_metric(item))
    _check_unique([name for name, _ in pairs], "metrics")
    return dict(pairs)
