"""Pooling with a nonlinearity: L2-norm pooling and max pooling.

L2-norm pooling, ``y = scale * ||x_window||_2`` over non-overlapping windows (or the whole plane), is
``nn.LPPool2d(2, k)`` and deel-torchlip's ``ScaledL2NormPool2d`` / ``ScaledAdaptativeL2NormPool2d``.
IBP is exact per window: the norm is increasing in each ``|x_i|``, so the box's smallest and largest ``|x_i|``
give its range. CROWN uses :func:`~explain.bounds.relaxations.l2_norm_relaxation` (tangent plane below, chord +
concave tangent above).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from deel.torchlip.modules import ScaledAdaptativeL2NormPool2d, ScaledL2NormPool2d
from torch import Tensor, nn

from explain.bounds.convert import converts, exact_type, lipschitz_factor, pair, unsupported
from explain.bounds.node import Gain, Node, Records
from explain.bounds.patches import row_dot
from explain.bounds.relaxations import l2_norm_relaxation, window_expand, window_sum


class L2NormPool(Node):
    """``kernel`` (kh, kw) with stride = kernel and no padding, or ``None`` for global pooling."""

    def __init__(self, path: str, kernel: tuple[int, int] | None, scale: float = 1.0) -> None:
        super().__init__(path)
        self.kernel = kernel
        self.scale = scale

    def interval(self, lower, upper, records):
        records[id(self)] = (lower, upper)
        smallest = torch.where(lower > 0, lower, torch.where(upper < 0, -upper, torch.zeros_like(lower)))
        largest = torch.maximum(lower.abs(), upper.abs())
        return (
            window_sum(smallest.square(), self.kernel).sqrt() * self.scale,
            window_sum(largest.square(), self.kernel).sqrt() * self.scale,
        )

    def backward(self, A, bias, records):
        lower, upper = records[id(self)]
        lower_slope, upper_slope, upper_offset = l2_norm_relaxation(lower, upper, self.kernel)
        A = A if self.scale == 1 else A * self.scale
        A_full = window_expand(A, self.kernel, tuple(lower.shape[-2:]))
        A_in = A_full * lower_slope.unsqueeze(1)
        A_in.addcmul_(A_full.clamp(min=0), (upper_slope - lower_slope).unsqueeze(1))
        offset = (A.clamp(min=0) * upper_offset.unsqueeze(1)).flatten(2).sum(-1)
        return A_in, bias + offset

    def gain(self, gain, x, constants):
        """Disjoint windows: ``| ||a|| - ||b|| | <= ||a - b||`` per window; a coordinate sums ``window`` inputs."""
        constants[id(self)] = Gain(gain.whole, gain.coord)
        window = math.prod(self.kernel) if self.kernel is not None else x.shape[-2] * x.shape[-1]
        coord = gain.coord * math.sqrt(window) * self.scale
        return Gain(gain.whole * self.scale, coord).capped(), self.interval(x, x, Records())[0]


class MaxPool(Node):
    """``nn.MaxPool2d`` (any kernel, stride, padding, dilation; windows may overlap; not ``ceil_mode``).

    IBP is exact (max is monotone). CROWN uses the relaxation of Singh et al. 2019 (DeepPoly): below, the
    window entry ``j`` with the largest lower bound (``max >= x_j``); above, ``x_j`` itself when its lower bound
    dominates every other upper bound (then ``max = x_j``), else the constant ``max_i u_i``.
    """

    crown_box_replaces = True

    def __init__(self, path: str, kernel, stride, padding, dilation) -> None:
        super().__init__(path)
        self.kernel, self.stride, self.padding, self.dilation = kernel, stride, padding, dilation

    def interval(self, lower, upper, records):
        records[id(self)] = (lower, upper)
        pool = lambda x: F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation)  # noqa: E731
        return pool(lower), pool(upper)

    def _dominated(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Window entries of the bounds, the index of the largest lower bound per window and whether it
        dominates every other upper bound (then the window's max is that entry: the relaxation is exact)."""
        low, up = self._windows(lower), self._windows(upper)
        top_lower, index = low.max(dim=2, keepdim=True)
        others = up.scatter(2, index, -float("inf")).amax(dim=2, keepdim=True)
        return low, up, index, (top_lower >= others).squeeze(2)

    def unstable(self, lower, upper):
        """The entries of the windows whose max is not decided by the box."""
        low, _, _, dominated = self._dominated(lower, upper)
        cover = (~dominated).to(lower.dtype).unsqueeze(2).expand(-1, -1, low.shape[2], -1)
        pad_h, pad_w = self.padding
        size = (lower.shape[-2] + 2 * pad_h, lower.shape[-1] + 2 * pad_w)
        folded = F.fold(cover.flatten(1, 2), size, self.kernel, self.dilation, 0, self.stride)
        return folded[..., pad_h : size[0] - pad_h, pad_w : size[1] - pad_w] > 0

    def crown_rows(self, lower, upper):
        """Every entry, as auto_LiRPA (its bounds of a max-pooling input are dense); none after a ReLU (its output
        box is then the ReLU of the ReLU's input box, :mod:`explain.bounds.crown`)."""
        return torch.ones_like(lower, dtype=torch.bool)

    def gain(self, gain, x, constants):
        """A max of L-Lipschitz values is L-Lipschitz; the whole output counts each input in at most
        ``coverage`` windows."""
        constants[id(self)] = Gain(gain.whole, gain.coord)
        (kh, kw), (sh, sw) = self.kernel, self.stride
        coverage = kh * kw if self.dilation != (1, 1) else math.ceil(kh / sh) * math.ceil(kw / sw)
        whole = gain.whole * math.sqrt(coverage)
        return Gain(whole, gain.coord).capped(), self.interval(x, x, Records())[0]

    def _windows(self, x: Tensor) -> Tensor:
        """[N, C, H, W] -> [N, C, k*k, L] window entries (padding counts as -inf, as in max pooling)."""
        pad_h, pad_w = self.padding
        x = F.pad(x, (pad_w, pad_w, pad_h, pad_h), value=-float("inf"))
        windows = F.unfold(x, self.kernel, self.dilation, 0, self.stride)
        return windows.view(x.shape[0], x.shape[1], self.kernel[0] * self.kernel[1], -1)

    def backward(self, A, bias, records):
        lower, upper = records[id(self)]
        low, up, index, dominated = records.derived(self, self._dominated)  # dominated: [N, C, L]
        flat = A.flatten(3)  # [n, r, C, L]
        positive = flat.clamp(min=0)
        coefficient = flat - positive + positive * dominated.unsqueeze(1)
        ceiling = torch.where(dominated, torch.zeros_like(dominated, dtype=up.dtype), up.amax(dim=2))
        offset = (positive * ceiling.unsqueeze(1)).flatten(2).sum(-1)
        n, r, channels, length = flat.shape
        entries = flat.new_zeros(n, r, channels, low.shape[2], length)
        entries.scatter_(3, index.unsqueeze(1).expand(n, r, channels, 1, length), coefficient.unsqueeze(3))
        pad_h, pad_w = self.padding
        size = (lower.shape[-2] + 2 * pad_h, lower.shape[-1] + 2 * pad_w)
        A_in = F.fold(entries.view(n * r, -1, length), size, self.kernel, self.dilation, 0, self.stride)
        A_in = A_in[..., pad_h : size[0] - pad_h, pad_w : size[1] - pad_w]
        return A_in.reshape(n, r, *lower.shape[1:]), bias + offset

    def backward_patches(self, A, bias, records):
        """Each output cell's coefficient goes to its window's selected entry (or to the ceiling's offset): the
        window at ``top`` of the output becomes ``(K - 1) stride + dilation (k - 1) + 1`` input cells at
        ``top * stride - padding``."""
        lower = records[id(self)][0]

        def maps(lower: Tensor, upper: Tensor) -> Tensor:
            _, up, index, dominated = records.derived(self, self._dominated)
            ceiling = torch.where(dominated, torch.zeros_like(dominated, dtype=up.dtype), up.amax(dim=2))
            maps = torch.cat([dominated.to(up.dtype), ceiling, index.squeeze(2).to(up.dtype)], dim=1)
            return maps.view(*maps.shape[:2], *A.size)

        A = A.cleaned()  # the selected entry of an outside cell may lie inside
        # maps per group of rows [n, r/g, 1, C, KH, KW], rows [n, r/g, g, C, KH, KW] (Patches.grouped)
        dominated, ceiling, index = A.window(records.derived(self, maps)).chunk(3, dim=3)
        rows = A.grouped(A.coef)
        positive = rows.clamp(min=0)
        coefficient = rows - positive + positive * dominated
        offset = row_dot(positive, ceiling)
        n, r, channels, kh, kw = A.coef.shape
        taps = self.kernel[0] * self.kernel[1]
        if self.kernel == self.stride and self.dilation == (1, 1):  # disjoint windows: place, no fold
            (th, tw) = self.kernel
            selected = index.unsqueeze(-1) == torch.arange(taps, device=index.device)  # [n, r/g, 1, C, K, K, taps]
            coef = (coefficient.unsqueeze(-1) * selected).view(n, r, channels, kh, kw, th, tw)
            coef = coef.permute(0, 1, 2, 3, 5, 4, 6).reshape(n, r, channels, kh * th, kw * tw)
            return A.moved(coef, self.stride, self.padding, tuple(lower.shape[-2:])), bias + offset
        index = index.expand_as(coefficient)
        entries = A.coef.new_zeros(n * r, channels, taps, kh * kw)
        entries.scatter_(2, index.long().reshape(n * r, channels, 1, kh * kw), coefficient.reshape(n * r, channels, 1, -1))
        span = [(k - 1) * s + d * (t - 1) + 1 for k, s, d, t in zip((kh, kw), self.stride, self.dilation, self.kernel)]
        coef = F.fold(entries.view(n * r, -1, kh * kw), span, self.kernel, self.dilation, 0, self.stride)
        return A.moved(coef.view(n, r, channels, *span), self.stride, self.padding, tuple(lower.shape[-2:])), \
            bias + offset


