"""Upper bounds of the margins ``f_c(x) - f_y(x)``, ``c != y``, over input boxes, by IBP, CROWN (full, or with
IBP intermediate boxes), the Lipschitz certificate, or the tightest of them; and the same over the L-inf balls
of EVA, one box per (image, fixed region) or all regions of an image from one shared relaxation."""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import torch
from torch import Tensor

from explain.bounds.alpha import ITERATIONS, alpha_crown_spec_upper
from explain.bounds.crown import ROW_BUDGET, crown_backward, crown_spec_upper
from explain.bounds.graph import BoundGraph
from explain.bounds.ibp import ibp_spec_upper, interval_bounds
from explain.bounds.lipschitz import input_gains, lipschitz_limits, lipschitz_spec_upper
from explain.bounds.node import Records
from explain.validation import non_negative_int, one_of, positive_int

#: ``crown``: full CROWN; ``alpha-crown``: full CROWN with optimised ReLU lower slopes (tighter, about 20x the
#: final pass); ``crown-ibp``: CROWN on interval intermediate boxes; ``best``: per class the smallest of IBP,
#: full CROWN and (declared 1-Lipschitz bodies) the Lipschitz certificate
METHODS = ("crown", "alpha-crown", "crown-ibp", "ibp", "lipschitz", "best")
#: the methods whose intermediate boxes come from full CROWN
FULL_CROWN = ("crown", "alpha-crown", "best")


def margin_spec(targets: Tensor, num_classes: int) -> Tensor:
    """The rows ``e_c - e_y`` for every ``c != y``: [n, K-1, K] for targets [n].

    Raises:
        ValueError: fewer than 2 classes, or a target outside ``[0, num_classes)``.
    """
    if num_classes < 2:
        raise ValueError(f"the margin f_c - f_y needs at least 2 classes, the model has {num_classes}")
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(
            f"targets must be class indices in [0, {num_classes}) for a model with {num_classes} outputs, got "
            f"values in [{int(targets.min())}, {int(targets.max())}]"
        )
    eye = torch.eye(num_classes, device=targets.device)
    others = torch.arange(num_classes - 1, device=targets.device).unsqueeze(0)
    others = others + (others >= targets.unsqueeze(1)).long()  # skip y
    return eye[others] - eye[targets].unsqueeze(1)


@dataclass
class TopClasses:
    """The ``m`` margin rows of largest (IBP) bound per box, ``index`` [n, m]: CROWN's backward pass carries one
    row per class, heavy for many classes (ImageNet: 999 rows per box); the other rows keep a cheaper bound."""

    index: Tensor

    @classmethod
    def of(cls, bounds: Tensor, m: int) -> TopClasses:
        return cls(bounds.topk(m, dim=1).indices)

    def rows(self, spec: Tensor) -> Tensor:
        """The chosen rows [n, m, K] of ``spec`` [n, K-1, K]."""
        return spec.gather(1, self.index.unsqueeze(-1).expand(-1, -1, spec.shape[-1]))

    def scatter(self, base: Tensor, values: Tensor) -> Tensor:
        """``base`` [n, K-1] (broadcast over the trailing dims of ``values``) with the chosen rows replaced by
        ``values`` [n, m, ...]."""
        trailing = values.shape[2:]
        base = base.view(*base.shape, *[1] * len(trailing)).expand(*base.shape, *trailing)
        index = self.index.view(*self.index.shape, *[1] * len(trailing)).expand_as(values)
        return base.scatter(1, index, values)


def intermediate_bounds(
    graph: BoundGraph,
    lower: Tensor,
    upper: Tensor,
    lipschitz_boxes: bool = True,
    *,
    full_crown: bool = True,
    row_budget: int = ROW_BUDGET,
    tight_boxes: bool = False,
) -> tuple[Tensor, Records]:
    """The interval pass over the boxes ``[lower, upper]``: output lower bounds [n, K] and the records of the
    intermediate boxes, intersected with the Lipschitz boxes (:mod:`explain.bounds.lipschitz`) when
    ``lipschitz_boxes``, with full-CROWN boxes when ``full_crown`` (:mod:`explain.bounds.crown`; auto_LiRPA's
    boxes, or with ``tight_boxes`` also intersected with the interval boxes and bounding ReLU outputs)."""
    positive_int("row_budget", row_budget)
    limits = None
    if lipschitz_boxes:
        key = (tuple(lower.shape[1:]), lower.dtype, lower.device)
        if key not in graph.gains:
            graph.gains[key] = input_gains(graph.root, lower)
        limits = lipschitz_limits(graph.root, graph.gains[key], lower, upper)
    out_lower, _, records = interval_bounds(graph.root, lower, upper, limits, full_crown=full_crown,
                                            row_budget=row_budget, tight=tight_boxes)
    return out_lower, records


