"""Affine operations: exact in both passes (IBP in centre/radius form, CROWN by the transposed map).

``Linear``, ``Conv2d``, ``ChannelAffine`` (BatchNorm in eval) carry weights. ``PositiveLinear`` wraps a
linear map with nonnegative coefficients (average pooling, pixel (un)shuffle, flatten, identity, dropout in
eval): it is monotone, so IBP maps ``lower``/``upper`` directly, and its transpose comes from autograd.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from deel.torchlip.modules import InvertibleDownSampling, InvertibleUpSampling, ScaledAdaptiveAvgPool2d, ScaledAvgPool2d
from torch import Tensor, nn

from explain.bounds.convert import converts, detach, exact_type, same_forward, unsupported
from explain.bounds.node import Gain, Node, Records
from explain.bounds.norms import MARGIN, conv_operator_norm, positive_map_norm


def _centre_radius(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    return (lower + upper) / 2, (upper - lower) / 2


def transpose_by_autograd(fn: Callable[[Tensor], Tensor], A: Tensor, in_shape: torch.Size) -> Tensor:
    """``A`` [n, r, *out] pulled back through the linear map ``fn``: the vector-Jacobian product."""
    with torch.inference_mode(False), torch.enable_grad():  # also callable from inference mode
        flat = A.flatten(0, 1).clone()
        x = torch.zeros((flat.shape[0], *in_shape), dtype=A.dtype, device=A.device, requires_grad=True)
        # with create_graph the product stays differentiable in A (alpha-CROWN's slopes get their gradient)
        (grad,) = torch.autograd.grad(fn(x), x, flat, create_graph=A.requires_grad)
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


    def distinct_taps(self, x: Tensor) -> bool:
        """True when no weight lands twice on one input coordinate in a row of the map."""
        return True

    def operator_norm(self, x: Tensor) -> float:
        """An upper bound of the layer's L2 operator norm on inputs shaped like ``x``."""
        return torch.linalg.matrix_norm(self.weight.double(), ord=2).item() * (1 + MARGIN)

    def gain(self, gain, x, constants):
        """``L_j = ||w_j||_2 L`` per output row (``||w_j||_1 L`` where a padding mode maps several taps of a
        kernel to one pixel), ``L ||W||_2`` for the whole output, and the same per pair difference."""
        out = self.interval(x, x, Records())[0]
        weight = self.weight.double()
        if self.distinct_taps(x):
            row_norm = lambda w: w.flatten(1).norm(dim=1)  # noqa: E731
        else:
            row_norm = lambda w: w.flatten(1).abs().sum(1)  # noqa: E731
        rows = _channel_view(row_norm(weight) * gain.whole, out.ndim).to(x.dtype)
        pair = None
        if weight.shape[0] % 2 == 0 and self.can_pair(x):
            pair = _channel_view(row_norm(weight[0::2] - weight[1::2]) * gain.whole, out.ndim).to(x.dtype)
        return Gain(self.operator_norm(x) * gain.whole, rows, pair).capped(), out


