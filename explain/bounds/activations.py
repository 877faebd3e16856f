"""Piecewise-linear activations: ReLU, GroupSort2 (pairwise sort) and MaxMin.

GroupSort2 reduces to ReLU: for a pair ``(a, b)``, with ``d = a - b``,
``min(a, b) = a - relu(d)`` and ``max(a, b) = b + relu(d)``. So ``<A, out>`` is linear in ``(a, b)`` plus
``(A_max - A_min) relu(d)``, which gets the ReLU relaxation on the box of ``d``. That box is tightest when
computed through the preceding affine layer with differenced weights (:meth:`Conv2d.pair_difference`);
:class:`~explain.bounds.containers.Chain` passes it in when available, otherwise ``[l_a - u_b, u_a - l_b]``.
MaxMin (``cat(relu(x), relu(-x))``) is two ReLUs of ``x`` and ``-x``.
"""

from __future__ import annotations

import torch
from deel.torchlip.modules import GroupSort
from deel.torchlip.modules import MaxMin as LipMaxMin
from torch import Tensor, nn

from explain.bounds.alpha import LowerSlopes
from explain.bounds.convert import converts, exact_type, lipschitz_factor, unsupported
from explain.bounds.node import Gain, Node, Records
from explain.bounds.patches import Patches, row_dot
from explain.bounds.relaxations import relu_relaxation


#: full CROWN bounds every neuron of a ReLU's input once more than this fraction is unstable on the interval box
#: (auto_LiRPA's ``minimum_sparsity``): the stable ones then take their CROWN box too
DENSE_FRACTION = 0.9


def relaxed_backward(A: Tensor, lower: Tensor, upper: Tensor, slopes: LowerSlopes | None = None,
                     key: object = None) -> tuple[Tensor, Tensor]:
    """``<A, relu(x)> <= <A', x> + c`` over the box ``[lower, upper]`` (one per box: [n, *shape]), A [n, r, *shape].

    Positive coefficients take the upper line of the relaxation, negative ones the lower line. The lower slope of
    the unstable neurons is CROWN's adaptive one, or in alpha-CROWN (``slopes``, :mod:`explain.bounds.alpha`) the
    optimised one of each row, stored under ``key``.
    """
    default_slope, upper_slope, upper_offset = relu_relaxation(lower, upper)
    lower_slope = default_slope.unsqueeze(1)
    unstable = crosses_zero(lower, upper) if slopes is not None else None
    if unstable is not None and unstable.any():
        lower_slope = torch.where(unstable.unsqueeze(1), slopes.get(key, default_slope, A.shape[1]), lower_slope)
    positive = A.clamp(min=0)
    A_in = A * lower_slope
    A_in.addcmul_(positive, upper_slope.unsqueeze(1) - lower_slope)
    offset = (positive.flatten(2) @ upper_offset.flatten(1).unsqueeze(-1)).squeeze(-1)
    return A_in, offset


def crosses_zero(lower: Tensor, upper: Tensor) -> Tensor:
    """The unstable neurons of a ReLU: ``lower < 0 < upper`` (elsewhere the relaxation is exact)."""
    return (lower < 0) & (upper > 0)


