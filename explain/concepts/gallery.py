"""A figure of each concept's top crops, one row a concept, rows ordered by importance (CRAFT, Fel et al. 2023)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def top_crops(u: Tensor, top_k: int) -> Tensor:
    """Indices [r, k] of the ``k = min(top_k, n)`` crops with the largest coefficient of each concept (``u`` [n, r])."""
    return u.topk(min(top_k, u.shape[0]), dim=0).indices.T


def concept_order(importance: Tensor | None, n_concepts: int) -> list[int]:
    """Concepts by decreasing importance (by index when ``importance`` is None).

    Raises:
        ValueError: ``importance`` without one value per concept.
    """
    if importance is None:
        return list(range(n_concepts))
    importance = torch.as_tensor(importance).reshape(-1)
    if importance.shape[0] != n_concepts:
        raise ValueError(f"importance must have one value per concept ({n_concepts}), got {tuple(importance.shape)}")
    return importance.argsort(descending=True, stable=True).tolist()


def _displayable(crop: Tensor) -> Tensor:
    """[C, h, w] -> [h, w, C] (or [h, w]) in [0, 1]: kept as is when already there, min-max scaled otherwise."""
    crop = crop.detach().float().cpu()
    low, high = crop.min(), crop.max()
    if low < 0 or high > 1:
        crop = (crop - low) / (high - low).clamp_min(1e-12)
    return crop[0] if crop.shape[0] == 1 else crop.permute(1, 2, 0)


def concept_gallery(
    crops: Tensor,
    u: Tensor,
    importance: Tensor | None = None,
    top_k: int = 10,
    concepts: list[int] | None = None,
    crop_inches: float = 1.2,
) -> Figure:
    """Figure with one row per concept: its ``top_k`` crops (largest ``u[:, k]`` first).

    ``crops`` [n, C, h, w], ``u`` [n, r]; rows follow ``concepts`` if given, else decreasing ``importance``.
    Each row is titled with the concept index and, when known, its importance.

    Raises:
        ValueError: ``crops`` and ``u`` with different numbers of rows.
    """
    import matplotlib.pyplot as plt

    if crops.ndim != 4 or u.ndim != 2 or crops.shape[0] != u.shape[0]:
        raise ValueError(
            f"crops [n, C, h, w] and u [n, r] must have the same n, got {tuple(crops.shape)} and {tuple(u.shape)}"
        )
    order = concepts if concepts is not None else concept_order(importance, u.shape[1])
    best = top_crops(u, top_k)
    columns = best.shape[1]
    figure, axes = plt.subplots(
        len(order), columns, figsize=(crop_inches * columns, crop_inches * len(order)), squeeze=False
    )
    for row, concept in enumerate(order):
        for column in range(columns):
            axis = axes[row, column]
            axis.imshow(_displayable(crops[best[concept, column]]), cmap="gray")
            axis.set_xticks([])
            axis.set_yticks([])
        label = f"concept {concept}"
        if importance is not None:
            label += f"\n{float(torch.as_tensor(importance).reshape(-1)[concept]):.3f}"
        axes[row, 0].set_ylabel(label, rotation=0, ha="right", va="center")
    figure.tight_layout()
    return figure
