"""Sound upper bounds of the L2 operator norms of the affine operators (used by their Lipschitz gains)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from explain.bounds.linear import Conv2d

#: relative margin on the computed operator norms (float64 eigenvalues of float32 weights)
MARGIN = 1e-6


def conv_operator_norm(node: Conv2d, size: tuple[int, int]) -> float:
    """Upper bound of the L2 operator norm of ``node`` on inputs of spatial ``size``.

    Zero padding (any stride): the convolution is a crop of the full linear convolution, which equals the
    circular convolution on a grid of ``size + k - 1`` (no wrap-around), whose norm is the largest singular
    value of the kernel's 2-D DFT over the grid's frequencies (Sedghi et al. 2019; per group: the operator is
    block diagonal), computed as the square root of the top eigenvalue of each frequency's Gram matrix.
    Circular padding of ``(k - 1) / 2`` on each side, stride 1: exactly that circulant on ``size``. Other
    padding modes: ``sqrt(||M||_1 ||M||_inf)`` of the whole map (sound, looser).
    """
    weight = node.weight.double()
    groups = node.groups
    out_channels, in_per_group, kh, kw = weight.shape
    dh, dw = node.dilation
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    padding = node.padding if not isinstance(node.padding, str) else None
    circulant = (
        node.padding_mode == "circular" and padding is not None and tuple(node.stride) == (1, 1)
        and all(2 * p == s - 1 for p, s in zip(padding, span))
    )
    if node.padding_mode == "zeros" or circulant:
        grid = size if circulant else (size[0] + span[0] - 1, size[1] + span[1] - 1)
        if circulant and (grid[0] < span[0] or grid[1] < span[1]):
            return generic_conv_norm(node, size)
        dilated = weight.new_zeros(out_channels, in_per_group, *span)
        dilated[:, :, ::dh, ::dw] = weight
        # a real kernel's spectrum at -w is the conjugate of that at w (same singular values): half suffices
        spectrum = torch.fft.rfft2(dilated, s=grid)  # [O, I/g, G0, G1 // 2 + 1]
        blocks = spectrum.view(groups, out_channels // groups, in_per_group, -1).permute(0, 3, 1, 2)
        gram = blocks.mH @ blocks if blocks.shape[-2] >= blocks.shape[-1] else blocks @ blocks.mH
        return torch.linalg.eigvalsh(gram)[..., -1].max().clamp(min=0).sqrt().item() * (1 + MARGIN)
    return generic_conv_norm(node, size)


def generic_conv_norm(node: Conv2d, size: tuple[int, int]) -> float:
    """``sqrt(||M||_1 ||M||_inf)`` of the convolution ``M`` (with its padding mode): row sums of ``|M|`` by
    convolving ones with ``|W|``, column sums by its transpose."""
    ones = torch.ones(1, node.weight.shape[1] * node.groups, *size, dtype=node.weight.dtype, device=node.weight.device)
    return _row_column_norm(lambda x: node.apply(x, node.abs_weight), ones)[0]


def positive_map_norm(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[float, float]:
    """(``sqrt(||M||_1 ||M||_inf)``, largest row sum) of a linear map ``fn`` with nonnegative coefficients."""
    return _row_column_norm(fn, torch.ones_like(x))


def _row_column_norm(fn: Callable[[Tensor], Tensor], ones: Tensor) -> tuple[float, float]:
    with torch.inference_mode(False), torch.enable_grad():
        x = ones.clone().requires_grad_(True)
        rows = fn(x)
        (columns,) = torch.autograd.grad(rows, x, torch.ones_like(rows))
    row_max = rows.max().item()
    return math.sqrt(row_max * columns.max().item()) * (1 + MARGIN), row_max
