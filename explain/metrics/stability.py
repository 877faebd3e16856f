"""``AverageStability``: sensitivity of explanations to small input noise, as a torchmetrics Metric.

MeGe and ReCo need ``k`` models trained on ``k`` folds, not a stream of batches: they are the plain function
:func:`explain.metrics.functional.stability.mege_reco`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from explain.metrics.base import ExplanationMetric
from explain.metrics.functional.stability import MapFn, _average_stability_arg_validation, average_stability
from explain.registry import register_metric


@register_metric("stability")
class AverageStability(ExplanationMetric):
    """AverageStability (Bhatt et al. 2020): mean distance between the map of ``x`` and the maps of
    ``nb_samples`` neighbours ``x + U(0, radius)`` (:func:`~explain.metrics.functional.average_stability`).
    Lower is better.

    ``update(explainer, images [B,C,H,W], targets [B], maps [B,H,W])`` with ``maps = explainer(images, targets)``;
    ``compute()`` -> mean distance over every image seen. Costs ``nb_samples`` explanations per image.

    Raises:
        ValueError: ``radius`` negative or not finite, ``nb_samples`` or ``batch_size`` not a positive int, or an
            unknown ``distance``.

    >>> import torch
    >>> from torch import nn
    >>> from explain import Saliency
    >>> explainer = Saliency(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)))
    >>> images, targets = torch.rand(2, 3, 4, 4), torch.tensor([0, 1])
    >>> metric = AverageStability(radius=0.1, nb_samples=3)
    >>> metric.update(explainer=explainer, images=images, targets=targets, maps=explainer(images, targets))
    >>> metric.compute()  # a linear model's gradient does not depend on the input: perfectly stable
    tensor(0.)
    """

    requires = ("explainer", "images", "targets", "maps")
    higher_is_better = False
    is_differentiable = False

    def __init__(
        self,
        radius: float = 0.1,
        nb_samples: int = 20,
        distance: str | Callable[[Tensor, Tensor], Tensor] = "l2",
        batch_size: int = 64,
        seed: int | None = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        _average_stability_arg_validation(radius, nb_samples, distance, batch_size)
        self.radius = radius
        self.nb_samples = nb_samples
        self.distance = distance
        self.batch_size = batch_size
        self.seed = seed
        self.add_state("distance_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, explainer: MapFn, images: Tensor, targets: Tensor, maps: Tensor) -> None:
        distances = average_stability(
            explainer,
            images,
            targets,
            radius=self.radius,
            nb_samples=self.nb_samples,
            distance=self.distance,
            batch_size=self.batch_size,
            seed=self.seed,
            maps=maps,
        )
        self.distance_sum += distances.to(self.distance_sum.device, torch.float64).sum()
        self.count += distances.shape[0]

    def compute(self) -> Tensor:
        """Mean distance over every image seen."""
        return (self.distance_sum / self.count.clamp_min(1)).float()
