"""Robustness certificates of 1-Lipschitz classifiers (Tsuzuku et al. 2018; Serrurier et al. 2021).

With a 1-Lipschitz body ``phi`` and a last linear layer ``f(x) = W phi(x) + b``, the margin ``f_i - f_j`` is
``||w_i - w_j||``-Lipschitz, so ``L = max_{i != j} ||w_i - w_j||`` bounds the Lipschitz constant of every margin
(``sqrt(2)`` for orthonormal rows, at most 2 for unit-norm rows). No L2 perturbation smaller than
``(f_top1(x) - f_top2(x)) / L`` can change the prediction: that is the certified radius.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` (torchlip's ``FrobeniusLinear``/``SpectralLinear`` included) of ``model``."""
    linear = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            linear = module
    if linear is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to read the margin Lipschitz constant from")
    return linear


def margin_lipschitz(weight: Tensor | nn.Linear) -> Tensor:
    """``max_{i != j} ||w_i - w_j||_2`` over the rows of the last layer's weight [K, D] (exact, from the weights)."""
    if isinstance(weight, nn.Linear):
        weight = weight.weight  # evaluates torchlip's parametrization: the weight actually used
    weight = weight.detach()
    if weight.ndim != 2 or weight.shape[0] < 2:
        raise ValueError(f"need a weight [K >= 2, D], got shape {tuple(weight.shape)}")
    return torch.cdist(weight[None].double(), weight[None].double())[0].max().to(weight.dtype)


def certified_radius(logits: Tensor, lipschitz: Tensor | float) -> Tensor:
    """``(f_top1 - f_top2) / L`` [B]: the L2 radius around each input within which the prediction cannot change."""
    top2 = logits.detach().topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) / lipschitz


def certified_correct(logits: Tensor, labels: Tensor, lipschitz: Tensor | float, radius: float) -> Tensor:
    """bool [B]: the prediction is right AND certified at ``radius`` (``certified_radius >= radius``)."""
    correct = logits.detach().argmax(1) == labels.reshape(-1).to(logits.device)
    return correct & (certified_radius(logits, lipschitz) >= radius)


def certified_accuracy(logits: Tensor, labels: Tensor, lipschitz: Tensor | float, radius: float) -> Tensor:
    """Share of inputs that are right with a certified radius of at least ``radius``."""
    return certified_correct(logits, labels, lipschitz, radius).float().mean()
