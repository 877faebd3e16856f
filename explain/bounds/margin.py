"""Upper bounds of the margins ``f_c(x) - f_y(x)``, ``c != y``, over input boxes, by IBP, CROWN, the
Lipschitz certificate, or the tightest of them."""

from __future__ import annotations

from functools import reduce

import torch
from torch import Tensor

from explain.bounds.crown import crown_spec_upper
from explain.bounds.graph import BoundGraph
from explain.bounds.ibp import ibp_spec_upper, interval_bounds
from explain.bounds.lipschitz import input_gains, lipschitz_limits, lipschitz_spec_upper
from explain.bounds.node import Records

METHODS = ("crown", "ibp", "lipschitz", "best")


def margin_spec(targets: Tensor, num_classes: int) -> Tensor:
    """The rows ``e_c - e_y`` for every ``c != y``: [n, K-1, K] for targets [n]."""
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


def intermediate_bounds(
    graph: BoundGraph, lower: Tensor, upper: Tensor, lipschitz_boxes: bool = True
) -> tuple[Tensor, Records]:
    """The interval pass over the boxes ``[lower, upper]``: output lower bounds [n, K] and the records of the
    intermediate boxes, intersected with the Lipschitz boxes (:mod:`explain.bounds.lipschitz`) when
    ``lipschitz_boxes``."""
    limits = None
    if lipschitz_boxes:
        key = (tuple(lower.shape[1:]), lower.dtype, lower.device)
        if key not in graph.gains:
            graph.gains[key] = input_gains(graph.root, lower)
        limits = lipschitz_limits(graph.root, graph.gains[key], lower, upper)
    out_lower, _, records = interval_bounds(graph.root, lower, upper, limits)
    return out_lower, records


def margin_upper_bounds(
    graph: BoundGraph,
    lower: Tensor,
    upper: Tensor,
    targets: Tensor,
    method: str = "crown",
    crown_classes: int | None = None,
    lipschitz_boxes: bool = True,
) -> Tensor:
    """Upper bounds [n, K-1] of ``max_{lower <= x <= upper} f_c(x) - f_y(x)`` for each ``c != y`` (in class
    order, ``y`` skipped). ``method``: ``crown`` (CROWN-IBP), ``ibp``, ``lipschitz`` (needs a declared
    1-Lipschitz body under a last linear layer) or ``best`` (per class, the smallest of the available ones).
    ``lipschitz_boxes``: intersect the intermediate boxes of IBP and CROWN with Lipschitz boxes
    (:func:`intermediate_bounds`; computed from the weights, sound for any network).

    ``crown_classes``: CROWN's backward pass carries one row per class, which is heavy for many classes
    (ImageNet: 999 rows per box). With ``crown_classes=m`` only the ``m`` classes with the largest IBP bound
    of each box get the CROWN pass; the others keep their (sound, cheap) IBP bound.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
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
        out_lower, records = intermediate_bounds(graph, lower, upper, lipschitz_boxes)
        spec = margin_spec(targets, _num_classes(out_lower)).to(lower.dtype)
        partial = crown_classes is not None and crown_classes < spec.shape[1]
        if method in ("ibp", "best") or (method == "crown" and partial):
            ibp = ibp_spec_upper(graph.root, spec, records)
            bounds.append(ibp)
        if method in ("crown", "best") and partial:
            if crown_classes < 1:
                raise ValueError(f"crown_classes must be a positive int or None, got {crown_classes!r}")
            chosen = ibp.topk(crown_classes, dim=1).indices
            rows = spec.gather(1, chosen.unsqueeze(-1).expand(-1, -1, spec.shape[-1]))
            crown = ibp.scatter(1, chosen, crown_spec_upper(graph.root, rows, records, lower, upper))
            bounds = [crown] if method == "crown" else [*bounds, crown]
        elif method in ("crown", "best"):
            bounds.append(crown_spec_upper(graph.root, spec, records, lower, upper))
    if use_lipschitz:
        centre = (lower + upper) / 2
        logits = interval_bounds(graph.root, centre, centre)[0]  # the forward pass of the graph
        if spec is None:
            spec = margin_spec(targets, _num_classes(logits)).to(lower.dtype)
        bounds.append(lipschitz_spec_upper(logits, graph.head.weight, spec, (upper - lower) / 2))
    return reduce(torch.minimum, bounds)


def _num_classes(outputs: Tensor) -> int:
    if outputs.ndim != 2:
        raise ValueError(f"the model must output logits [N, K], got shape {tuple(outputs.shape)}")
    return outputs.shape[1]