def _channel_view(values: Tensor, ndim: int) -> Tensor:
    return values.view(1, -1, *([1] * (ndim - 2)))


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

    def __init__(self, module: torch.nn.Conv2d, weight: Tensor, bias: Tensor | None, path: str,
                 same: bool = False) -> None:
        super().__init__(weight, bias, path)
        self.stride, self.dilation, self.groups = module.stride, module.dilation, module.groups
        self.padding_mode = module.padding_mode
        self.padding = module.padding
        self.pad = module._reversed_padding_repeated_twice  # what nn.Conv2d pads with for non-zero modes
        #: TensorFlow's "SAME" padding (timm's ``Conv2dSame``): zeros, the odd one at the bottom/right,
        #: computed from the input size
        self.same = same
        # the fast transpose (conv_transpose2d) needs explicit zero padding; other cases go through autograd
        self.fast_transpose = self.padding_mode == "zeros" and not isinstance(self.padding, str)

    def same_pads(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """TF "SAME" zero padding (left, right, top, bottom) of an input of spatial ``size``: the output has
        ``ceil(size / stride)`` cells."""
        pads = []
        for length, kernel, stride, dilation in zip(size, self.weight.shape[-2:], self.stride, self.dilation):
            total = max((math.ceil(length / stride) - 1) * stride + (kernel - 1) * dilation + 1 - length, 0)
            pads.append((total // 2, total - total // 2))
        return (*pads[1], *pads[0])

    def apply(self, x, weight, bias=None):
        if self.same:
            x = F.pad(x, self.same_pads(tuple(x.shape[-2:])))
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        if self.padding_mode != "zeros":
            x = F.pad(x, self.pad, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def can_pair(self, lower):
        return super().can_pair(lower) and self.groups == 1

    def distinct_taps(self, x):
        """A row of the map is the kernel, cropped at zero-padded borders; other padding modes may map several
        taps to one pixel (reflect, replicate; circular on inputs smaller than the kernel's span)."""
        spans = [self.dilation[i] * (self.weight.shape[2 + i] - 1) + 1 for i in range(2)]
        return self.padding_mode == "zeros" or (
            self.padding_mode == "circular" and all(size >= span for size, span in zip(x.shape[-2:], spans)))

    def operator_norm(self, x):
        return conv_operator_norm(self, tuple(x.shape[-2:]))

    def backward(self, A, bias, records):
        in_shape = records[id(self)][0].shape[1:]
        if self.bias is not None:
            bias = bias + _sum_bias(A, self.bias)
        if not self.fast_transpose:
            return transpose_by_autograd(lambda x: self.apply(x, self.weight), A, in_shape), bias
        # channels-last: conv_transpose2d on many rows runs 2-5x faster on CPU (measured with oneDNN)
        flat = A.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        kernel = self.weight.shape[-2:]
        if self.same:  # the transpose onto the padded input, then its crop
            left, right, top, bottom = self.same_pads(tuple(in_shape[1:]))
            padded = (in_shape[1] + top + bottom, in_shape[2] + left + right)
            output_padding = [padded[i] - ((flat.shape[i + 2] - 1) * self.stride[i] + self.dilation[i]
                                           * (kernel[i] - 1) + 1) for i in range(2)]
            out = F.conv_transpose2d(flat, self.weight, None, self.stride, 0, output_padding, self.groups,
                                     self.dilation)
            out = out[..., top : top + in_shape[1], left : left + in_shape[2]]
            return out.reshape(*A.shape[:2], *in_shape), bias
        output_padding = [
            in_shape[i + 1]
            - ((flat.shape[i + 2] - 1) * self.stride[i] - 2 * self.padding[i] + self.dilation[i] * (kernel[i] - 1) + 1)
            for i in range(2)
        ]
        out = F.conv_transpose2d(
            flat, self.weight, None, self.stride, self.padding, output_padding, self.groups, self.dilation
        )
        return out.reshape(*A.shape[:2], *in_shape), bias

    def backward_patches(self, A, bias, records):
        """The window at ``top`` of the output becomes the window at ``top * stride - padding`` of the input,
        ``(K - 1) stride + dilation (k - 1) + 1`` cells wide: the transposed convolution of the coefficients."""
        if not self.fast_transpose:
            return super().backward_patches(A, bias, records)
        A = A.cleaned()  # the transposed convolution would carry outside cells inside
        if self.bias is not None:
            bias = bias + A.channel_sums() @ self.bias
        coef = A.coef.flatten(0, 1)
        if A.kernel == (1, 1) and self.groups == 1 and tuple(self.dilation) == (1, 1):  # a single cell: the kernels weighted by its coefficients
            out = (coef.flatten(1) @ self.weight.flatten(1)).view(-1, *self.weight.shape[1:])
        else:
            out = F.conv_transpose2d(coef, self.weight, None, self.stride, 0, 0, self.groups, self.dilation)
        in_size = tuple(records[id(self)][0].shape[-2:])
        padding = self.same_pads(in_size)[2::-2] if self.same else self.padding  # (top, left)
        return A.moved(out.view(*A.coef.shape[:2], *out.shape[1:]), self.stride, padding, in_size), bias


class ChannelAffine(Node):
    """``y = scale_c x + shift_c`` along dim 1 (BatchNorm in eval: ``scale = gamma / sqrt(var + eps)``)."""

    affine = True
    coordinatewise = True

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

    def backward_patches(self, A, bias, records):
        return A.with_coef(A.coef * self._view(self.scale, 4)), bias + A.channel_sums() @ self.shift

    def gain(self, gain, x, constants):
        out = self.interval(x, x, Records())[0]
        scale = _channel_view(self.scale.abs(), out.ndim).to(x.dtype)
        return Gain(scale.max().item() * gain.whole, scale * gain.coord).capped(), out


class PositiveLinear(Node):
    """A linear map with nonnegative coefficients and no offset, given by its forward ``fn``."""

    affine = True

    def __init__(
        self, fn: Callable[[Tensor], Tensor], path: str, transpose: Callable | None = None, coordinatewise: bool = False
    ) -> None:
        super().__init__(path)
        self.fn = fn
        self.transpose = transpose
        self.coordinatewise = coordinatewise  # each output is one input (identity, reshapes, pixel shuffles)
        self.rearranges = coordinatewise

    def interval(self, lower, upper, records):
        records[id(self)] = (lower, upper)
        return self.fn(lower), self.fn(upper)

    def backward(self, A, bias, records):
        in_shape = records[id(self)][0].shape[1:]
        if self.transpose is not None:
            return self.transpose(A, in_shape), bias
        return transpose_by_autograd(self.fn, A, in_shape), bias


class Identity(PositiveLinear):
    """``nn.Identity`` and dropout in eval: rows pass unchanged, patches included."""

    def __init__(self, path: str) -> None:
        super().__init__(lambda x: x, path, transpose=lambda A, shape: A, coordinatewise=True)

    def backward_patches(self, A, bias, records):
        return A, bias

    def gain(self, gain, x, constants):
        out = self.interval(x, x, Records())[0]
        norm, row_max = positive_map_norm(self.fn, x)
        return Gain(norm * gain.whole, gain.coord.max() * row_max).capped(), out


# ------------------------------------------------------------------------------------------- builders
@converts(nn.Linear)
def _linear(module: nn.Linear, path: str) -> Linear:
    if not same_forward(module, nn.Linear):
        raise unsupported(module, path)
    return Linear(module.weight.detach(), detach(module.bias), path)


@converts(nn.Conv2d)
def _conv(module: nn.Conv2d, path: str) -> Conv2d:
    # deel-torchlip's PadConv2d is a Conv2d whose forward only adds a (here: identity) padding
    identity_padded = hasattr(module, "old_padding_mode") and module.old_padding_mode.lower() != "symmetric"
    if not (same_forward(module, nn.Conv2d) or identity_padded):
        raise unsupported(module, path, "a Conv2d subclass with its own forward")
    return Conv2d(module, module.weight.detach(), detach(module.bias), path)


@converts(nn.BatchNorm1d, nn.BatchNorm2d)
def _batch_norm(module: nn.modules.batchnorm._BatchNorm, path: str) -> ChannelAffine:
    exact_type(module, path, nn.BatchNorm1d, nn.BatchNorm2d)
    return batch_norm_affine(module, path)


def batch_norm_affine(module: nn.modules.batchnorm._BatchNorm, path: str) -> ChannelAffine:
    """The affine map of a BatchNorm in eval mode (running statistics).

    Raises:
        UnsupportedLayerError: no running statistics (eval would use the batch's).
    """
    if module.running_mean is None or module.running_var is None:
        raise unsupported(module, path, "BatchNorm without running statistics uses batch statistics in eval")
    scale = torch.rsqrt(module.running_var.detach() + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.detach()
    shift = -module.running_mean.detach() * scale
    if module.bias is not None:
        shift = shift + module.bias.detach()
    return ChannelAffine(scale, shift, path)


_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)


@converts(*_IDENTITIES)
def _identity(module: nn.Module, path: str) -> Identity:
    exact_type(module, path, *_IDENTITIES)  # a subclass could compute anything
    return Identity(path)


@converts(nn.Flatten, nn.Unflatten)
def _reshape(module: nn.Module, path: str) -> PositiveLinear:
    if not same_forward(module, _base(module)):
        raise unsupported(module, path)
    if isinstance(module, nn.Flatten) and module.start_dim == 0:  # would flatten the batch of boxes
        raise unsupported(module, path, "Flatten must keep the batch dimension (start_dim >= 1)")
    return PositiveLinear(module, path, transpose=_reshape_transpose, coordinatewise=True)


def _base(module: nn.Module) -> type:
    return nn.Flatten if isinstance(module, nn.Flatten) else nn.Unflatten


@converts(nn.PixelUnshuffle, InvertibleDownSampling, nn.PixelShuffle, InvertibleUpSampling)
def _shuffle(module: nn.Module, path: str) -> PositiveLinear:
    exact_type(module, path, nn.PixelUnshuffle, InvertibleDownSampling, nn.PixelShuffle, InvertibleUpSampling)
    if type(module) in (nn.PixelUnshuffle, InvertibleDownSampling):
        factor, adjoint = module.downscale_factor, F.pixel_shuffle
    else:
        factor, adjoint = module.upscale_factor, F.pixel_unshuffle
    return PositiveLinear(module, path, transpose=lambda A, shape: _flat_apply(adjoint, A, factor), coordinatewise=True)


_AVERAGE_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, ScaledAvgPool2d,
                  ScaledAdaptiveAvgPool2d)


@converts(*_AVERAGE_POOLS)
def _average_pool(module: nn.Module, path: str) -> PositiveLinear:
    exact_type(module, path, *_AVERAGE_POOLS)
    if type(module) is nn.AdaptiveAvgPool2d and module.output_size in (1, (1, 1)):
        return global_average_pool(path, flatten=False)
    return PositiveLinear(module, path)


def global_mean(x: Tensor) -> Tensor:
    """Mean over the spatial dims of [N, C, H, W] -> [N, C, 1, 1] (global average pooling)."""
    return x.mean(dim=(-2, -1), keepdim=True)


def global_mean_transpose(A: Tensor, in_shape) -> Tensor:
    """Rows [n, r, C(, 1, 1)] on the pooled output -> [n, r, C, H, W]: each cell gets ``A_c / (H W)``."""
    height, width = in_shape[-2:]
    A = A.reshape(*A.shape[:3], 1, 1) / (height * width)
    return A.expand(*A.shape[:3], height, width)


def global_average_pool(path: str, flatten: bool) -> PositiveLinear:
    """Global average pooling, [N, C, H, W] -> [N, C, 1, 1] (or [N, C] with ``flatten``)."""
    if flatten:
        return PositiveLinear(lambda x: global_mean(x).flatten(1), path, transpose=global_mean_transpose)
    return PositiveLinear(global_mean, path, transpose=global_mean_transpose)


def _reshape_transpose(A: Tensor, in_shape: torch.Size) -> Tensor:
    return A.reshape(*A.shape[:2], *in_shape)


def _flat_apply(fn, A: Tensor, factor: int) -> Tensor:
    out = fn(A.flatten(0, 1), factor)
    return out.view(*A.shape[:2], *out.shape[1:])
