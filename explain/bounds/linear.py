"""Affine operations: exact in both passes (IBP in centre/radius form, CROWN by the transposed map).

``Linear``, ``Conv2d``, ``ChannelAffine`` (BatchNorm in eval) carry weights. ``PositiveLinear`` wraps a
linear map with nonnegative coefficients (average pooling, pixel (un)shuffle, flatten, identity, dropout in
eval): it is monotone, so IBP maps ``lower``/``upper`` directly, and its transpose comes from autograd.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from explain.bounds.node import Node


def _centre_radius(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    return (lower + upper) / 2, (upper - lower) / 2


def transpose_by_autograd(fn: Callable[[Tensor], Tensor], A: Tensor, in_shape: torch.Size) -> Tensor:
    """``A`` [n, r, *out] pulled back through the linear map ``fn``: the vector-Jacobian product."""
    with torch.inference_mode(False), torch.enable_grad():  # also callable from inference mode
        flat = A.flatten(0, 1).clone()
        x = torch.zeros((flat.shape[0], *in_shape), dtype=A.dtype, device=A.device, requires_grad=True)
        (grad,) = torch.autograd.grad(fn(x), x, flat)
    return grad.view(*A.shape[:2], *in_shape)


def _sum_bias(A: Tensor, bias: Tensor, channel_dim: int = 2) -> Tensor:
    """``<A, b>`` for a bias ``b`` [C] broadcast along the channel dim of ``A`` [n, r, C, *spatial]."""
    if A.ndim > channel_dim + 1:
        A = A.flatten(channel_dim + 1).sum(-1)
    return A @ bias


class _Weighted(Node):
    """Shared by ``Linear`` and ``Conv2d``: IBP in centre/radius form, optionally with the pair differences.

    When a GroupSort2 follows, :meth:`interval_with_pairs` also returns the box of ``y_{2j} - y_{2j+1}``
    computed through the differenced weights ``w_{2j} - w_{2j+1}``: tighter than the difference of the two
    output intervals, which forgets that both outputs share the input. The differenced rows ride along in the
    same call (weights concatenated once and cached).
    """

    affine = True

    def __init__(self, weight: Tensor, bias: Tensor | None, path: str) -> None:
        super().__init__(path)
        self.weight, self.bias = weight, bias
        self.abs_weight = weight.abs()
        self._paired: tuple[Tensor, Tensor, Tensor | None] | None = None

    @abstractmethod
    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """The layer's affine map with another weight and bias (``|W|`` for the interval radius, ...)."""

    def can_pair(self, lower: Tensor) -> bool:
        return self.weight.shape[0] % 2 == 0

    def interval(self, lower, upper, records):
        records[id(self)] = (lower, upper)
        centre, radius = _centre_radius(lower, upper)
        centre = self.apply(centre, self.weight, self.bias)
        radius = self.apply(radius, self.abs_weight)
        return centre - radius, centre + radius

    def interval_with_pairs(self, lower, upper, records):
        """``(lower, upper, (diff_lower, diff_upper))``, or a None difference when pairing does not apply."""
        if not self.can_pair(lower):
            return (*self.interval(lower, upper, records), None)
        records[id(self)] = (lower, upper)
        if self._paired is None:
            difference = self.weight[0::2] - self.weight[1::2]
            bias = None if self.bias is None else torch.cat([self.bias, self.bias[0::2] - self.bias[1::2]])
            self._paired = (torch.cat([self.weight, difference]), torch.cat([self.abs_weight, difference.abs()]), bias)
        weight, abs_weight, bias = self._paired
        centre, radius = _centre_radius(lower, upper)
        centre = self.apply(centre, weight, bias)
        radius = self.apply(radius, abs_weight)
        channels = self.weight.shape[0]
        out_centre, diff_centre = centre[:, :channels], centre[:, channels:]
        out_radius, diff_radius = radius[:, :channels], radius[:, channels:]
        return (out_centre - out_radius, out_centre + out_radius,
                (diff_centre - diff_radius, diff_centre + diff_radius))


