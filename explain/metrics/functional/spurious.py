"""Spurious mass: how much of an explanation falls where a model right for the right reasons should not look.

For a map ``m`` [H,W] and a spurious mask ``s`` [H,W] (e.g. the shortcut watermark), the share of the map's
POSITIVE mass inside the mask::

    spurious_mass(m, s) = sum(relu(m) * s) / sum(relu(m))        in [0, 1]

Only positive evidence counts (a negative value says "this pixel speaks against the class", not "the model looks
here"). Compare it with the mask's area share ``mean(s)``: a map that ignores the mask scores 0, a map spread
uniformly scores the area share, and a model that reads the mask scores far above it.

Edge cases (tested):

* an empty mask gives 0 (no spurious pixel, no spurious mass), whatever the map;
* a map without positive mass (all zero, or all negative) has no share to give: NaN, and
  :class:`~explain.metrics.SpuriousMass` leaves such images out of its average.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_pair(maps: Tensor, masks: Tensor) -> Tensor:
    if maps.ndim != 3:
        raise ValueError(f"maps must be [B, H, W], got {tuple(maps.shape)}")
    if masks.shape == maps.shape[-2:]:  # one mask for every image
        masks = masks.expand_as(maps)
    if masks.shape != maps.shape:
        raise ValueError(
            f"spurious masks must be [B, H, W] (or [H, W]) like the maps {tuple(maps.shape)}, got {tuple(masks.shape)}"
        )
    if masks.dtype != torch.bool:
        raise TypeError(f"spurious masks must be bool (True = spurious pixel), got {masks.dtype}")
    return masks.to(maps.device)


def spurious_mass(maps: Tensor, masks: Tensor) -> Tensor:
    """Per image, the share of the map's positive mass inside the spurious mask: float64 [B] in [0, 1].

    Args:
        maps: explanations [B, H, W] (any sign; only the positive part counts).
        masks: bool [B, H, W] or [H, W] (shared by every image), True on the pixels to ignore.

    Returns:
        ``sum(relu(m) * s) / sum(relu(m))`` per image; 0 where the mask is empty, NaN where the map has no
        positive mass (and a non-empty mask).

    Raises:
        ValueError: the shapes differ. TypeError: the masks are not bool.

    >>> maps = torch.tensor([[[3.0, 1.0], [-2.0, 0.0]]])
    >>> spurious_mass(maps, torch.tensor([[True, False], [True, False]]))
    tensor([0.7500], dtype=torch.float64)
    """
    masks = _check_pair(maps, masks)
    positive = maps.detach().double().clamp_min(0).flatten(1)
    inside = (positive * masks.flatten(1)).sum(1)
    total = positive.sum(1)
    share = torch.where(total > 0, inside / total.clamp_min(torch.finfo(torch.float64).tiny), torch.nan)
    return torch.where(masks.flatten(1).any(1), share, torch.zeros_like(share))


def spurious_area(masks: Tensor) -> Tensor:
    """The mask's area share per image, ``mean(s)``: float64 [B] (the spurious mass of a uniform map).

    Raises:
        ValueError: ``masks`` not bool [B, H, W].
    """
    if masks.ndim != 3 or masks.dtype != torch.bool:
        raise ValueError(f"spurious masks must be bool [B, H, W], got {tuple(masks.shape)} {masks.dtype}")
    return masks.flatten(1).double().mean(1)
