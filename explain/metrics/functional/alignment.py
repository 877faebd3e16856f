"""Human alignment of explanation maps (Fel et al. 2022, "Harmonizing the object recognition strategies of
deep neural networks with humans"; reference evaluation of serre-lab/Harmonization).

* per-image Spearman rank correlation between the model map and the human map at full resolution; the
  alignment score is ``mean(rho) / ceiling`` with the ClickMe human inter-rater ceiling 0.65753;
* Dice and IoU of the pixels strictly above each map's 90th percentile (numpy's linear-interpolation
  percentile), as the reference's ``harmonization/evaluation/metrics.py``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from explain.validation import in_interval

CLICKME_CEILING = 0.65753


def _flatten_pair(maps: Tensor, human: Tensor) -> tuple[Tensor, Tensor]:
    if maps.ndim != 3 or maps.shape != human.shape:
        raise ValueError(
            f"maps and human maps must both be [B, H, W] of the same shape, got {tuple(maps.shape)} and "
            f"{tuple(human.shape)}"
        )
    return maps.flatten(1).float(), human.flatten(1).float().to(maps.device)


def average_ranks(x: Tensor) -> Tensor:
    """Ranks (1-based, float64) of the values of each row of ``x`` [B,N]; tied values share their average rank
    (``scipy.stats.rankdata(method="average")`` per row)."""
    b, n = x.shape
    if x.numel() == 0:
        return torch.zeros(b, n, dtype=torch.float64, device=x.device)
    sorted_x, order = x.sort(dim=1)
    starts_group = torch.ones_like(sorted_x, dtype=torch.bool)
    starts_group[:, 1:] = sorted_x[:, 1:] != sorted_x[:, :-1]
    # groups of tied values, numbered across the whole batch (row r's groups come after row r-1's)
    group = starts_group.flatten().long().cumsum(0) - 1
    position = torch.arange(n, dtype=torch.float64, device=x.device).repeat(b)
    nb_groups = int(group[-1]) + 1
    first = torch.full((nb_groups,), float(n), dtype=torch.float64, device=x.device)
    first = first.scatter_reduce(0, group, position, reduce="amin")
    last = torch.zeros(nb_groups, dtype=torch.float64, device=x.device).scatter_reduce(0, group, position, "amax")
    sorted_ranks = ((first + last) / 2 + 1)[group].view(b, n)
    return torch.empty_like(sorted_ranks).scatter_(1, order, sorted_ranks)


def rowwise_spearman(x: Tensor, y: Tensor) -> Tensor:
    """Spearman rho [B] between the rows of ``x`` and ``y`` [B,N]: Pearson correlation of the average ranks
    (ties handled as ``scipy.stats.spearmanr``), computed and returned in float64.

    A constant row has no ranking and gets rho = 0 (scipy gives NaN); a row holding a NaN gets NaN.

    Raises:
        ValueError: ``x`` and ``y`` not both [B, N] of the same shape.
    """
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must both be [B, N] of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    y = y.to(x.device)
    if x.shape[0] == 0 or x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(1, keepdim=True), ry - ry.mean(1, keepdim=True)
    norm = (rx.square().sum(1) * ry.square().sum(1)).sqrt()
    rho = (rx * ry).sum(1) / norm.clamp_min(torch.finfo(torch.float64).tiny)
    # a constant row has all ranks equal: zero variance, no ranking
    rho = torch.where(norm > 0, rho, torch.zeros_like(rho)).clamp(-1.0, 1.0)
    return rho.masked_fill(x.isnan().any(1) | y.isnan().any(1), float("nan"))


def per_image_spearman(maps: Tensor, human: Tensor) -> Tensor:
    """Spearman rho [B] between each model map [B,H,W] and its human map (ties get average ranks).

    A constant map has no ranking and gets rho = 0.
    """
    return rowwise_spearman(*_flatten_pair(maps, human)).float()


#: the reference's guard against empty masks in Dice and IoU (``harmonization/evaluation/metrics.py``)
DICE_IOU_EPSILON = 1e-9


def linear_percentile(flat: Tensor, q: float) -> Tensor:
    """Per-row ``q``-quantile [B] of ``flat`` [B,N] with numpy's default ``"linear"`` interpolation, rounded as
    ``numpy.percentile`` rounds it: virtual index ``(N - 1) q`` in float64, and the lerp ``a + (b - a) g``
    (``b - (b - a)(1 - g)`` when ``g >= 0.5``) in the data's dtype, so a threshold equals numpy's bit for bit."""
    n = flat.shape[1]
    position = (n - 1) * q
    below = min(max(math.floor(position), 0), n - 1)
    above = min(below + 1, n - 1)
    gamma = position - math.floor(position)
    sorted_flat = flat.sort(dim=1).values
    a, b = sorted_flat[:, below], sorted_flat[:, above]
    difference = b - a
    if gamma >= 0.5:
        return b - difference * torch.tensor(1 - gamma, dtype=flat.dtype, device=flat.device)
    return a + difference * torch.tensor(gamma, dtype=flat.dtype, device=flat.device)


def top_fraction_mask(maps: Tensor, fraction: float = 0.1) -> Tensor:
    """Boolean mask [B,N] of the pixels of each flattened map STRICTLY above its ``100 (1 - fraction)``-th
    percentile (numpy's linear interpolation), the reference's binarisation.

    Ties are never broken by position: on a map whose zeros fill more than ``1 - fraction`` of it, the percentile
    is 0 and only its nonzero pixels are kept; a constant map keeps none."""
    in_interval("fraction", fraction, 0, 1, low_open=True)
    flat = maps.flatten(1)
    if flat.shape[1] == 0:
        return torch.zeros_like(flat, dtype=torch.bool)
    return flat > linear_percentile(flat, 1.0 - fraction)[:, None]


def top_fraction_dice_iou(maps: Tensor, human: Tensor, fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """Dice ``2|A∩B| / (|A| + |B| + 1e-9)`` and IoU ``|A∩B| / (|A∪B| + 1e-9)`` [B] of the masks of
    :func:`top_fraction_mask` (pixels strictly above each map's 90th percentile at ``fraction=0.1``), as
    ``harmonization/evaluation/metrics.py``: two empty masks score 0."""
    maps, human = _flatten_pair(maps, human)
    a, b = top_fraction_mask(maps, fraction), top_fraction_mask(human, fraction)
    inter = (a & b).sum(1).double()
    dice = 2 * inter / ((a.sum(1) + b.sum(1)).double() + DICE_IOU_EPSILON)
    iou = inter / ((a | b).sum(1).double() + DICE_IOU_EPSILON)
    return dice.float(), iou.float()