def margin_upper_bounds(
    graph: BoundGraph,
    lower: Tensor,
    upper: Tensor,
    targets: Tensor,
    method: str = "crown",
    *,
    crown_classes: int | None = None,
    lipschitz_boxes: bool = True,
    row_budget: int = ROW_BUDGET,
    alpha_iterations: int = ITERATIONS,
    tight_boxes: bool = False,
) -> Tensor:
    """Upper bounds [n, K-1] of ``max_{lower <= x <= upper} f_c(x) - f_y(x)`` for each ``c != y`` (in class
    order, ``y`` skipped). ``method``: ``crown`` (full CROWN), ``alpha-crown`` (full CROWN, then the ReLU lower
    slopes of the final pass optimised by ``alpha_iterations`` projected gradient steps: tighter, slower; never
    looser than ``crown``, :mod:`explain.bounds.alpha`), ``crown-ibp`` (CROWN on interval intermediate boxes:
    cheaper, looser), ``ibp``, ``lipschitz`` (needs a declared 1-Lipschitz body under a last linear layer) or
    ``best`` (per class, the smallest of IBP, full CROWN and, where declared, the Lipschitz certificate).
    ``lipschitz_boxes``: intersect the intermediate boxes with Lipschitz boxes (:func:`intermediate_bounds`;
    computed from the weights, sound for any network). ``row_budget``: memory of full CROWN's intermediate
    passes (elements of the largest coefficient tensor of a chunk of rows). ``tight_boxes``: full CROWN's
    intermediate boxes also intersected with the interval boxes, and the inputs of max pooling after a ReLU bounded
    by CROWN too (:mod:`explain.bounds.crown`): usually tighter, slower, and no longer auto_LiRPA's bounds
    (default False: equal to auto_LiRPA's ``method="CROWN"`` to round-off, with ``lipschitz_boxes=False``).

    ``crown_classes``: with ``m`` only the ``m`` classes with the largest IBP bound of each box get the CROWN
    pass (keeping the smaller of it and IBP's); the others keep their (sound, cheap) IBP bound (:class:`TopClasses`).

    Raises:
        ValueError: an unknown ``method``, a bad ``crown_classes``, ``alpha_iterations`` or ``row_budget``,
            targets outside the model's classes, or the Lipschitz bound asked of a model not declared 1-Lipschitz.
    """
    one_of("method", method, METHODS)
    crown_classes = positive_int("crown_classes", crown_classes, allow_none=True)
    alpha_iterations = non_negative_int("alpha_iterations", alpha_iterations)
    use_lipschitz = method == "lipschitz" or (method == "best" and graph.lipschitz_body)
    if use_lipschitz and (not graph.lipschitz_body or graph.head is None):
        last = graph.root.nodes[-1] if graph.root.nodes else None
        raise ValueError(
            "the Lipschitz bound needs a model declared 1-Lipschitz (pass lipschitz_body=True or set the "
            "model's `lipschitz_body = True` attribute) whose last layer is linear; got lipschitz_body="
            f"{graph.lipschitz_body} and last layer {last!r}"
        )
    bounds = []
    spec = None
    if method != "lipschitz":
        out_lower, records = intermediate_bounds(graph, lower, upper, lipschitz_boxes,
                                                 full_crown=method in FULL_CROWN, row_budget=row_budget,
                                                 tight_boxes=tight_boxes)
        spec = margin_spec(targets, _num_classes(out_lower)).to(lower.dtype)
        partial = crown_classes is not None and crown_classes < spec.shape[1]
        ibp = ibp_spec_upper(graph.root, spec, records) if method in ("ibp", "best") or partial else None
        if method in ("ibp", "best"):
            bounds.append(ibp)
        if method != "ibp":
            def backward_bound(rows: Tensor) -> Tensor:
                if method == "alpha-crown":
                    return alpha_crown_spec_upper(graph.root, rows, records, lower, upper, alpha_iterations)
                return crown_spec_upper(graph.root, rows, records, lower, upper)

            if partial:  # the chosen rows keep the smaller of their two sound bounds
                top = TopClasses.of(ibp, crown_classes)
                chosen = torch.minimum(backward_bound(top.rows(spec)), ibp.gather(1, top.index))
                bounds.append(top.scatter(ibp, chosen))
            else:
                bounds.append(backward_bound(spec))
    if use_lipschitz:
        centre = (lower + upper) / 2
        logits = interval_bounds(graph.root, centre, centre)[0]  # the forward pass of the graph
        if spec is None:
            spec = margin_spec(targets, _num_classes(logits)).to(lower.dtype)
        bounds.append(lipschitz_spec_upper(logits, graph.head.weight, spec, (upper - lower) / 2))
    return reduce(torch.minimum, bounds)


