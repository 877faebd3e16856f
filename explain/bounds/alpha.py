"""alpha-CROWN (Xu et al. 2021, "Fast and Complete: Enabling Complete Neural Network Verification with Rapid and
Massively Parallel Incomplete Verifiers"; auto_LiRPA's ``method="CROWN-Optimized"``).

Any ``alpha`` in ``[0, 1]`` gives a sound lower line ``alpha x <= relu(x)`` of an unstable ReLU (``l < 0 < u``),
so CROWN's final backward pass stays sound for every choice of lower slopes; CROWN picks the adaptive one
(:func:`~explain.bounds.relaxations.relu_relaxation`). alpha-CROWN makes them variables, one per (box,
specification row, unstable neuron), and minimises the concretized upper bound by projected gradient steps
(Adam, then clipping to ``[0, 1]``) starting from CROWN's slopes, keeping per row the best bound seen. The
intermediate boxes stay those of full CROWN (auto_LiRPA's default ``fix_interm_bounds=True``,
``enable_opt_interm_bounds=False``); the defaults (20 steps, learning rate 0.5 decayed by 0.98 per step) are
auto_LiRPA's. Never looser than full CROWN (its bound is the first one kept); each step costs about one
final backward pass and its gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from explain.bounds.crown import crown_spec_upper
from explain.bounds.node import Node, Records

#: auto_LiRPA's ``optimize_bound_args`` defaults: iterations, ``lr_alpha``, ``lr_decay``
ITERATIONS, LEARNING_RATE, DECAY = 20, 0.5, 0.98


class LowerSlopes:
    """``records.slopes`` during alpha-CROWN: the lower-slope variables [n, r, *shape] of every relaxed ReLU
    (keyed by its node, and by the half of a MaxMin), created on first use from CROWN's slopes ``default``
    [n, *shape]; only their unstable neurons are read."""

    def __init__(self) -> None:
        self.variables: dict[object, Tensor] = {}

    def get(self, key: object, default: Tensor, rows: int) -> Tensor:
        if key not in self.variables:
            start = default.unsqueeze(1).expand(default.shape[0], rows, *default.shape[1:])
            self.variables[key] = start.detach().clone().requires_grad_(True)
        return self.variables[key]

    def project(self) -> None:
        """Back into ``[0, 1]``, where ``alpha x`` stays below ``relu(x)``."""
        with torch.no_grad():
            for variable in self.variables.values():
                variable.clamp_(0, 1)


def alpha_crown_spec_upper(
    root: Node,
    spec: Tensor,
    records: Records,
    lower: Tensor,
    upper: Tensor,
    iterations: int = ITERATIONS,
    learning_rate: float = LEARNING_RATE,
) -> Tensor:
    """Upper bounds [n, r] of ``spec @ f(x)`` (spec [n, r, K]) over ``[lower, upper]``, each the smallest of
    ``iterations + 1`` CROWN bounds with lower slopes optimised from CROWN's (``records``: full CROWN's)."""
    with torch.inference_mode(False), torch.enable_grad():
        # plain copies: tensors made under inference mode cannot be saved for the gradient
        spec, lower, upper = spec.clone(), lower.clone(), upper.clone()
        slopes = LowerSlopes()
        records.slopes = slopes
        try:
            bound = crown_spec_upper(root, spec, records, lower, upper)  # CROWN's slopes: CROWN's bound
            best = bound.detach()
            if not slopes.variables or iterations == 0:  # no unstable neuron: CROWN is exact there
                return best
            optimizer = torch.optim.Adam(list(slopes.variables.values()), lr=learning_rate)
            schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, DECAY)
            for step in range(iterations):
                optimizer.zero_grad()
                bound.sum().backward()  # each row's bound depends on its own slopes only
                optimizer.step()
                schedule.step()
                slopes.project()
                if step + 1 < iterations:
                    bound = crown_spec_upper(root, spec, records, lower, upper)
                else:
                    with torch.no_grad():
                        bound = crown_spec_upper(root, spec, records, lower, upper)
                best = torch.minimum(best, bound.detach())
        finally:
            records.slopes = None
    return best
