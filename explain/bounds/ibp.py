"""Interval bound propagation (Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation").

Boxes are pushed forward layer by layer. For the margin specification ``f_c - f_y``, the trailing affine
layers are folded into the specification (``(e_c - e_y)^T W`` applied to the box before the last layer), which
is exact where subtracting two output intervals is not.
"""

from __future__ import annotations

import torch
from torch import Tensor

from explain.bounds.containers import Chain
from explain.bounds.crown import ROW_BUDGET, BackwardToInput
from explain.bounds.node import Records, concretize_upper


def interval_bounds(
    root: Chain,
    lower: Tensor,
    upper: Tensor,
    limits: dict[int, tuple] | None = None,
    *,
    full_crown: bool = False,
    row_budget: int = ROW_BUDGET,
    patches: bool = True,
    tight: bool = False,
) -> tuple[Tensor, Tensor, Records]:
    """Output box of ``root`` for the input box ``[lower, upper]``, and the records the backward pass needs.

    ``limits``: boxes that the input boxes of nonlinear nodes are intersected with (:class:`Records`).
    ``full_crown``: also intersect them with full-CROWN boxes (:class:`~explain.bounds.crown.BackwardToInput`,
    ``row_budget`` elements per chunk of backward rows; ``patches``: rows of feature maps as patches, else dense;
    ``tight``: tight boxes rather than auto_LiRPA's).

    Raises:
        ValueError: ``lower`` and ``upper`` differ in shape.
    """
    if lower.shape != upper.shape:
        raise ValueError(f"lower and upper must have the same shape, got {tuple(lower.shape)} and {tuple(upper.shape)}")
    records = Records(limits)
    if full_crown:
        records.crown = BackwardToInput(records, lower, upper, row_budget, patches, tight)
    out_lower, out_upper = root.interval(lower, upper, records)
    records[id(root)] = (out_lower, out_upper)  # the output box
    return out_lower, out_upper, records


def ibp_spec_upper(root: Chain, spec: Tensor, records: Records) -> Tensor:
    """Upper bounds [n, r] of ``spec @ f(x)`` (spec [n, r, K]) from the interval pass's ``records``."""
    nodes = root.nodes
    start = len(nodes)
    while start > 0 and nodes[start - 1].affine:
        start -= 1
    A, bias = spec, torch.zeros(spec.shape[:2], dtype=spec.dtype, device=spec.device)
    for node in reversed(nodes[start:]):
        A, bias = node.backward(A, bias, records)
    box = records[id(nodes[start])] if start < len(nodes) else records[id(root)]
    return concretize_upper(A, bias, *box)