# ------------------------------------------------------------------------------------------- builders
@converts(nn.MaxPool2d)
def _max_pool(module: nn.MaxPool2d, path: str) -> MaxPool:
    exact_type(module, path, nn.MaxPool2d)
    if module.ceil_mode:
        raise unsupported(module, path, "ceil_mode=True")
    return MaxPool(path, *(pair(v) for v in (module.kernel_size, module.stride, module.padding, module.dilation)))


@converts(nn.LPPool2d, ScaledAdaptativeL2NormPool2d)
def _l2_pool(module: nn.Module, path: str) -> L2NormPool:
    """L2-norm pooling. Subclasses with their own forward (e.g. a NaN-safe square root) are accepted when a
    probe input shows they compute the same values."""
    if isinstance(module, ScaledAdaptativeL2NormPool2d):
        node = L2NormPool(path, None, scale=lipschitz_factor(module, path))
    else:
        if module.norm_type != 2:
            raise unsupported(module, path, f"only the L2 norm (norm_type=2), got {module.norm_type}")
        kernel = pair(module.kernel_size)
        stride = kernel if module.stride is None else pair(module.stride)
        if stride != kernel or module.ceil_mode:
            raise unsupported(module, path, "L2-norm pooling needs stride = kernel_size and ceil_mode=False")
        scale = lipschitz_factor(module, path) if isinstance(module, ScaledL2NormPool2d) else 1.0
        node = L2NormPool(path, kernel, scale=scale)
    if type(module) not in (nn.LPPool2d, ScaledL2NormPool2d, ScaledAdaptativeL2NormPool2d):
        kernel = node.kernel or (2, 3)
        probe = torch.randn(2, 3, 2 * kernel[0] + 1, 3 * kernel[1], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = node.interval(probe, probe, Records())[0]
            got = module(probe)
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise unsupported(module, path, "its forward does not compute the L2-norm pooling of its base class")
    return node
