"""``Simulatability``: the utility of an explanation for predicting a model's decisions, as a torchmetrics Metric."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.utilities import dim_zero_cat

from explain.base import eval_mode
from explain.metrics.base import ExplanationMetric
from explain.metrics.functional.simulatability import (
    confidence_interval,
    simulatability,
    simulatability_arg_validation,
    with_controls,
)
from explain.registry import register_metric
from explain.validation import in_interval, int_at_least


@register_metric("simulatability")
class Simulatability(ExplanationMetric):
    """Utility of the maps for a meta-predictor of the model's decisions (Colin et al. 2022; the protocol, the
    meta-predictors and the controls: :mod:`explain.metrics.functional.simulatability`).

    ``update(maps [B,H,W], images [B,C,H,W], model, spurious_mask [B,H,W] = None)`` keeps the images, the model's
    decisions (``argmax model(images)``), the maps and, when the data carry one, the ``spurious_mask`` (the oracle
    map), up to ``max_observations`` per process. ``compute()`` gathers them (torchmetrics' ``cat`` sync: every
    process trains the same predictors on the same observations) and returns ``utility`` (the mean over seeds of
    ``acc_with / acc_without - 1``), its ``utility_low``/``utility_high`` interval, ``accuracy_without``, and
    the controls' mean utility ``random`` and, with a mask, ``oracle``.

    Its cost is ``seeds * (2 + controls) * steps`` training steps of a small CNN; a few hundred observations are
    needed for a meaningful score (``ExplanationMonitor``'s ``max_images`` is that number per process).

    Raises:
        ValueError: ``max_observations`` below 4, ``level`` outside (0, 1), or an option
            :func:`~explain.metrics.functional.simulatability.simulatability_arg_validation` refuses.
    """

    requires = ("maps", "images", "model", "spurious_mask")
    main_score = "utility"
    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(
        self,
        max_observations: int = 512,
        level: float = 0.95,
        test_fraction: float = 0.5,
        budget: int | None = None,
        seeds: int = 5,
        steps: int = 150,
        batch_size: int = 32,
        lr: float = 3e-3,
        width: int = 16,
        explanation_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.max_observations = int_at_least("max_observations", max_observations, 4)
        self.level = in_interval("level", level, 0, 1, low_open=True, high_open=True)
        self.options = dict(
            test_fraction=test_fraction, budget=budget, seeds=seeds, steps=steps, batch_size=batch_size, lr=lr,
            width=width, explanation_weight=explanation_weight,
        )  # fmt: skip
        simulatability_arg_validation(**self.options)
        for key in ("images", "decisions", "maps", "oracle"):
            self.add_state(key, default=[], dist_reduce_fx="cat")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, maps: Tensor, images: Tensor, model: nn.Module, spurious_mask: Tensor | None = None) -> None:
        room = self.max_observations - int(self.count)
        if room <= 0:
            return
        images, maps = images[:room].detach(), maps[:room].detach()
        with torch.no_grad(), eval_mode(model):
            decisions = model(images).argmax(1)
        self.images.append(images.float())
        self.decisions.append(decisions)
        self.maps.append(maps.float())
        if spurious_mask is not None:
            self.oracle.append(spurious_mask[:room].float())
        self.count += images.shape[0]

    def compute(self) -> dict[str, Tensor]:
        images, decisions, maps = (dim_zero_cat(state) for state in (self.images, self.decisions, self.maps))
        oracle = dim_zero_cat(self.oracle) if len(self.oracle) else None
        if oracle is not None and oracle.shape[0] != maps.shape[0]:
            oracle = None  # some batches carried no mask: no oracle for the whole set
        result = simulatability(
            images, decisions, with_controls({"maps": maps}, oracle), **self.options
        )
        mean, low, high = confidence_interval(result["utility"]["maps"], self.level)
        scores = {"utility": mean, "utility_low": low, "utility_high": high,
                  "accuracy_without": float(result["accuracy_without"].mean())}
        for name, values in result["utility"].items():
            if name != "maps":
                scores[name] = float(values.mean())
        return {key: torch.tensor(value) for key, value in scores.items()}