class Linear(_Weighted):
    """``y = x W^T + b`` on the last dimension."""

    def apply(self, x, weight, bias=None):
        return F.linear(x, weight, bias)

    def can_pair(self, lower):
        return super().can_pair(lower) and lower.ndim == 2  # GroupSort2 pairs dim 1 = the features

    def backward(self, A, bias, records):
        if self.bias is not None:
            bias = bias + (A.flatten(2, -2).sum(2) if A.ndim > 3 else A) @ self.bias
        return A @ self.weight, bias


class Conv2d(_Weighted):
    """``nn.Conv2d`` (any stride, dilation, groups, padding and padding mode)."""

    def __init__(self, module: torch.nn.Conv2d, weight: Tensor, bias: Tensor | None, path: str) -> None:
        super().__init__(weight, bias, path)
        self.stride, self.dilation, self.groups = module.stride, module.dilation, module.groups
        self.padding_mode = module.padding_mode
        self.padding = module.padding
        self.pad = module._reversed_padding_repeated_twice  # what nn.Conv2d pads with for non-zero modes
        # the fast transpose (conv_transpose2d) needs explicit zero padding; other cases go through autograd
        self.fast_transpose = self.padding_mode == "zeros" and not isinstance(self.padding, str)

    def apply(self, x, weight, bias=None):
        if self.padding_mode != "zeros":
            x = F.pad(x, self.pad, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def can_pair(self, lower):
        return super().can_pair(lower) and self.groups == 1

    def backward(self, A, bias, records):
        in_shape = records[id(self)][0].shape[1:]
        if self.bias is not None:
            bias = bias + _sum_bias(A, self.bias)
        if not self.fast_transpose:
            return transpose_by_autograd(lambda x: self.apply(x, self.weight), A, in_shape), bias
        flat = A.flatten(0, 1)
        kernel = self.weight.shape[-2:]
        output_padding = [
            in_shape[i + 1]
            - ((flat.shape[i + 2] - 1) * self.stride[i] - 2 * self.padding[i] + self.dilation[i] * (kernel[i] - 1) + 1)
            for i in range(2)
        ]
        out = F.conv_transpose2d(
            flat, self.weight, None, self.stride, self.padding, output_padding, self.groups, self.dilation
        )
        return out.view(*A.shape[:2], *in_shape), bias


class ChannelAffine(Node):
    """``y = scale_c x + shift_c`` along dim 1 (BatchNorm in eval: ``scale = gamma / sqrt(var + eps)``)."""

    affine = True

    def __init__(self, scale: Tensor, shift: Tensor, path: str) -> None:
        super().__init__(path)
        self.scale, self.shift = scale, shift

    def _view(self, t: Tensor, ndim: int) -> Tensor:
        return t.view(-1, *([1] * (ndim - 2)))

    def interval(self, lower, upper, records):
        records[id(self)] = (lower, upper)
        centre, radius = _centre_radius(lower, upper)
        centre = centre * self._view(self.scale, centre.ndim) + self._view(self.shift, centre.ndim)
        radius = radius * self._view(self.scale.abs(), radius.ndim)
        return centre - radius, centre + radius

    def backward(self, A, bias, records):
        bias = bias + _sum_bias(A, self.shift)
        return A * self._view(self.scale, A.ndim - 1), bias


class PositiveLinear(Node):
    """A linear map with nonnegative coefficients and no offset, given by its forward ``fn``."""

    affine = True

    def __init__(self, fn: Callable[[Tensor], Tensor], path: str, transpose: Callable | None = None) -> None:
        super().__init__(path)
        self.fn = fn
        self.transpose = transpose

    def interval(self, lower, upper, records):
        records[id(self)] = (lower, upper)
        return self.fn(lower), self.fn(upper)

    def backward(self, A, bias, records):
        in_shape = records[id(self)][0].shape[1:]
        if self.transpose is not None:
            return self.transpose(A, in_shape), bias
        return transpose_by_autograd(self.fn, A, in_shape), bias
