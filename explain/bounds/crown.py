"""CROWN backward linear relaxation (Zhang et al. 2018), with full-CROWN or IBP intermediate bounds.

The specification ``spec @ f(x)`` is pulled back through the network from the output to the input: affine
layers exactly, nonlinear ones through a linear relaxation that holds on their input box; the result, a linear
function of the input, is maximised in closed form over the input box. The relaxations need the boxes of the
nonlinear layers' inputs:

* **Full CROWN** (auto_LiRPA's ``method="CROWN"``): layer by layer, each nonlinear layer's input box comes from a
  backward pass from that layer to the network input, through the relaxations built on the boxes found so far
  (:class:`BackwardToInput`), their rows batched, both signs in one pass, in chunks of bounded memory. Which
  coordinates get a pass, and how their CROWN box meets the interval box, follows auto_LiRPA 0.7.1 for the
  operators compared with it, so that the bounds equal its bounds to round-off
  (``tests/explain/test_bounds_reference.py``):

  - a ReLU's input: its unstable neurons, or all of them once more than 90% are unstable (auto_LiRPA's
    ``get_sparse_C`` and ``minimum_sparsity``); max pooling's input: every entry;
  - a value computed by a ReLU from a box found so far (through reshapes) gets no pass: its box is the ReLU of
    that box (auto_LiRPA's ``ibp_intermediate`` rule: max pooling after a ReLU reads that box);
  - the CROWN box of those coordinates replaces the interval box rather than intersect it (auto_LiRPA's
    ``restore_sparse_bounds``): full CROWN can then be looser than CROWN-IBP where the CROWN box is the wider one
    (max pooling right after a convolution, at large radii).

  The operators not compared with auto_LiRPA (GroupSort2, MaxMin, hardtanh, L2-norm pooling) bound only the
  coordinates whose relaxation is not already exact on the interval box (the pair differences that may change
  sign, the neurons off the identity piece; L2-norm pooling reads all) and intersect the two boxes. Nothing gets a
  pass while the value is at most one mixing affine layer from the input (the interval box is exact there).

  ``tight=True`` (``tight_boxes`` of :func:`~explain.bounds.margin.margin_upper_bounds` and EVA) drops the last two
  rules: each CROWN box is intersected with the interval box, and a ReLU's output gets its own pass where that
  can tighten it (for max pooling: the active neurons of undecided windows). The bounds are usually tighter (by up
  to 4% of the margin on issue 21's max-pooling CNN at eps 0.05), slower where the ReLU outputs add rows, differ
  from auto_LiRPA's and are not provably never looser: CROWN's adaptive ReLU lower slope is not monotone in the
  box (one class of the EfficientNet-operator fixture at eps 0.1 is 9e-4 looser).
  In both modes the Lipschitz box (when asked) is intersected last.
* **CROWN-IBP** (Zhang et al. 2020): the interval boxes; one backward pass per specification, far looser on
  networks not trained for it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

import torch
from torch import Tensor

from explain.bounds.node import Node, Records, concretize_upper, pull_back
from explain.bounds.patches import Patches

Backward = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

#: default number of elements of the largest backward coefficient tensor of one chunk of rows (64 MiB in float32)
ROW_BUDGET = 2**24
#: when set, called with the number of backward rows each chunk of full CROWN's intermediate passes finished
#: (:func:`explain.bounds.cost.progress_bar`)
ROW_PROGRESS: ContextVar[Callable[[int], None] | None] = ContextVar("row_progress", default=None)


def crown_backward(root: Node, spec: Tensor, records: Records) -> tuple[Tensor, Tensor]:
    """``(A, bias)``, A [n, r, *input], bias [n, r]: ``spec @ f(x) <= <A, x> + bias`` for every ``x`` whose
    intermediate values lie in the recorded boxes (spec [n, r, K])."""
    bias = torch.zeros(spec.shape[:2], dtype=spec.dtype, device=spec.device)
    return root.backward(spec, bias, records)


def crown_spec_upper(root: Node, spec: Tensor, records: Records, lower: Tensor, upper: Tensor) -> Tensor:
    """Upper bounds [n, r] of ``spec @ f(x)`` (spec [n, r, K]) over the box ``[lower, upper]``."""
    return concretize_upper(*crown_backward(root, spec, records), lower, upper)


def _identity(A: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    return A, bias


class BackwardToInput:
    """Full CROWN's state along the interval pass (``records.crown``): ``to_input`` maps a linear function
    ``<A, z> + bias`` of the value ``z`` reached so far to an upper bound linear in the network input, through the
    nodes passed (each with the relaxation of the box it got). Containers save and restore it with
    :meth:`state` / :meth:`restore` around their children."""

    def __init__(self, records: Records, lower: Tensor, upper: Tensor, row_budget: int = ROW_BUDGET,
                 patches: bool = True, tight: bool = False) -> None:
        self.records, self.lower, self.upper = records, lower, upper
        self.row_budget = row_budget
        #: False: auto_LiRPA's boxes; True: also intersected with the interval boxes, ReLU outputs bounded too
        self.tight = tight
        #: the current value is a ReLU of a box found so far (auto_LiRPA's rule: no pass, unless ``tight``)
        self.after_relu = False
        #: rows of feature maps as :class:`~explain.bounds.patches.Patches` (False: dense rows, same bounds)
        self.patches = patches
        self.to_input: Backward = _identity
        #: mixing affine layers passed since the input, None after a nonlinear one (then IBP is not exact)
        self.mixing: int | None = 0
        self.largest = lower[0].numel()  # the largest value per box along any path so far
        #: coordinates of the current value that no row can tighten (:meth:`Node.settled`), or None
        self.settled: Tensor | None = None

    def state(self) -> tuple[Backward, int | None]:
        return self.to_input, self.mixing

    def restore(self, state: tuple[Backward, int | None]) -> None:
        self.to_input, self.mixing = state
        self.settled = None
        self.after_relu = False

    def follow(self, node: Node, out: Tensor) -> None:
        """Extend ``to_input`` by ``node``'s backward step (``out``: a bound of its output, for its size)."""
        previous, records = self.to_input, self.records
        self.to_input = lambda A, bias: previous(*pull_back(node, A, bias, records))
        exact = self.mixing is not None and self.mixing <= 1
        self.settled = None if node.container else node.settled(records, exact)
        # a ReLU's output box is the ReLU of its input box; reshapes and identities keep it
        self.after_relu = node.interval_output or (self.after_relu and node.rearranges)
        self.largest = max(self.largest, out[0].numel())
        if node.container or not node.affine:
            self.mixing = None
        elif not node.coordinatewise and self.mixing is not None:
            self.mixing += 1

    def follow_with(self, backward: Backward, mixing: int | None) -> None:
        """Continue from a value whose backward step to the current point is ``backward`` (a residual sum)."""
        previous = self.to_input
        self.to_input = lambda A, bias: previous(*backward(A, bias))
        self.mixing, self.settled, self.after_relu = mixing, None, False

    def needed(self, needed: Tensor, on_input: Callable | None) -> Tensor | None:
        """The coordinates that get a backward pass among ``needed``, or None when none does: none while the
        value is at most one mixing affine layer (and coordinatewise ones) from the input (the interval box is
        then exact), nor after a ReLU unless ``tight``; those no row can tighten (:meth:`Node.settled`) are
        dropped."""
        if (self.mixing is not None and self.mixing <= 1) or (self.after_relu and not self.tight):
            return None
        if self.settled is not None and on_input is None and self.settled.shape == needed.shape:
            needed = needed & ~self.settled
        return needed

    def tighten(
        self, lower: Tensor, upper: Tensor, needed: Tensor, on_input: Callable[[Tensor], Tensor] | None = None,
        replace: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """The box ``[lower, upper]`` of the current value (or of a linear function of it: ``on_input`` maps a
        row on it to a row on the current value) with CROWN bounds of the ``needed`` coordinates.

        Only the coordinates :meth:`needed` keeps get a pass; each takes its CROWN box intersected with
        ``[lower, upper]``, or with ``replace`` (auto_LiRPA's rule, unless ``tight``) the CROWN box alone.
        """
        needed = self.needed(needed, on_input)
        if needed is None:
            return lower, upper
        n, shape = lower.shape[0], lower.shape[1:]
        flat_needed = needed.reshape(n, -1)
        counts = flat_needed.sum(1)
        rows = int(counts.max()) if n else 0
        if rows == 0:
            return lower, upper
        patches = self.patches and on_input is None and len(shape) == 3  # rows of a feature map
        # per box, the needed coordinates first (padding rows: coordinates that are not needed, results unused);
        # as patches, cell by cell (the channels of a cell together: Patches reads the maps once per cell)
        if patches:
            channels, cells = shape[0], shape[1] * shape[2]
            by_cell = flat_needed.view(n, channels, cells).transpose(1, 2).reshape(n, -1)
            order = by_cell.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :rows]
            order = (order % channels) * cells + order // channels
        else:
            order = flat_needed.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :rows]
        valid = torch.arange(rows, device=lower.device) < counts.unsqueeze(1)
        new_lower, new_upper = lower.reshape(n, -1).clone(), upper.reshape(n, -1).clone()
        per_row = max(self.largest, flat_needed.shape[1])
        start = 0
        while start < rows:
            chunk = max(1, self.row_budget // (2 * n * per_row))
            if patches and start == 0:
                chunk = min(chunk, max(8, shape[0]))  # a first small chunk (a cell) measures the largest patch
            elif patches and chunk > shape[0]:
                chunk -= chunk % shape[0]  # whole cells
            index, keep = order[:, start : start + chunk], valid[:, start : start + chunk]
            k = index.shape[1]
            signs = torch.cat([torch.ones(n, k), -torch.ones(n, k)], dim=1).to(lower)
            if patches:
                spec = Patches.unit_rows(index.repeat(1, 2), signs, tuple(shape), lower.dtype)
            else:
                spec = lower.new_zeros(n, 2 * k, flat_needed.shape[1])
                spec.scatter_(2, index.repeat(1, 2).unsqueeze(-1), signs.unsqueeze(-1))  # +e_j: upper, -e_j: lower
                spec = spec.view(n, 2 * k, *shape)
                if on_input is not None:
                    spec = on_input(spec)
            A, bias = self.to_input(spec, lower.new_zeros(n, 2 * k))
            if patches and start == 0:
                per_row = A.peak if isinstance(A, Patches) else per_row
            bound = concretize_upper(A, bias, self.lower, self.upper)
            up, low = bound[:, :k], -bound[:, k:]
            old_low, old_up = new_lower.gather(1, index), new_upper.gather(1, index)
            if self.tight or not replace:
                low, up = torch.maximum(old_low, low), torch.minimum(old_up, up)
            new_lower.scatter_(1, index, torch.where(keep, low, old_low))
            new_upper.scatter_(1, index, torch.where(keep, up, old_up))
            start += k
            report = ROW_PROGRESS.get()
            if report is not None:
                report(int(keep.sum()) * 2)
        new_upper = torch.maximum(new_upper, new_lower)  # against float rounding crossing the two enclosures
        return new_lower.view_as(lower), new_upper.view_as(upper)
