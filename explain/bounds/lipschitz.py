"""The Lipschitz certificate for a 1-Lipschitz body under a last linear layer ``W``.

With ``h`` 1-Lipschitz (L2) and ``f = W h + b``, ``f_c - f_y`` changes by at most
``||w_c - w_y||_2 ||delta||_2`` (Anil et al. 2019; Tsuzuku et al. 2018). Over a box with centre ``x0`` and
half-widths ``r`` (zero where cells are fixed), ``||delta||_2 <= ||r||_2`` (``eps sqrt(n_free)`` for the L-inf
ball), so ``max f_c - f_y <= f_c(x0) - f_y(x0) + ||w_c - w_y||_2 ||r||_2``.
"""

from __future__ import annotations

from torch import Tensor


def lipschitz_spec_upper(logits: Tensor, head_weight: Tensor, spec: Tensor, radius: Tensor) -> Tensor:
    """Upper bounds [n, r] of ``spec @ f(x)`` from ``logits`` [n, K] at the box centres, the last layer's
    weight [K, D], ``spec`` [n, r, K] and the half-widths ``radius`` [n, ...] of the boxes."""
    centre_values = (spec @ logits.unsqueeze(-1)).squeeze(-1)
    gaps = (spec @ head_weight).norm(dim=-1)
    return centre_values + gaps * radius.flatten(1).norm(dim=1, keepdim=True)
