"""``Deletion``, ``Insertion`` and ``MuFidelity``: fidelity metrics as torchmetrics Metrics.

They only accumulate sums of the per-image values of :mod:`explain.metrics.functional.fidelity` (synced across
processes with ``dist_reduce_fx="sum"``); ``compute()`` is the mean over every image seen.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from explain.metrics.base import ExplanationMetric, MeanOverImages
from explain.metrics.functional.fidelity import (
    Baseline,
    _causal_fidelity_arg_validation,
    _mufidelity_arg_validation,
    auc,
    causal_curve,
    mufidelity,
)
from explain.registry import register_metric


class _CausalFidelity(ExplanationMetric):
    requires = ("model", "images", "targets", "maps")
    is_differentiable = False
    mode: ClassVar[str]  # "deletion" or "insertion": the curve of explain.metrics.functional.causal_curve

    def __init__(self, steps: int = 10, baseline: Baseline = 0.0, batch_size: int = 64, **kwargs) -> None:
        super().__init__(**kwargs)
        _causal_fidelity_arg_validation(steps, batch_size)
        self.steps = steps
        self.baseline = baseline
        self.batch_size = batch_size
        dtype = torch.float64
        self.add_state("auc_sum", default=torch.tensor(0.0, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("curve_sum", default=torch.zeros(steps + 1, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=dtype), dist_reduce_fx="sum")

    def update(self, model: nn.Module, images: Tensor, targets: Tensor, maps: Tensor) -> None:
        curves = causal_curve(
            model, images, targets, maps, mode=self.mode, steps=self.steps, baseline=self.baseline,
            batch_size=self.batch_size,
        )
        curves = curves.to(self.auc_sum.device, torch.float64)
        self.auc_sum += auc(curves).sum()
        self.curve_sum += curves.sum(0)
        self.count += curves.shape[0]

    def compute(self) -> Tensor:
        """Mean area under the curve over every image seen."""
        return (self.auc_sum / self.count.clamp_min(1)).float()

    def compute_curve(self) -> Tensor:
        """Mean curve [steps + 1] over every image seen, for a plot (synced like ``compute``: in a distributed
        run every process must call it)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self.sync_on_compute):
            return (self.curve_sum / self.count.clamp_min(1)).float()


@register_metric("deletion")
class Deletion(_CausalFidelity):
    """Deletion (Petsiuk et al. 2018): area under ``f(x_k)[y]`` as the top pixels of the map are set to
    ``baseline`` in ``steps`` equal stages (trapezoid mean). Lower is better.

    ``update(model, images [B,C,H,W], targets [B], maps [B,H,W])``; ``compute()`` -> mean AUC.

    Raises:
        ValueError: ``steps`` or ``batch_size`` not a positive int; at ``update``, inputs that do not match.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    >>> images, targets = torch.rand(2, 3, 4, 4), torch.tensor([0, 1])
    >>> metric = Deletion(steps=4)
    >>> metric.update(model=model, images=images, targets=targets, maps=torch.rand(2, 4, 4))
    >>> metric.compute().shape, metric.compute_curve().shape  # mean AUC, mean curve over the 5 stages
    (torch.Size([]), torch.Size([5]))
    """

    mode = "deletion"
    higher_is_better = False


@register_metric("insertion")
class Insertion(_CausalFidelity):
    """Insertion (Petsiuk et al. 2018): area under ``f(x_k)[y]`` as the top pixels of the map are copied onto
    the ``baseline`` image in ``steps`` equal stages (trapezoid mean). Higher is better.

    ``update(model, images [B,C,H,W], targets [B], maps [B,H,W])``; ``compute()`` -> mean AUC.

    Raises:
        ValueError: ``steps`` or ``batch_size`` not a positive int; at ``update``, inputs that do not match.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 1, bias=False))
    >>> with torch.no_grad():
    ...     _ = model[1].weight.fill_(1.0)  # the score is the sum of the pixels
    >>> metric = Insertion(steps=2)  # onto a black baseline: 0, then half of the pixels, then all
    >>> metric.update(model=model, images=torch.ones(1, 3, 4, 4), targets=torch.tensor([0]), maps=torch.rand(1, 4, 4))
    >>> metric.compute()  # trapezoid mean of the curve [0, 24, 48]
    tensor(24.)
    """

    mode = "insertion"
    higher_is_better = True


@register_metric("mufidelity")
class MuFidelity(MeanOverImages):
    """MuFidelity (Bhatt et al. 2020): mean over images of the Spearman rho between the score drops of random
    cell removals and the attribution of the removed cells (:func:`~explain.metrics.functional.mufidelity`).
    Higher is better (1: the map ranks the removals exactly as the model does).

    ``update(model, images [B,C,H,W], targets [B], maps [B,H,W])``; ``compute()`` -> mean rho. Options (the
    keyword-only options of the function, with its defaults): ``grid_size=9``, ``subset_percent=0.2``,
    ``nb_samples=200``, ``baseline=0.0``, ``batch_size=64``, ``seed=0``.

    Raises:
        ValueError: ``grid_size`` or ``batch_size`` not a positive int, ``subset_percent`` outside (0, 1),
            ``nb_samples < 2``; at ``update``, inputs that do not match.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 1, bias=False))
    >>> images = torch.rand(2, 3, 4, 4)
    >>> exact = (model[1].weight.view(3, 4, 4) * images).sum(1)  # each pixel's exact share of the score
    >>> metric = MuFidelity(grid_size=4, nb_samples=20)
    >>> metric.update(model=model, images=images, targets=torch.tensor([0, 0]), maps=exact)
    >>> round(metric.compute().item(), 4)  # the drops rank exactly as the removed attributions
    1.0
    """

    requires = ("model", "images", "targets", "maps")
    higher_is_better = True
    function = staticmethod(mufidelity)
    arg_validation = staticmethod(_mufidelity_arg_validation)
