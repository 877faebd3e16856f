"""CROWN backward linear relaxation (Zhang et al. 2018), with IBP intermediate bounds (CROWN-IBP).

The specification ``spec @ f(x)`` is pulled back through the network from the output to the input: affine
layers exactly, nonlinear ones through a linear relaxation that holds on their input box. The boxes of the
intermediate layers come from the interval pass (Zhang et al. 2020, "Towards Stable and Efficient Training of
Verifiably Robust Neural Networks": CROWN-IBP), intersected with Lipschitz boxes when asked
(:mod:`explain.bounds.lipschitz`); full CROWN would need one backward pass per intermediate neuron. The
result, a linear function of the input, is maximised in closed form over the input box.
"""

from __future__ import annotations

import torch
from torch import Tensor

from explain.bounds.containers import Chain
from explain.bounds.node import Records, concretize_upper


def crown_backward(root: Chain, spec: Tensor, records: Records) -> tuple[Tensor, Tensor]:
    """``(A, bias)``, A [n, r, *input], bias [n, r]: ``spec @ f(x) <= <A, x> + bias`` for every ``x`` whose
    intermediate values lie in the recorded boxes (spec [n, r, K])."""
    bias = torch.zeros(spec.shape[:2], dtype=spec.dtype, device=spec.device)
    return root.backward(spec, bias, records)


def crown_spec_upper(root: Chain, spec: Tensor, records: Records, lower: Tensor, upper: Tensor) -> Tensor:
    """Upper bounds [n, r] of ``spec @ f(x)`` (spec [n, r, K]) over the box ``[lower, upper]``."""
    return concretize_upper(*crown_backward(root, spec, records), lower, upper)
