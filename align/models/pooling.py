"""L2-norm pooling without NaN gradients at zero, safe for double backprop.

torchlip's ``ScaledL2NormPool2d``/``ScaledAdaptativeL2NormPool2d`` compute ``sqrt(sum x^2)`` over each window
with ``LPPool2d``, whose gradient is ``0 * inf = NaN`` on an all-zero window (e.g. the zero padding of a random
crop). The input gradient of the harmonization loss then poisons every weight. These subclasses compute the same
values and take the subgradient 0 at zero windows (``where(s > 0, sqrt(s), 0)`` with a safe argument, so first
and second derivatives stay finite). Both are 1-Lipschitz: ``| ||a|| - ||b|| | <= ||a - b||`` per window and the
windows are disjoint. They are plain torch operations, so ``vanilla_export`` keeps them as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deel import torchlip
from torch import Tensor


def _safe_sqrt(squares: Tensor) -> Tensor:
    positive = squares > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, squares, torch.ones_like(squares))), 0.0)


class L2NormPool2d(torchlip.ScaledL2NormPool2d):
    """``sqrt(sum of squares)`` over non-overlapping ``kernel_size`` windows (stride = kernel size)."""

    def forward(self, input: Tensor) -> Tensor:
        kh, kw = (self.kernel_size, self.kernel_size) if isinstance(self.kernel_size, int) else self.kernel_size
        squares = F.avg_pool2d(input.square(), (kh, kw), ceil_mode=self.ceil_mode) * (kh * kw)
        return _safe_sqrt(squares) * self._coefficient_lip

    def vanilla_export(self) -> L2NormPool2d:
        return self


class GlobalL2NormPool2d(torchlip.ScaledAdaptativeL2NormPool2d):
    """``sqrt(sum over H,W of x^2)`` per channel: [B,C,H,W] -> [B,C,1,1]."""

    def __init__(self) -> None:
        super().__init__((1, 1))

    def forward(self, input: Tensor) -> Tensor:
        return _safe_sqrt(input.square().sum(dim=(-2, -1), keepdim=True)) * self._coefficient_lip
