"""Human alignment of explanation maps (Fel et al. 2022, "Harmonizing the object recognition strategies of
deep neural networks with humans"; reference evaluation of serre-lab/Harmonization).

* per-image Spearman rank correlation between the model map and the human map at full resolution; the
  alignment score is ``mean(rho) / ceiling`` with the ClickMe human inter-rater ceiling 0.65753;
* Dice and IoU of the top-10% pixels of each map.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional import spearman_corrcoef

CLICKME_CEILING = 0.65753


def _flatten_pair(maps: Tensor, human: Tensor) -> tuple[Tensor, Tensor]:
    if maps.ndim != 3 or maps.shape != human.shape:
        raise ValueError(
            f"maps and human maps must both be [B, H, W] of the same shape, got {tuple(maps.shape)} and "
            f"{tuple(human.shape)}"
        )
    return maps.flatten(1).float(), human.flatten(1).float().to(maps.device)


def per_image_spearman(maps: Tensor, human: Tensor) -> Tensor:
    """Spearman rho [B] between each model map [B,H,W] and its human map (ties get average ranks).

    A constant map has no ranking and gets rho = 0.
    """
    maps, human = _flatten_pair(maps, human)
    if maps.shape[0] == 0:
        return maps.new_zeros(0)
    # torchmetrics correlates columns: [H*W, B]
    rho = spearman_corrcoef(maps.T.contiguous(), human.T.contiguous())
    constant = (maps.amax(1) == maps.amin(1)) | (human.amax(1) == human.amin(1))
    return torch.where(constant, torch.zeros_like(rho), rho).reshape(-1)


def top_fraction_mask(maps: Tensor, fraction: float = 0.1) -> Tensor:
    """Boolean mask [B,N] of the ``ceil(fraction * N)`` largest values of each flattened map (ties by index)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flat = maps.flatten(1)
    k = max(1, int(round(fraction * flat.shape[1])))
    index = flat.topk(k, dim=1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, index, True)


def top_fraction_dice_iou(maps: Tensor, human: Tensor, fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """Dice ``2|A∩B| / (|A|+|B|)`` and IoU ``|A∩B| / |A∪B|`` [B] of the top-``fraction`` pixels of both maps."""
    maps, human = _flatten_pair(maps, human)
    a, b = top_fraction_mask(maps, fraction), top_fraction_mask(human, fraction)
    inter = (a & b).sum(1).float()
    dice = 2 * inter / (a.sum(1) + b.sum(1)).float()
    iou = inter / (a | b).sum(1).float()
    return dice, iou
