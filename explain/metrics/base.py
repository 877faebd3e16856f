"""Common contract of the explanation metrics, so a callback can feed any of them the same way."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric

#: Every keyword an explanation metric may ask for in ``update``:
#: ``maps`` [B,H,W] (the explanation), ``images`` [B,C,H,W], ``targets`` [B] (the explained class),
#: ``human`` [B,H,W] and ``has_heatmap`` [B] (human maps), ``model`` (the explained network),
#: ``explainer`` (the callable that produced ``maps``), ``ids`` [B] (stable sample indices of a monitor set),
#: ``spurious_mask`` [B,H,W] bool (pixels a model right for the right reasons should ignore).
UPDATE_KEYS = ("maps", "images", "targets", "human", "has_heatmap", "model", "explainer", "ids", "spurious_mask")


class ExplanationMetric(Metric):
    """A torchmetrics ``Metric`` whose ``update`` takes keyword arguments named in :data:`UPDATE_KEYS`.

    ``requires`` lists the keywords ``update`` needs; a caller such as ``ExplanationMonitor`` passes exactly
    those. ``compute`` returns a scalar tensor or a dict of scalar tensors (logged as ``<name>/<key>``).
    """

    requires: ClassVar[tuple[str, ...]] = ("maps",)
    full_state_update = False

    @property
    def name(self) -> str:
        """Logging key of the metric."""
        return type(self).__name__.lower()


class MeanOverImages(ExplanationMetric):
    """The mean, over every image seen, of a per-image metric function ``function(**inputs, **options) -> [B]``.

    torchmetrics' pure function + thin ``Metric``, with the options written once: a subclass names its
    ``function`` and the ``arg_validation`` it shares with it; the options are the function's keyword-only
    arguments other than the ``update`` inputs (``requires``), with the function's defaults. They are checked when
    the metric is built and kept as attributes (``metric.nb_samples``); every other keyword goes to torchmetrics'
    ``Metric``. The per-image values are summed in float64 (``dist_reduce_fx="sum"``).
    """

    function: ClassVar[Callable[..., Tensor]]
    arg_validation: ClassVar[Callable[..., None]]
    is_differentiable = False

    def __init__(self, **kwargs: Any) -> None:
        parameters = inspect.signature(self.function).parameters.values()
        defaults = {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in self.requires}
        options = {name: kwargs.pop(name, default) for name, default in defaults.items()}
        super().__init__(**kwargs)
        self.arg_validation(**{name: options[name] for name in inspect.signature(self.arg_validation).parameters})
        self.option_names = tuple(options)
        for name, value in options.items():
            setattr(self, name, value)
        self.add_state("value_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, *args: Any, **inputs: Any) -> None:
        """Add ``function(**inputs)`` [B] of one batch: the inputs named in ``requires``, by keyword or in order."""
        inputs.update(zip(self.requires, args))
        values = self.function(**inputs, **{name: getattr(self, name) for name in self.option_names})
        self.value_sum += values.to(self.value_sum.device, torch.float64).sum()
        self.count += values.shape[0]

    def compute(self) -> Tensor:
        """Mean of the per-image values over every image seen."""
        return (self.value_sum / self.count.clamp_min(1)).float()
