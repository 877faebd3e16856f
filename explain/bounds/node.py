"""The contract every operation of a bounded network follows: one class per operation kind, owning all its rules
(as auto_LiRPA's ``operators/``).

A network is turned into a tree of :class:`Node` (see :mod:`explain.bounds.graph`). The rules of a node:

* ``interval(lower, upper, records)``: interval bound propagation (IBP, Gowal et al. 2018). Maps the box of
  the node's input to a box of its output, and stores in ``records[id(node)]`` what the backward pass needs
  (the input box, or for pairwise sorts the box of the pair differences). The box reaching a nonlinear node
  is first intersected with ``records.limits[id(node)]`` when there is one (a second sound enclosure of the
  same values, from :mod:`explain.bounds.lipschitz`), and, in full CROWN, with the box of a backward pass to the
  input (``records.crown``, :class:`explain.bounds.crown.BackwardToInput`).
* ``backward(A, bias, records)``: one step of CROWN's backward linear relaxation (Zhang et al. 2018). The
  quantity to bound from above is ``<A, z_out> + bias`` with ``A`` [n, r, *out_shape] (n boxes, r linear
  functions each) and ``bias`` [n, r]; the node returns ``(A', bias')`` with
  ``<A, z_out> + bias <= <A', z_in> + bias'`` for every ``z_in`` in the recorded input box.
* ``backward_patches(A, bias, records)``: the same step for rows stored as :class:`~explain.bounds.patches.Patches`
  (convolutional layers and the coordinatewise operations keep them; the default makes them dense).
* ``tighten(lower, upper, difference, records)`` (nonlinear nodes): the input box tightened by full CROWN, for
  the coordinates whose relaxation is not already exact on the box.
* ``gain(gain, x, constants)``: the Lipschitz constants of the node's output from those of its input
  (:mod:`explain.bounds.lipschitz`).

Every step is sound: a box or linear bound that holds for all inputs of the box (up to float rounding).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from explain.bounds.patches import Patches


class Records(dict):
    """``id(node) -> tensors`` that the interval pass leaves for the backward pass, three optional fields
    read by :class:`~explain.bounds.containers.Chain`: ``limits`` (``id(node) -> (lower, upper, difference)``,
    boxes that the input box of a nonlinear node is intersected with; ``difference`` bounds the pair
    differences of a GroupSort2, or is None), ``inputs`` (when not None, filled with the input of every
    nonlinear node: used on zero-width boxes to get the values at a point) and ``crown`` (when not None, the
    full-CROWN state that tightens every nonlinear node's input box by a backward pass to the input), and
    ``slopes``, read by the ReLU relaxations of the backward pass (when not None, alpha-CROWN's optimised lower
    slopes, :class:`~explain.bounds.alpha.LowerSlopes`)."""

    def __init__(self, limits: dict[int, tuple] | None = None, inputs: dict[int, Tensor] | None = None,
                 crown: Any = None) -> None:
        super().__init__()
        self.limits = {} if limits is None else limits
        self.inputs = inputs
        self.crown = crown
        self.slopes: Any = None
        self._derived: dict[int, tuple] = {}

    def derived(self, node: Node, make: Any) -> Any:
        """``make(*records[id(node)])`` (say a relaxation of the node's recorded box), computed once per box
        and function."""
        box = self[id(node)]
        key = (id(node), getattr(make, "__qualname__", id(make)))
        hit = self._derived.get(key)
        if hit is None or hit[0] is not box:
            hit = (box, make(*box))
            self._derived[key] = hit
        return hit[1]


@dataclass
class Gain:
    """Lipschitz constants (L2, from the network input) of a node's output: ``whole`` for the output vector,
    ``coord`` for each coordinate (a tensor broadcastable to the output, e.g. [1, C, 1, 1], or 0-dim), and
    ``pair`` for each difference of channels ``(2j, 2j+1)`` (read by a following GroupSort2; None if unknown)."""

    whole: float
    coord: Tensor
    pair: Tensor | None = None

    def capped(self) -> Gain:
        """The same gain with each coordinate's constant at most the whole vector's."""
        # a deep network's constant may exceed the coordinates' dtype (then it caps nothing)
        cap = min(self.whole, torch.finfo(self.coord.dtype).max) if self.coord.is_floating_point() else self.whole
        return Gain(self.whole, self.coord.clamp(max=cap), self.pair)


class Node(ABC):
    """One operation; ``path`` is the module path it came from (for error messages)."""

    #: True when the operation is affine: the IBP margin bound folds trailing affine nodes into the spec.
    affine: bool = False
    #: True when each output coordinate is one input coordinate times a constant (IBP is then exact)
    coordinatewise: bool = False
    #: True when each output coordinate is one input coordinate (reshapes, identity): its output box is its input box
    rearranges: bool = False
    #: True when full CROWN takes the output box as the interval map of the input box, with no backward pass of its
    #: own (auto_LiRPA's ``ibp_intermediate``: ReLU), unless asked for tight boxes (:mod:`explain.bounds.crown`)
    interval_output: bool = False
    #: True when full CROWN's box of the input replaces the interval box rather than intersect it (auto_LiRPA's
    #: rule, kept for the operators compared with it: ReLU, max pooling), unless asked for tight boxes
    crown_box_replaces: bool = False
    #: True for nodes made of other nodes (they run the full-CROWN bookkeeping of their children themselves)
    container: bool = False

    def __init__(self, path: str) -> None:
        self.path = path

    @abstractmethod
    def interval(self, lower: Tensor, upper: Tensor, records: Records) -> tuple[Tensor, Tensor]:
        """Elementwise bounds of the output from bounds of the input (IBP)."""

    @abstractmethod
    def backward(self, A: Tensor, bias: Tensor, records: Records) -> tuple[Tensor, Tensor]:
        """The linear bound ``A @ out + bias`` rewritten on the input (CROWN's backward step)."""

    def backward_patches(self, A: Patches, bias: Tensor, records: Records) -> tuple[Patches | Tensor, Tensor]:
        """CROWN's backward step for rows stored as patches; by default on their dense form."""
        return self.backward(A.to_dense(), bias, records)

    def tighten(self, lower: Tensor, upper: Tensor, difference: tuple[Tensor, Tensor] | None,
                records: Records) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """Full CROWN: the input box with CROWN bounds of the coordinates :meth:`crown_rows` marks (of those
        :meth:`unstable` marks when the input is a ReLU's output, bounded only with tight boxes)."""
        crown = records.crown
        rows = self.unstable(lower, upper) if crown.after_relu else self.crown_rows(lower, upper)
        lower, upper = crown.tighten(lower, upper, rows, replace=self.crown_box_replaces)
        return lower, upper, difference

    def settled(self, records: Records, exact_input: bool) -> Tensor | None:
        """Output coordinates whose recorded box no CROWN row can tighten (``exact_input``: the input box is
        exact), or None. Full CROWN skips them when the next nonlinear node asks for its input box."""
        return None

    def unstable(self, lower: Tensor, upper: Tensor) -> Tensor:
        """Input coordinates whose relaxation a tighter box would improve (all of them by default)."""
        return torch.ones_like(lower, dtype=torch.bool)

    def crown_rows(self, lower: Tensor, upper: Tensor) -> Tensor:
        """Input coordinates that full CROWN bounds by a backward pass (default: :meth:`unstable`); the
        operators auto_LiRPA also bounds follow its choice, so that the bounds are equal."""
        return self.unstable(lower, upper)

    def gain(self, gain: Gain, x: Tensor, constants: dict[int, Gain]) -> tuple[Gain, Tensor]:
        """The Lipschitz gain of the output from that of the input, and the output on the sample input ``x``
        [1, ...]. Nonlinear nodes record their input gain in ``constants``. Default: unknown (infinite)."""
        return Gain(math.inf, torch.tensor(math.inf, dtype=x.dtype)), self.interval(x, x, Records())[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


def pull_back(node: Node, A: Patches | Tensor, bias: Tensor, records: Records) -> tuple[Patches | Tensor, Tensor]:
    """``node``'s backward step on dense rows or on patches."""
    if isinstance(A, Patches):
        return node.backward_patches(A, bias, records)
    return node.backward(A, bias, records)


def concretize_upper(A: Patches | Tensor, bias: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """``max_{lower <= z <= upper} <A, z> + bias = <A, centre> + <|A|, radius> + bias``, shape [n, r]."""
    if isinstance(A, Patches):
        return A.concretize_upper(bias, lower, upper)
    centre = ((lower + upper) / 2).flatten(1).unsqueeze(-1)
    radius = ((upper - lower) / 2).flatten(1).unsqueeze(-1)
    A = A.flatten(2)
    return (A @ centre).squeeze(-1) + (A.abs() @ radius).squeeze(-1) + bias
