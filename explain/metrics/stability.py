"""``AverageStability``: sensitivity of explanations to small input noise, as a torchmetrics Metric.

MeGe and ReCo need ``k`` models trained on ``k`` folds, not a stream of batches: they are the plain function
:func:`explain.metrics.functional.stability.mege_reco`.
"""

from __future__ import annotations

from explain.metrics.base import MeanOverImages
from explain.metrics.functional.stability import _average_stability_arg_validation, average_stability
from explain.registry import register_metric


@register_metric("stability")
class AverageStability(MeanOverImages):
    """AverageStability (Bhatt et al. 2020): mean distance between the map of ``x`` and the maps of
    ``nb_samples`` neighbours ``x + U(0, radius)`` (:func:`~explain.metrics.functional.average_stability`).
    Lower is better.

    ``update(explainer, images [B,C,H,W], targets [B], maps [B,H,W])`` with ``maps = explainer(images, targets)``;
    ``compute()`` -> mean distance over every image seen. Costs ``nb_samples`` explanations per image. Options
    (the keyword-only options of the function, with its defaults): ``radius=0.1``, ``nb_samples=20``,
    ``distance="l2"``, ``batch_size=64``, ``seed=0``.

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
    function = staticmethod(average_stability)
    arg_validation = staticmethod(_average_stability_arg_validation)
