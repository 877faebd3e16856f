"""Verified perturbation analysis: sound upper bounds of ``f_c - f_y`` over input boxes.

``build_graph(model)`` turns a network into bound-propagation nodes (unsupported layers raise an error that
names them); ``margin_upper_bounds(graph, lower, upper, targets, method)`` bounds every margin by interval
bound propagation (IBP), CROWN with IBP intermediate bounds, the Lipschitz certificate of a 1-Lipschitz body,
or the tightest of them. EVA (:mod:`explain.attributions.eva`) is built on it.

Choices. CROWN uses IBP boxes for the intermediate layers (CROWN-IBP): full CROWN needs a backward pass per
intermediate neuron, out of reach for the 65 boxes per image of EVA. On small and shallow networks CROWN-IBP is
several times tighter than IBP; on deep ones both grow with depth, since the IBP boxes do (for a trained
``small_cnn`` or the 1-Lipschitz ``lip_vgg`` at eps = 1/255 they are far above the attack value, see
``benchmarks/bench_eva.py``). For 1-Lipschitz networks the Lipschitz certificate is then the tightest by orders
of magnitude, but it depends on a box only through its number of free inputs. Every bound is sound up to float
rounding: the tests check them against a PGD attack on networks of every supported layer.
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
