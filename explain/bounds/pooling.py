"""Pooling with a nonlinearity: L2-norm pooling and max pooling.

L2-norm pooling, ``y = scale * ||x_window||_2`` over non-overlapping windows (or the whole plane), is
``nn.LPPool2d(2, k)`` and deel-torchlip's ``ScaledL2NormPool2d`` / ``ScaledAdaptativeL2NormPool2d``.
IBP is exact per window: the norm is increasing in each ``|x_i|``, so the box's smallest and largest ``|x_i|``
give its range. CROWN uses :func:`~explain.bounds.relaxations.l2_norm_relaxation` (tangent plane below, chord +
concave tangent above).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from explain.bounds.node import Node
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


class MaxPool(Node):
    """``nn.MaxPool2d`` (any kernel, stride, padding, dilation; windows may overlap; not ``ceil_mode``).

    IBP is exact (max is monotone). CROWN uses the relaxation of Singh et al. 2019 (DeepPoly): below, the
    window entry ``j`` with the largest lower bound (``max >= x_j``); above, ``x_j`` itself when its lower bound
    dominates every other upper bound (then ``max = x_j``), else the constant ``max_i u_i``.
    """

    def __init__(self, path: str, kernel, stride, padding, dilation) -> None:
        super().__init__(path)
        self.kernel, self.stride, self.padding, self.dilation = kernel, stride, padding, dilation

    def interval(self, lower, upper, records):
        records[id(self)] = (lower, upper)
        pool = lambda x: F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation)  # noqa: E731
        return pool(lower), pool(upper)

    def _windows(self, x: Tensor) -> Tensor:
        """[N, C, H, W] -> [N, C, k*k, L] window entries (padding counts as -inf, as in max pooling)."""
        pad_h, pad_w = self.padding
        x = F.pad(x, (pad_w, pad_w, pad_h, pad_h), value=-float("inf"))
        windows = F.unfold(x, self.kernel, self.dilation, 0, self.stride)
        return windows.view(x.shape[0], x.shape[1], self.kernel[0] * self.kernel[1], -1)

    def backward(self, A, bias, records):
        lower, upper = records[id(self)]
        low, up = self._windows(lower), self._windows(upper)
        top_lower, index = low.max(dim=2, keepdim=True)
        others = up.scatter(2, index, -float("inf")).amax(dim=2, keepdim=True)
        dominated = (top_lower >= others).squeeze(2)  # [N, C, L]
        flat = A.flatten(3)  # [n, r, C, L]
        positive = flat.clamp(min=0)
        coefficient = flat - positive + positive * dominated.unsqueeze(1)
        ceiling = torch.where(dominated, torch.zeros_like(top_lower.squeeze(2)), up.amax(dim=2))
        offset = (positive * ceiling.unsqueeze(1)).flatten(2).sum(-1)
        n, r, channels, length = flat.shape
        entries = flat.new_zeros(n, r, channels, low.shape[2], length)
        entries.scatter_(3, index.unsqueeze(1).expand(n, r, channels, 1, length), coefficient.unsqueeze(3))
        pad_h, pad_w = self.padding
        size = (lower.shape[-2] + 2 * pad_h, lower.shape[-1] + 2 * pad_w)
        A_in = F.fold(entries.view(n * r, -1, length), size, self.kernel, self.dilation, 0, self.stride)
        A_in = A_in[..., pad_h : size[0] - pad_h, pad_w : size[1] - pad_w]
        return A_in.reshape(n, r, *lower.shape[1:]), bias + offset