class ReLU(Node):
    interval_output = True
    crown_box_replaces = True

    def interval(self, lower, upper, records):
        records[id(self)] = (lower, upper)
        return lower.clamp(min=0), upper.clamp(min=0)

    def backward(self, A, bias, records):
        A_in, offset = relaxed_backward(A, *records[id(self)], records.slopes, id(self))
        return A_in, bias + offset

    def backward_patches(self, A, bias, records):
        lower, upper = records[id(self)]
        if records.slopes is not None or lower.ndim != 4:
            return super().backward_patches(A, bias, records)
        maps = records.derived(self, lambda low, up: torch.cat(relu_relaxation(low, up), dim=1))
        return patches_relaxed_backward(A, bias, maps)

    def unstable(self, lower, upper):
        return crosses_zero(lower, upper)

    def crown_rows(self, lower, upper):
        """auto_LiRPA's rows (``get_sparse_C``): the unstable neurons, or every neuron of a box when more than
        :data:`DENSE_FRACTION` of them are unstable. (auto_LiRPA takes the union over the boxes of a batch, so its
        bounds of a box depend on the other boxes; here each box decides alone, as auto_LiRPA on that box.)"""
        unstable = crosses_zero(lower, upper)
        dense = unstable.flatten(1).sum(1) > DENSE_FRACTION * unstable[0].numel()
        return unstable | dense.view(-1, *[1] * (lower.ndim - 1))

    def settled(self, records, exact_input):
        """The row ``e_j`` of ``relu(z_j)`` goes back as ``s e_j`` on ``z_j`` (slope ``s >= 0``), so its CROWN
        bounds are the relaxation's lines at ``z_j``'s own CROWN bounds, never inside the recorded box when
        ``z_j``'s box was tightened (unstable neurons), exact (``exact_input``) or the output is 0 (inactive)."""
        lower = records[id(self)][0]
        return torch.ones_like(lower, dtype=torch.bool) if exact_input else lower < 0

    def gain(self, gain, x, constants):
        constants[id(self)] = Gain(gain.whole, gain.coord)
        return Gain(gain.whole, gain.coord), self.interval(x, x, Records())[0]


def patches_relaxed_backward(A: Patches, bias: Tensor, relaxation: Tensor) -> tuple[Patches, Tensor]:
    """:func:`relaxed_backward` on patches: the relaxation ``(s_l, s_u, t_u)``, concatenated along the channels
    [n, 3C, H, W], read at the windows."""
    lower_slope, upper_slope, upper_offset = A.window(relaxation).chunk(3, dim=3)
    rows = A.grouped(A.coef)
    positive = rows.clamp(min=0)
    coef = rows * lower_slope
    coef.addcmul_(positive, upper_slope - lower_slope)
    # the maps are zero outside the layer, so are the new coefficients
    offset = row_dot(positive, upper_offset)
    return A.with_coef(coef.flatten(1, 2), clean=True), bias + offset


class Clamp(Node):
    """``clamp(x, low, high)``: ``nn.Hardtanh`` (``ReLU6`` is ``Hardtanh(0, 6)``).

    ``clamp(x) = low + relu(x - low) - relu(x - high)``: ``<A, clamp(x)>`` is ``<A, relu(x - low)>`` plus
    ``<-A, relu(x - high)>``, each relaxed as a ReLU on its shifted box (exact where the box avoids both kinks;
    the usual ReLU triangle where it crosses one; sound, not the convex hull, where it crosses both).
    """

    def __init__(self, path: str, low: float, high: float) -> None:
        super().__init__(path)
        if not low < high:
            raise ValueError(f"clamp at '{path}' needs low < high, got {low} and {high}")
        self.low, self.high = low, high

    def interval(self, lower, upper, records):
        records[id(self)] = (lower, upper)
        return lower.clamp(self.low, self.high), upper.clamp(self.low, self.high)

    def _terms(self, A: Tensor, bias: Tensor, first: tuple, second: tuple, total: Tensor) -> tuple[Tensor, Tensor]:
        """``A_1 + A_2`` on ``x`` and the bias, from the two ReLU terms ``(A_i on x - shift_i, offset_i)``."""
        (A_low, offset_low), (A_high, offset_high) = first, second
        sum_low = A_low.flatten(2).sum(-1) if not isinstance(A_low, Patches) else A_low.coef.flatten(2).sum(-1)
        sum_high = A_high.flatten(2).sum(-1) if not isinstance(A_high, Patches) else A_high.coef.flatten(2).sum(-1)
        bias = bias + offset_low + offset_high + self.low * total - self.low * sum_low - self.high * sum_high
        return A_low, A_high, bias

    def backward(self, A, bias, records):
        lower, upper = records[id(self)]
        first = relaxed_backward(A, lower - self.low, upper - self.low, records.slopes, (id(self), 0))
        second = relaxed_backward(-A, lower - self.high, upper - self.high, records.slopes, (id(self), 1))
        A_low, A_high, bias = self._terms(A, bias, first, second, A.flatten(2).sum(-1))
        return A_low + A_high, bias

    def backward_patches(self, A, bias, records):
        lower, upper = records[id(self)]
        if records.slopes is not None or lower.ndim != 4:
            return super().backward_patches(A, bias, records)
        A = A.cleaned()
        maps = records.derived(self, lambda low, up: (torch.cat(relu_relaxation(low - self.low, up - self.low), 1),
                                                      torch.cat(relu_relaxation(low - self.high, up - self.high), 1)))
        zero = torch.zeros_like(bias)
        first = patches_relaxed_backward(A, zero, maps[0])
        second = patches_relaxed_backward(A.with_coef(-A.coef), zero, maps[1])
        A_low, A_high, bias = self._terms(A, bias, first, second, A.coef.flatten(2).sum(-1))
        return A_low.with_coef(A_low.coef + A_high.coef), bias

    def unstable(self, lower, upper):
        return crosses_zero(lower - self.low, upper - self.low) | crosses_zero(lower - self.high, upper - self.high)

    def settled(self, records, exact_input):
        """As :meth:`ReLU.settled`: every coordinate but those on the identity piece (``low <= l, u <= high``)."""
        lower, upper = records[id(self)]
        return torch.ones_like(lower, dtype=torch.bool) if exact_input else (lower < self.low) | (upper > self.high)

    def gain(self, gain, x, constants):
        constants[id(self)] = Gain(gain.whole, gain.coord)
        return Gain(gain.whole, gain.coord), self.interval(x, x, Records())[0]


