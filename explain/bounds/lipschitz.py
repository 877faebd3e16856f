"""Lipschitz (L2) bounds: the certificate of a 1-Lipschitz body, and Lipschitz boxes for intermediate layers.

**Certificate.** With ``h`` 1-Lipschitz (L2) and ``f = W h + b``, ``f_c - f_y`` changes by at most
``||w_c - w_y||_2 ||delta||_2`` (Anil et al. 2019; Tsuzuku et al. 2018). Over a box with centre ``x0`` and
half-widths ``r`` (zero where cells are fixed), ``||delta||_2 <= ||r||_2`` (``eps sqrt(n_free)`` for the L-inf
ball), so ``max f_c - f_y <= f_c(x0) - f_y(x0) + ||w_c - w_y||_2 ||r||_2``.

**Lipschitz boxes.** Interval boxes grow geometrically with depth (each layer multiplies their width by about
its L-inf operator norm), far faster than the L2 distance between two inputs' representations. So every
coordinate ``z_j`` reaching a nonlinear node gets a second enclosure ``z_j(x0) +- L_j ||r||_2``, with ``L_j``
a Lipschitz constant of ``x -> z_j(x)`` computed here from the weights (no declaration trusted): for a row
``w_j`` of an affine layer fed by a map of constant ``L``, ``L_j = ||w_j||_2 L`` (``||w_j||_1 L`` where a
padding mode maps several taps of a kernel to one pixel); the constant of a layer's whole output is ``L``
times its operator norm, bounded soundly (exact spectral norm for ``Linear``, the maximum over frequencies
of the kernel's Fourier transform for a zero- or circular-padded ``Conv2d``, ``sqrt(||M||_1 ||M||_inf)``
otherwise). Each node owns its rule (``Node.gain``). The interval pass intersects both enclosures. On a 1-Lipschitz network
the Lipschitz box stays ``O(||r||_2)`` at every depth; on other networks it is usually looser than IBP and the
intersection keeps the IBP box.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from explain.bounds.containers import Chain
from explain.bounds.node import Gain, Records
from explain.bounds.norms import conv_operator_norm  # noqa: F401  (re-exported: the tests read it here)

__all__ = ["Gain", "conv_operator_norm", "input_gains", "lipschitz_limits", "lipschitz_spec_upper"]


def lipschitz_spec_upper(logits: Tensor, head_weight: Tensor, spec: Tensor, radius: Tensor) -> Tensor:
    """Upper bounds [n, r] of ``spec @ f(x)`` from ``logits`` [n, K] at the box centres, the last layer's
    weight [K, D], ``spec`` [n, r, K] and the half-widths ``radius`` [n, ...] of the boxes."""
    centre_values = (spec @ logits.unsqueeze(-1)).squeeze(-1)
    gaps = (spec @ head_weight).norm(dim=-1)
    return centre_values + gaps * radius.flatten(1).norm(dim=1, keepdim=True)


def input_gains(root: Chain, sample: Tensor) -> dict[int, Gain]:
    """``id(node) -> Gain`` of the input of every nonlinear node of ``root``, for inputs shaped like
    ``sample`` [n, ...] (the operator norms of convolutions depend on the spatial size)."""
    constants: dict[int, Gain] = {}
    with torch.no_grad():
        root.gain(Gain(1.0, sample.new_ones(())), sample[:1].detach(), constants)
    return constants


def lipschitz_limits(
    root: Chain, constants: dict[int, Gain], lower: Tensor, upper: Tensor
) -> dict[int, tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]]:
    """Lipschitz boxes ``z(x0) +- L ||r||_2`` of the inputs of the nonlinear nodes, for the boxes
    ``[lower, upper]`` (centre ``x0``, half-widths ``r``), in the form of :class:`Records` ``limits``."""
    centre = (lower + upper) / 2
    rho = ((upper - lower) / 2).flatten(1).norm(dim=1)
    inputs: dict[int, Tensor] = {}
    root.interval(centre, centre, Records(inputs=inputs))
    limits = {}
    for key, gain in constants.items():
        if not math.isfinite(gain.whole):
            continue
        value = inputs[key]
        scale = rho.view(-1, *([1] * (value.ndim - 1)))
        radius = gain.coord * scale
        difference = None
        if gain.pair is not None:
            values = value[:, 0::2] - value[:, 1::2]
            difference = (values - gain.pair * scale, values + gain.pair * scale)
        limits[key] = (value - radius, value + radius, difference)
    return limits
