"""``SpuriousMass``: the share of an explanation's positive mass on spurious pixels, as a torchmetrics Metric."""

from __future__ import annotations

import torch
from torch import Tensor

from explain.metrics.base import ExplanationMetric
from explain.metrics.functional.spurious import spurious_mass
from explain.registry import register_metric


@register_metric("spurious")
class SpuriousMass(ExplanationMetric):
    """Mean over images of ``sum(relu(map) * mask) / sum(relu(map))``
    (:func:`explain.metrics.functional.spurious.spurious_mass`), the mask marking pixels a model right for the
    right reasons should ignore (the data contract's ``spurious_mask``, e.g. the shortcut watermark).

    ``update(maps [B,H,W], spurious_mask [B,H,W] bool)``. Images whose map has no positive mass (all zero or all
    negative) have no share to give and are left out; an empty mask counts as 0. ``compute()`` is NaN when no
    image was counted (no score without an image to support it). The sums sync across processes (torchmetrics).
    Lower is better; compare with the mask's area share (what a uniform map scores).

    >>> metric = SpuriousMass()
    >>> maps, mask = torch.tensor([[[3.0, 1.0], [-2.0, 0.0]]]), torch.tensor([[[True, False], [True, False]]])
    >>> metric.update(maps=maps, spurious_mask=mask)
    >>> metric.compute()
    tensor(0.7500)
    """

    requires = ("maps", "spurious_mask")
    higher_is_better = False
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("mass_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    @property
    def name(self) -> str:
        return "spurious_mass"

    def update(self, maps: Tensor, spurious_mask: Tensor) -> None:
        share = spurious_mass(maps, spurious_mask)
        counted = ~share.isnan()
        self.mass_sum += share[counted].sum().to(self.mass_sum.device)
        self.count += counted.sum().to(self.count.device)

    def compute(self) -> Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"))
        return (self.mass_sum / self.count).float()