def ball_box(
    images: Tensor, fixed: Tensor | None, eps: float, input_range: tuple[float, float] | None = None
) -> tuple[Tensor, Tensor]:
    """The box around ``images[i]``: radius ``eps`` where ``fixed[i]`` [H, W] is False (all channels; None:
    nowhere fixed), the point where it is True, intersected with ``input_range`` if given."""
    radius = eps if fixed is None else eps * (~fixed).unsqueeze(1).to(images.dtype)
    lower, upper = images - radius, images + radius
    if input_range is not None:
        lower, upper = lower.clamp(min=input_range[0]), upper.clamp(max=input_range[1])
    return lower, upper


def margin_upper_bounds_of_balls(
    graph: BoundGraph,
    images: Tensor,
    targets: Tensor,
    fixed: Tensor | None,
    eps: float,
    *,
    methods: tuple[str, ...] = ("crown",),
    input_range: tuple[float, float] | None = None,
    crown_classes: int | None = None,
    lipschitz_boxes: bool = True,
    row_budget: int = ROW_BUDGET,
    tight_boxes: bool = False,
) -> Tensor:
    """Margin upper bounds [n, K-1] of n boxes (:func:`ball_box`), the smallest of ``methods``."""
    lower, upper = ball_box(images, fixed, eps, input_range)
    bounds = [margin_upper_bounds(graph, lower, upper, targets, method, crown_classes=crown_classes,
                                  lipschitz_boxes=lipschitz_boxes, row_budget=row_budget, tight_boxes=tight_boxes)
              for method in methods]
    return torch.stack(bounds).amin(0)


def shared_crown_margins(
    graph: BoundGraph,
    images: Tensor,
    targets: Tensor,
    inverses: Tensor,
    eps: float,
    *,
    input_range: tuple[float, float] | None = None,
    crown_classes: int | None = None,
    lipschitz_boxes: bool = True,
    full_crown: bool = True,
    row_budget: int = ROW_BUDGET,
    tight_boxes: bool = False,
) -> tuple[Tensor, Tensor]:
    """CROWN margin bounds of the full balls [b, K-1] and of the region boxes [b, R, K-1] from one bound
    propagation per image (EVA's shared relaxation, :mod:`explain.attributions.eva`). ``inverses`` [b, H, W]:
    region index of every pixel, in ``[0, R)``; a region index that an image does not use gets the full ball's
    bound. ``full_crown``: full CROWN intermediate boxes (else CROWN-IBP; ``tight_boxes``: see
    :func:`margin_upper_bounds`).

    Every region box lies in the ball, so the relaxations built on the ball's intermediate boxes hold on it, and
    so does CROWN's linear bound ``<A, x> + b`` computed once on the ball. With centre ``c`` and half-widths ``r``
    of the ball, the bound of the box that fixes region ``u`` at ``x`` is
    ``sum_p g_p + b - sum_{p in u} (g_p - <A_p, x_p>)`` with ``g_p = <A_p, c_p> + <|A_p|, r_p>`` (sums over the
    channels of pixel ``p``).
    """
    crown_classes = positive_int("crown_classes", crown_classes, allow_none=True)
    lower, upper = ball_box(images, None, eps, input_range)
    out_lower, records = intermediate_bounds(graph, lower, upper, lipschitz_boxes, full_crown=full_crown,
                                             row_budget=row_budget, tight_boxes=tight_boxes)
    spec = margin_spec(targets, _num_classes(out_lower)).to(images.dtype)
    top = None
    if crown_classes is not None and crown_classes < spec.shape[1]:
        ibp = ibp_spec_upper(graph.root, spec, records)
        top = TopClasses.of(ibp, crown_classes)
        spec = top.rows(spec)
    A, bias = crown_backward(graph.root, spec, records)
    centre, radius = ((lower + upper) / 2).unsqueeze(1), ((upper - lower) / 2).unsqueeze(1)
    free = (A * centre + A.abs() * radius).sum(2)  # [b, m, H, W]
    drop = (free - (A * images.unsqueeze(1)).sum(2)).flatten(2)
    full = free.flatten(2).sum(-1) + bias
    count = int(inverses.max()) + 1
    index = inverses.flatten(1).unsqueeze(1).expand_as(drop)
    regions = full.unsqueeze(-1) - drop.new_zeros(*drop.shape[:2], count).scatter_add_(2, index, drop)
    if top is not None:  # the full ball's IBP bound holds on every sub-box: the other classes keep it, the chosen
        chosen = ibp.gather(1, top.index)  # ones keep the smaller of it and CROWN's
        full = top.scatter(ibp, torch.minimum(full, chosen))
        regions = top.scatter(ibp, torch.minimum(regions, chosen.unsqueeze(-1)))
    return full, regions.transpose(1, 2)


def _num_classes(outputs: Tensor) -> int:
    if outputs.ndim != 2:
        raise ValueError(f"the model must output logits [N, K], got shape {tuple(outputs.shape)}")
    return outputs.shape[1]
