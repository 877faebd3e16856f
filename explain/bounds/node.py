"""The contract every operation of a bounded network follows (one class per operation kind).

A network is turned into a tree of :class:`Node` (see :mod:`explain.bounds.graph`). Two passes go through it:

* ``interval(lower, upper, records)``: interval bound propagation (IBP, Gowal et al. 2018). Maps the box of
  the node's input to a box of its output, and stores in ``records[id(node)]`` what the backward pass needs
  (the input box, or for pairwise sorts the box of the pair differences). The box reaching a nonlinear node
  is first intersected with ``records.limits[id(node)]`` when there is one (a second sound enclosure of the
  same values, from :mod:`explain.bounds.lipschitz`).
* ``backward(A, bias, records)``: one step of CROWN's backward linear relaxation (Zhang et al. 2018). The
  quantity to bound from above is ``<A, z_out> + bias`` with ``A`` [n, r, *out_shape] (n boxes, r linear
  functions each) and ``bias`` [n, r]; the node returns ``(A', bias')`` with
  ``<A, z_out> + bias <= <A', z_in> + bias'`` for every ``z_in`` in the recorded input box.

Every step is sound: a box or linear bound that holds for all inputs of the box (up to float rounding).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor


class Records(dict):
    """``id(node) -> tensors`` that the interval pass leaves for the backward pass, and two optional maps
    read by :class:`~explain.bounds.containers.Chain`: ``limits`` (``id(node) -> (lower, upper, difference)``,
    boxes that the input box of a nonlinear node is intersected with; ``difference`` bounds the pair
    differences of a GroupSort2, or is None) and ``inputs`` (when not None, filled with the input of every
    nonlinear node: used on zero-width boxes to get the values at a point)."""

    def __init__(self, limits: dict[int, tuple] | None = None, inputs: dict[int, Tensor] | None = None) -> None:
        super().__init__()
        self.limits = {} if limits is None else limits
        self.inputs = inputs


class Node(ABC):
    """One operation; ``path`` is the module path it came from (for error messages)."""

    #: True when the operation is affine: the IBP margin bound folds trailing affine nodes into the spec.
    affine: bool = False

    def __init__(self, path: str) -> None:
        self.path = path

    @abstractmethod
    def interval(self, lower: Tensor, upper: Tensor, records: Records) -> tuple[Tensor, Tensor]:
        """Elementwise bounds of the output from bounds of the input (IBP)."""

    @abstractmethod
    def backward(self, A: Tensor, bias: Tensor, records: Records) -> tuple[Tensor, Tensor]:
        """The linear bound ``A @ out + bias`` rewritten on the input (CROWN's backward step)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


def concretize_upper(A: Tensor, bias: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """``max_{lower <= z <= upper} <A, z> + bias = <A, centre> + <|A|, radius> + bias``, shape [n, r]."""
    centre = ((lower + upper) / 2).flatten(1).unsqueeze(-1)
    radius = ((upper - lower) / 2).flatten(1).unsqueeze(-1)
    A = A.flatten(2)
    return (A @ centre).squeeze(-1) + (A.abs() @ radius).squeeze(-1) + bias
