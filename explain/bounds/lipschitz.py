"""Lipschitz (L2) bounds: the certificate of a 1-Lipschitz body, and Lipschitz boxes for intermediate layers.

**Certificate.** With ``h`` 1-Lipschitz (L2) and ``f = W h + b``, ``f_c - f_y`` changes by at most
``||w_c - w_y||_2 ||delta||_2`` (Anil et al. 2019; Tsuzuku et al. 2018). Over a box with centre ``x0`` and
half-widths ``r`` (zero where cells are fixed), ``||delta||_2 <= ||r||_2`` (``eps sqrt(n_free)`` for the L-inf
ball), so ``max f_c - f_y <= f_c(x0) - f_y(x0) + ||w_c - w_y||_2 ||r||_2``.

**Lipschitz boxes.** Interval boxes grow geometrically with depth (each layer multiplies their width by about
its L-inf operator norm), far faster than the L2 distance between two inputs' representations. So every
coordinate ``z_j`` reaching a nonlinear node gets a second enclosure ``z_j(x0) +- L_j ||r||_2``, with ``L_j``
a Lipschitz constant of ``x -> z_j(x)`` computed here from the weights (no declaration trusted): for a row
``w_j`` of an affine layer fed by a map of constant ``L``, ``L_j = ||w_j||_2 L`` (``||w_j||_1 L`` where a
padding mode maps several taps of a kernel to one pixel); the constant of a layer's whole output is ``L``
times its operator norm, bounded soundly (exact spectral norm for ``Linear``, the maximum over frequencies
of the kernel's Fourier transform for a zero- or circular-padded ``Conv2d``, ``sqrt(||M||_1 ||M||_inf)``
otherwise). The interval pass intersects both enclosures. On a 1-Lipschitz network
the Lipschitz box stays ``O(||r||_2)`` at every depth; on other networks it is usually looser than IBP and the
intersection keeps the IBP box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from explain.bounds.activations import MaxMin, PairSort, ReLU
from explain.bounds.containers import Chain, Residual
from explain.bounds.linear import ChannelAffine, Conv2d, Linear, PositiveLinear
from explain.bounds.node import Node, Records
from explain.bounds.pooling import L2NormPool, MaxPool

#: relative margin on the computed operator norms (float64 eigenvalues of float32 weights)
_MARGIN = 1e-6


def lipschitz_spec_upper(logits: Tensor, head_weight: Tensor, spec: Tensor, radius: Tensor) -> Tensor:
    """Upper bounds [n, r] of ``spec @ f(x)`` from ``logits`` [n, K] at the box centres, the last layer's
    weight [K, D], ``spec`` [n, r, K] and the half-widths ``radius`` [n, ...] of the boxes."""
    centre_values = (spec @ logits.unsqueeze(-1)).squeeze(-1)
    gaps = (spec @ head_weight).norm(dim=-1)
    return centre_values + gaps * radius.flatten(1).norm(dim=1, keepdim=True)


@dataclass
class Gain:
    """Lipschitz constants (L2, from the network input) of a node's output: ``whole`` for the output vector,
    ``coord`` for each coordinate (a tensor broadcastable to the output, e.g. [1, C, 1, 1], or 0-dim), and
    ``pair`` for each difference of channels ``(2j, 2j+1)`` (read by a following GroupSort2; None if unknown)."""

    whole: float
    coord: Tensor
    pair: Tensor | None = None


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
            return _generic_norm(node, size)
        dilated = weight.new_zeros(out_channels, in_per_group, *span)
        dilated[:, :, ::dh, ::dw] = weight
        # a real kernel's spectrum at -w is the conjugate of that at w (same singular values): half suffices
        spectrum = torch.fft.rfft2(dilated, s=grid)  # [O, I/g, G0, G1 // 2 + 1]
        blocks = spectrum.view(groups, out_channels // groups, in_per_group, -1).permute(0, 3, 1, 2)
        gram = blocks.mH @ blocks if blocks.shape[-2] >= blocks.shape[-1] else blocks @ blocks.mH
        return torch.linalg.eigvalsh(gram)[..., -1].max().clamp(min=0).sqrt().item() * (1 + _MARGIN)
    return _generic_norm(node, size)


def _generic_norm(node: Conv2d, size: tuple[int, int]) -> float:
    """``sqrt(||M||_1 ||M||_inf)`` of the convolution ``M`` (with its padding mode): row sums of ``|M|`` by
    convolving ones with ``|W|``, column sums by its transpose."""
    ones = torch.ones(1, node.weight.shape[1] * node.groups, *size, dtype=node.weight.dtype, device=node.weight.device)
    with torch.inference_mode(False), torch.enable_grad():
        x = ones.clone().requires_grad_(True)
        rows = node.apply(x, node.abs_weight)
        (columns,) = torch.autograd.grad(rows, x, torch.ones_like(rows))
    return math.sqrt(rows.max().item() * columns.max().item()) * (1 + _MARGIN)


def _positive_norm(node: PositiveLinear, x: Tensor) -> tuple[float, float]:
    """(``sqrt(||M||_1 ||M||_inf)``, largest row sum) of a linear map with nonnegative coefficients."""
    with torch.inference_mode(False), torch.enable_grad():
        ones = torch.ones_like(x).requires_grad_(True)
        rows = node.fn(ones)
        (columns,) = torch.autograd.grad(rows, ones, torch.ones_like(rows))
    row_max = rows.max().item()
    return math.sqrt(row_max * columns.max().item()) * (1 + _MARGIN), row_max


def _channel_view(values: Tensor, ndim: int) -> Tensor:
    return values.view(1, -1, *([1] * (ndim - 2)))


def _capped(coord: Tensor, whole: float) -> Tensor:
    return coord.clamp(max=whole)


def node_gains(node: Node, gain: Gain, x: Tensor, constants: dict[int, Gain]) -> tuple[Gain, Tensor]:
    """The gain of ``node``'s output from the gain of its input, and its output on the sample input ``x``
    [1, ...] (to know the shapes). Records the input gain of every nonlinear node in ``constants``."""
    out = node.interval(x, x, Records())[0] if not isinstance(node, (Chain, Residual)) else None
    if isinstance(node, Chain):
        for child in node.nodes:
            gain, x = node_gains(child, gain, x, constants)
        return gain, x
    if isinstance(node, Residual):
        short, x_short = node_gains(node.shortcut, gain, x, constants)
        branch, x_branch = node_gains(node.branch, gain, x, constants)
        merged = Gain(
            node.shortcut_weight * short.whole + node.branch_weight * branch.whole,
            node.shortcut_weight * short.coord + node.branch_weight * branch.coord,
        )
        return node_gains(node.post, merged, node.shortcut_weight * x_short + node.branch_weight * x_branch, constants)
    if isinstance(node, (Linear, Conv2d)):
        weight = node.weight.double()
        # a row of the map is the kernel, cropped at zero-padded borders: L2 norm at most the kernel's. Other
        # padding modes may map several taps to one pixel (reflect, replicate; circular on small inputs):
        # then the L1 norm of the kernel, which bounds the row's L1 (hence L2) norm
        distinct = isinstance(node, Linear) or node.padding_mode == "zeros" or (
            node.padding_mode == "circular" and all(
                size >= node.dilation[i] * (weight.shape[2 + i] - 1) + 1 for i, size in enumerate(x.shape[-2:])))
        row_norm = (lambda w: w.flatten(1).norm(dim=1)) if distinct else (lambda w: w.flatten(1).abs().sum(1))
        rows = row_norm(weight) * gain.whole
        if isinstance(node, Linear):
            norm = torch.linalg.matrix_norm(weight, ord=2).item() * (1 + _MARGIN)
        else:
            norm = conv_operator_norm(node, tuple(x.shape[-2:]))
        pair = None
        if weight.shape[0] % 2 == 0 and node.can_pair(x):
            pair = _channel_view(row_norm(weight[0::2] - weight[1::2]) * gain.whole, out.ndim).to(x.dtype)
        whole = norm * gain.whole
        return Gain(whole, _capped(_channel_view(rows, out.ndim).to(x.dtype), whole), pair), out
    if isinstance(node, ChannelAffine):
        scale = _channel_view(node.scale.abs(), out.ndim).to(x.dtype)
        whole = scale.max().item() * gain.whole
        return Gain(whole, _capped(scale * gain.coord, whole)), out
    if isinstance(node, PositiveLinear):
        norm, row_max = _positive_norm(node, x)
        whole = norm * gain.whole
        return Gain(whole, _capped(gain.coord.max() * row_max, whole)), out
    constants[id(node)] = gain if isinstance(node, PairSort) else Gain(gain.whole, gain.coord)
    if isinstance(node, ReLU):
        return Gain(gain.whole, gain.coord), out
    if isinstance(node, PairSort):
        coord = gain.coord
        if coord.ndim >= 2 and coord.shape[1] > 1:
            coord = node._pairs(coord, 1).amax(dim=2, keepdim=True).expand(-1, -1, 2, *coord.shape[2:]).flatten(1, 2)
        return Gain(gain.whole * node.scale, coord * node.scale), out
    if isinstance(node, MaxMin):
        coord = torch.cat([gain.coord, gain.coord], dim=1) if gain.coord.ndim >= 2 else gain.coord
        return Gain(gain.whole * node.scale, coord * node.scale), out
    if isinstance(node, L2NormPool):
        window = math.prod(node.kernel) if node.kernel is not None else x.shape[-2] * x.shape[-1]
        whole = gain.whole * node.scale  # disjoint windows: | ||a|| - ||b|| | <= ||a - b|| per window
        return Gain(whole, _capped(gain.coord * math.sqrt(window) * node.scale, whole)), out
    if isinstance(node, MaxPool):
        (kh, kw), (sh, sw) = node.kernel, node.stride
        coverage = kh * kw if node.dilation != (1, 1) else math.ceil(kh / sh) * math.ceil(kw / sw)
        whole = gain.whole * math.sqrt(coverage)  # each input in at most `coverage` windows
        return Gain(whole, _capped(gain.coord, whole)), out  # a max of L-Lipschitz values is L-Lipschitz
    return Gain(math.inf, torch.tensor(math.inf, dtype=x.dtype)), out


def input_gains(root: Chain, sample: Tensor) -> dict[int, Gain]:
    """``id(node) -> Gain`` of the input of every nonlinear node of ``root``, for inputs shaped like
    ``sample`` [n, ...] (the operator norms of convolutions depend on the spatial size)."""
    constants: dict[int, Gain] = {}
    with torch.no_grad():
        node_gains(root, Gain(1.0, sample.new_ones(())), sample[:1].detach(), constants)
    return constants


def lipschitz_limits(
    root: Chain, constants: dict[int, Gain], lower: Tensor, upper: Tensor
) -> dict[int, tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]]:
    """Lipschitz boxes ``z(x0) +- L ||r||_2`` of the inputs of the nonlinear nodes, for the boxes
    ``[lower, upper]`` (centre ``x0``, half-widths ``r``), in the form of :class:`Records` ``limits``."""
    centre = (lower + upper) / 2
    rho = ((upper - lower) / 2).flatten(1).norm(dim=1)
    inputs: dict[int, Tensor] = {}
    root.interval(centre, centre, Records(inputs=inputs))
    limits = {}
    for key, gain in constants.items():
        if not math.isfinite(gain.whole):
            continue
        value = inputs[key]
        scale = rho.view(-1, *([1] * (value.ndim - 1)))
        radius = gain.coord * scale
        difference = None
        if gain.pair is not None:
            values = value[:, 0::2] - value[:, 1::2]
            difference = (values - gain.pair * scale, values + gain.pair * scale)
        limits[key] = (value - radius, value + radius, difference)
    return limits
