"""Verified perturbation analysis: sound upper bounds of ``f_c - f_y`` over input boxes.

``build_graph(model)`` turns a network into bound-propagation nodes (unsupported layers raise an error that
names them); ``margin_upper_bounds(graph, lower, upper, targets, method)`` bounds every margin by interval
bound propagation (IBP), CROWN with IBP intermediate bounds, the Lipschitz certificate of a 1-Lipschitz body,
or the tightest of them. EVA (:mod:`explain.attributions.eva`) is built on it.

Choices. CROWN uses interval boxes for the intermediate layers (CROWN-IBP): full CROWN needs a backward pass
per intermediate neuron, out of reach at image resolution. The interval boxes are intersected with Lipschitz
boxes ``z(x0) +- L_j ||r||_2`` whose constants come from the weights (:mod:`explain.bounds.lipschitz`): on a
trained 1-Lipschitz ``lip_vgg`` at eps = 1/255 this cuts the gap between the bound and a PGD attack from ~400
to ~4 (the Lipschitz certificate alone: ~0.3); on ReLU networks the interval boxes are the tighter ones and
the gap stays large (~10^4 for a trained ``small_cnn``; see ``benchmarks/bench_eva.py``). Every bound is sound
up to float rounding: the tests check them against a PGD attack on networks of every supported layer, and the
Lipschitz constants against the networks' gradients.
"""

from explain.bounds.graph import SUPPORTED, BoundGraph, UnsupportedLayerError, build_graph, check_graph
from explain.bounds.margin import METHODS, margin_spec, margin_upper_bounds

__all__ = [
    "METHODS",
    "SUPPORTED",
    "BoundGraph",
    "UnsupportedLayerError",
    "build_graph",
    "check_graph",
    "margin_spec",
    "margin_upper_bounds",
]
