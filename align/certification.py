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
    """The last ``nn.Linear`` (torchlip's ``FrobeniusLinear``/``SpectralLinear`` included) of ``model``.

    Raises:
        ValueError: ``model`` has no ``nn.Linear`` layer.
    """
    linear = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            linear = module
    if linear is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to read the margin Lipschitz constant from")
    return linear


def margin_lipschitz(weight: Tensor | nn.Linear) -> Tensor:
    """``max_{i != j} ||w_i - w_j||_2`` over the rows of the last layer's weight [K, D] (exact, from the weights).

    Raises:
        ValueError: ``weight`` not [K >= 2, D].
    """
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


def conv_operator_norm(conv: nn.Conv2d, size: tuple[int, int]) -> float:
    """Upper bound of the L2 operator norm of a stride-1 ``conv`` on [C, H, W] inputs of spatial ``size``
    (Sedghi et al. 2019): the largest singular value of the kernel's 2-D discrete Fourier transform, over the
    frequencies of an ``H x W`` torus for circular padding (exact), of an ``(H + k - 1) x (W + k - 1)`` one for
    zero padding (the full convolution, of which the padded one is a restriction: a sound bound).

    Raises:
        ValueError: a stride, dilation or groups other than 1, or a padding mode other than zeros or circular.
    """
    if conv.groups != 1 or tuple(conv.stride) != (1, 1) or tuple(conv.dilation) != (1, 1):
        raise ValueError(f"conv_operator_norm needs stride 1, dilation 1 and groups 1, got {conv}")
    weight = conv.weight.detach().double()
    kernel = weight.shape[-2:]
    if conv.padding_mode == "circular":
        grid = tuple(max(n, k) for n, k in zip(size, kernel))
    elif conv.padding_mode == "zeros":
        grid = tuple(n + k - 1 for n, k in zip(size, kernel))
    else:
        raise ValueError(f"conv_operator_norm handles circular and zero padding, got {conv.padding_mode!r}")
    spectrum = torch.fft.fft2(weight, s=grid)  # [out, in, H', W']
    return torch.linalg.matrix_norm(spectrum.permute(2, 3, 0, 1), ord=2).max().item()


def lipschitz_upper_bound(model: nn.Module, sample: Tensor) -> tuple[float, float]:
    """Layer-wise certificate of a plain sequential network (e.g. :func:`align.models.export_plain`'s copy of a
    zoo network) on inputs shaped like ``sample`` [1, C, H, W]: ``(L_body, L_logit)``, where ``L_body`` bounds
    the L2 Lipschitz constant of everything before the last linear layer (the product of the layers' bounds; a
    ``merge(x, branch(x)) = s x + (1 - s) branch(x)`` block gives ``s + (1 - s) L_branch``) and ``L_logit =
    L_body * max_i ||w_i||`` that of every single logit.

    Layers: ``Conv2d`` (:func:`conv_operator_norm`), ``Linear`` (spectral norm), and the 1-Lipschitz
    ``PixelUnshuffle``, GroupSort2/MaxMin, L2-norm pooling, ``Flatten``, ``Identity``; anything else raises.

    Raises:
        ValueError: ``model`` does not end with an ``nn.Linear`` head, or a layer as
            :func:`conv_operator_norm` refuses.
    """
    children = list(model.children())
    head = children[-1] if children and isinstance(children[-1], nn.Linear) else None
    if head is None:
        raise ValueError(f"{type(model).__name__} must end with a nn.Linear head")
    with torch.no_grad():
        body, x = _bound(nn.Sequential(*children[:-1]), sample)
    return body, body * head.weight.detach().norm(dim=1).max().item()


def _bound(module: nn.Module, x: Tensor) -> tuple[float, Tensor]:
    """(Lipschitz bound of ``module``, its output on ``x``)."""
    from deel.torchlip import GroupSort, InvertibleDownSampling, LipResidual, MaxMin
    from deel.torchlip.modules.pooling import ScaledAdaptativeL2NormPool2d, ScaledL2NormPool2d

    if type(module) is nn.Sequential:
        bound = 1.0
        for child in module.children():
            factor, x = _bound(child, x)
            bound *= factor
        return bound, x
    merge, branch = getattr(module, "merge", None), getattr(module, "branch", None)
    if isinstance(merge, LipResidual) and branch is not None:
        weight = torch.sigmoid(merge.alpha.detach()).item()
        factor, _ = _bound(branch, x)
        return weight + (1 - weight) * factor, module(x)
    if isinstance(module, nn.Conv2d):
        return conv_operator_norm(module, tuple(x.shape[-2:])), module(x)
    if isinstance(module, nn.Linear):
        return torch.linalg.matrix_norm(module.weight.detach().double(), ord=2).item(), module(x)
    if isinstance(module, (GroupSort, MaxMin)):
        return float(module._coefficient_lip), module(x)
    if isinstance(module, (ScaledL2NormPool2d, ScaledAdaptativeL2NormPool2d)):
        return float(module._coefficient_lip), module(x)  # sqrt of a sum of squares per disjoint window
    if type(module) in (nn.PixelUnshuffle, InvertibleDownSampling, nn.Flatten, nn.Identity):
        return 1.0, module(x)
    raise ValueError(f"lipschitz_upper_bound has no rule for {type(module).__name__}")
