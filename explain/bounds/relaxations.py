"""Linear relaxations of the nonlinear operations: ``lower(x) <= op(x) <= upper(x)`` over an input box.

Each function takes the interval ``[lower, upper]`` of the operation's input and returns the slopes and
offsets of two linear functions that sandwich the operation on that interval (Zhang et al. 2018, "Efficient
Neural Network Robustness Certification with General Activation Functions", CROWN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def relu_relaxation(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """CROWN's relaxation of ``relu`` on ``[l, u]``: ``s_l x <= relu(x) <= s_u x + t_u``.

    Stable neurons are exact (``l >= 0``: slopes 1; ``u <= 0``: slopes 0). Unstable ones (``l < 0 < u``) get
    the chord ``u (x - l) / (u - l)`` above and the adaptive lower line ``s_l = 1 if u >= -l else 0`` below
    (the one of ``0`` and ``x`` that leaves the smaller area). Returns ``(s_l, s_u, t_u)``.
    """
    unstable = (lower < 0) & (upper > 0)
    active = lower >= 0
    width = torch.where(unstable, upper - lower, torch.ones_like(upper))
    upper_slope = torch.where(unstable, upper / width, active.to(upper.dtype))
    upper_offset = torch.where(unstable, -lower * upper_slope, torch.zeros_like(upper))
    lower_slope = torch.where(unstable, (upper >= -lower).to(upper.dtype), active.to(upper.dtype))
    return lower_slope, upper_slope, upper_offset


def window_sum(x: Tensor, kernel: tuple[int, int] | None) -> Tensor:
    """Sum of ``x`` [N, C, H, W] over non-overlapping ``kernel`` windows (``None``: the whole plane)."""
    if kernel is None:
        return x.sum(dim=(-2, -1), keepdim=True)
    return F.avg_pool2d(x, kernel, stride=kernel) * (kernel[0] * kernel[1])


def window_expand(x: Tensor, kernel: tuple[int, int] | None, size: tuple[int, int]) -> Tensor:
    """Adjoint of the window selection: each window value copied over its ``kernel`` cells, zero-padded to
    ``size`` where floor mode dropped the last rows/columns. ``x`` is [..., Ho, Wo]."""
    if kernel is None:
        return x.expand(*x.shape[:-2], *size)
    rows, cols = x.shape[-2:]
    x = x[..., :, None, :, None].expand(*x.shape[:-2], rows, kernel[0], cols, kernel[1])
    x = x.reshape(*x.shape[:-4], rows * kernel[0], cols * kernel[1])
    pad_h, pad_w = size[0] - x.shape[-2], size[1] - x.shape[-1]
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def l2_norm_relaxation(
    lower: Tensor, upper: Tensor, kernel: tuple[int, int] | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Relaxation of the window norm ``y = ||x_w||_2`` (L2-norm pooling) on the box ``[l, u]``.

    * Lower: the norm is convex and positively homogeneous, so its tangent plane at any ``x0`` passes through
      the origin and stays below it (Cauchy-Schwarz): ``y >= <x0, x> / ||x0||``. We take ``x0`` the box centre
      (slope 0 where ``x0 = 0`` in the whole window: ``y >= 0``).
    * Upper: each ``x_i^2`` lies under its chord on ``[l_i, u_i]``, ``x_i^2 <= (l_i + u_i) x_i - l_i u_i``, so
      ``y <= sqrt(Q(x))`` with ``Q`` linear; ``sqrt`` is concave, so it lies under its tangent at
      ``q0 = Q(centre) = sum (l_i^2 + u_i^2) / 2``: ``y <= sqrt(q0) + (Q(x) - q0) / (2 sqrt(q0))``. The chords
      are exact at every vertex of the box, the tangent where ``Q(x) = q0``. Where ``q0 = 0`` the window is (numerically) the point 0: constant interval bound.

    Returns per-input-cell slopes ``(s_l, s_u)`` [N, C, H, W] and per-window offsets ``t_u`` [N, C, Ho, Wo].
    """
    size = tuple(lower.shape[-2:])
    centre = (lower + upper) / 2
    norm0 = window_sum(centre.square(), kernel).sqrt()
    lower_slope = centre / window_expand(torch.where(norm0 > 0, norm0, torch.ones_like(norm0)), kernel, size)
    q0 = window_sum((lower.square() + upper.square()) / 2, kernel)
    degenerate = q0 <= torch.finfo(q0.dtype).tiny
    root = torch.where(degenerate, torch.ones_like(q0), q0).sqrt()
    keep = window_expand((~degenerate).to(lower.dtype), kernel, size)
    upper_slope = (lower + upper) / (2 * window_expand(root, kernel, size)) * keep
    # a degenerate window (|x| < 1e-19 everywhere) gets the constant interval bound instead of the tangent
    peak = window_sum(torch.maximum(lower.square(), upper.square()), kernel).sqrt()
    upper_offset = torch.where(degenerate, peak, (q0 - window_sum(lower * upper, kernel)) / (2 * root))
    return lower_slope, upper_slope, upper_offset
