"""Verified perturbation analysis: sound upper bounds of ``f_c - f_y`` over input boxes.

``build_graph(model)`` turns a network into bound-propagation nodes, one class per operator owning all its rules
(IBP, CROWN backward step, relaxation, full-CROWN tightening, Lipschitz gain; unsupported layers raise an error
that names them); ``margin_upper_bounds(graph, lower, upper, targets, method)`` bounds every margin by interval
bound propagation (IBP), full CROWN (every nonlinear layer's input box from a backward pass to the input, as
auto_LiRPA's ``method="CROWN"``; equal to its bounds, ``benchmarks/compare_auto_lirpa.py``), alpha-CROWN (full
CROWN with the final pass's ReLU lower slopes optimised, :mod:`explain.bounds.alpha`), CROWN with IBP
intermediate boxes (``crown-ibp``), the Lipschitz certificate of a 1-Lipschitz body, or the tightest of them.
EVA (:mod:`explain.attributions.eva`) is built on it.

Intermediate boxes are the intersection of the interval box, the Lipschitz box ``z(x0) +- L_j ||r||_2`` whose
constants come from the weights (:mod:`explain.bounds.lipschitz`) and, in full CROWN, the CROWN box. Full CROWN
is what makes the bounds useful on networks not trained for certification (see ``benchmarks/bench_eva.py``:
CROWN-IBP is vacuous there). Every bound is sound up to float rounding: the tests check them against a PGD
attack on networks of every supported layer, every relaxation against the function it relaxes, and the
Lipschitz constants against the networks' gradients.
"""

from explain.bounds.graph import SUPPORTED, BoundGraph, UnsupportedLayerError, build_graph, check_graph
from explain.bounds.margin import (
    METHODS,
    margin_spec,
    margin_upper_bounds,
    margin_upper_bounds_of_balls,
    shared_crown_margins,
)

__all__ = [
    "METHODS",
    "SUPPORTED",
    "BoundGraph",
    "UnsupportedLayerError",
    "build_graph",
    "check_graph",
    "margin_spec",
    "margin_upper_bounds",
    "margin_upper_bounds_of_balls",
    "shared_crown_margins",
]