class PairSort(Node):
    """deel-torchlip ``GroupSort2``: channels ``(2j, 2j+1)`` of dim 1 become ``(min, max)``, times ``scale``."""

    def __init__(self, path: str, scale: float = 1.0) -> None:
        super().__init__(path)
        self.scale = scale

    def _pairs(self, x: Tensor, dim: int) -> Tensor:
        channels = x.shape[dim]
        if channels % 2:
            raise ValueError(f"GroupSort2 at '{self.path}' needs an even number of channels, got {channels}")
        return x.view(*x.shape[:dim], channels // 2, 2, *x.shape[dim + 1 :])

    def difference_box(self, lower: Tensor, upper: Tensor, difference: tuple[Tensor, Tensor] | None = None
                       ) -> tuple[Tensor, Tensor]:
        """Box of the pair differences ``a - b``: ``[l_a - u_b, u_a - l_b]``, intersected with ``difference``."""
        lower, upper = self._pairs(lower, 1), self._pairs(upper, 1)
        low_d, up_d = lower[:, :, 0] - upper[:, :, 1], upper[:, :, 0] - lower[:, :, 1]
        if difference is not None:
            low_d, up_d = torch.maximum(low_d, difference[0]), torch.minimum(up_d, difference[1])
            up_d = torch.maximum(up_d, low_d)  # guard against float rounding crossing the two estimates
        return low_d, up_d

    def interval(self, lower, upper, records, difference: tuple[Tensor, Tensor] | None = None):
        low_d, up_d = self.difference_box(lower, upper, difference)
        lower, upper = self._pairs(lower, 1), self._pairs(upper, 1)
        la, lb, ua, ub = lower[:, :, 0], lower[:, :, 1], upper[:, :, 0], upper[:, :, 1]
        records[id(self)] = (low_d, up_d)
        relu_low, relu_up = low_d.clamp(min=0), up_d.clamp(min=0)
        # both enclosures are sound; keep their intersection
        min_low = torch.maximum(torch.minimum(la, lb), la - relu_up)
        min_up = torch.minimum(torch.minimum(ua, ub), ua - relu_low)
        max_low = torch.maximum(torch.maximum(la, lb), lb + relu_low)
        max_up = torch.minimum(torch.maximum(ua, ub), ub + relu_up)
        new_lower = torch.stack([min_low, torch.minimum(max_low, max_up)], dim=2).flatten(1, 2) * self.scale
        new_upper = torch.stack([torch.maximum(min_up, min_low), max_up], dim=2).flatten(1, 2) * self.scale
        return new_lower, new_upper

    def backward(self, A, bias, records):
        pairs = self._pairs(A if self.scale == 1 else A * self.scale, 2)
        A_min, A_max = pairs[:, :, :, 0], pairs[:, :, :, 1]
        slope, offset = relaxed_backward(A_max - A_min, *records[id(self)], records.slopes, id(self))
        A_in = torch.stack([A_min + slope, A_max - slope], dim=3)
        return A_in.flatten(2, 3), bias + offset

    def tighten(self, lower, upper, difference, records):
        """Full CROWN on the pair differences, the only box the relaxation reads."""
        low_d, up_d = self.difference_box(lower, upper, difference)

        def on_input(A: Tensor) -> Tensor:  # a row on the differences -> the same row on (a, b)
            return torch.stack([A, -A], dim=3).flatten(2, 3)

        difference = records.crown.tighten(low_d, up_d, crosses_zero(low_d, up_d), on_input)
        return lower, upper, difference

    def gain(self, gain, x, constants):
        """Sorting a pair permutes it: per coordinate the larger constant of its pair, times ``scale``."""
        constants[id(self)] = gain
        coord = gain.coord
        if coord.ndim >= 2 and coord.shape[1] > 1:
            coord = self._pairs(coord, 1).amax(dim=2, keepdim=True).expand(-1, -1, 2, *coord.shape[2:]).flatten(1, 2)
        return Gain(gain.whole * self.scale, coord * self.scale), self.interval(x, x, Records())[0]


class MaxMin(Node):
    """deel-torchlip ``MaxMin``: ``cat(relu(x), relu(-x))`` along dim 1, times ``scale``."""

    def __init__(self, path: str, scale: float = 1.0) -> None:
        super().__init__(path)
        self.scale = scale

    def interval(self, lower, upper, records):
        records[id(self)] = (lower, upper)
        new_lower = torch.cat([lower.clamp(min=0), (-upper).clamp(min=0)], dim=1)
        new_upper = torch.cat([upper.clamp(min=0), (-lower).clamp(min=0)], dim=1)
        return new_lower * self.scale, new_upper * self.scale

    def backward(self, A, bias, records):
        lower, upper = records[id(self)]
        A_pos, A_neg = (A if self.scale == 1 else A * self.scale).chunk(2, dim=2)
        slope_pos, offset_pos = relaxed_backward(A_pos, lower, upper, records.slopes, (id(self), 0))
        slope_neg, offset_neg = relaxed_backward(A_neg, -upper, -lower, records.slopes, (id(self), 1))
        return slope_pos - slope_neg, bias + offset_pos + offset_neg

    def unstable(self, lower, upper):
        return crosses_zero(lower, upper)

    def gain(self, gain, x, constants):
        constants[id(self)] = Gain(gain.whole, gain.coord)
        coord = torch.cat([gain.coord, gain.coord], dim=1) if gain.coord.ndim >= 2 else gain.coord
        return Gain(gain.whole * self.scale, coord * self.scale), self.interval(x, x, Records())[0]


# ------------------------------------------------------------------------------------------- builders
@converts(nn.ReLU)
def _relu(module: nn.ReLU, path: str) -> ReLU:
    exact_type(module, path, nn.ReLU)
    return ReLU(path)


@converts(nn.Hardtanh)
def _hardtanh(module: nn.Hardtanh, path: str) -> Clamp:
    exact_type(module, path, nn.Hardtanh, nn.ReLU6)
    return Clamp(path, float(module.min_val), float(module.max_val))


@converts(GroupSort)
def _group_sort(module: GroupSort, path: str) -> PairSort:
    if module.group_size != 2:
        raise unsupported(module, path, f"only group size 2 (GroupSort2), got {module.group_size}")
    return PairSort(path, scale=lipschitz_factor(module, path))


@converts(LipMaxMin)
def _max_min(module: LipMaxMin, path: str) -> MaxMin:
    if module._dim not in (None, 1):
        raise unsupported(module, path, f"MaxMin only along dim 1, got dim={module._dim}")
    return MaxMin(path, scale=lipschitz_factor(module, path))
