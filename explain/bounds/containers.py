"""Composition: a chain of nodes (``nn.Sequential``) and a residual sum of two chains."""

from __future__ import annotations

import torch
from torch import Tensor

from explain.bounds.activations import PairSort
from explain.bounds.node import Gain, Node, pull_back
from explain.bounds.patches import Patches, add_rows


class Chain(Node):
    """Nodes applied one after the other.

    The interval pass intersects the box reaching each nonlinear node with its Lipschitz box
    (``records.limits``) and, in full CROWN (``records.crown``), replaces it by the node's :meth:`~Node.tighten`
    box, intersected with the Lipschitz box again; a
    GroupSort2 also gets the box of its pair differences through the differenced weights of the affine node
    before it (``interval_with_pairs``).
    """

    container = True

    def __init__(self, nodes: list[Node], path: str) -> None:
        super().__init__(path)
        self.nodes = nodes

    def interval(self, lower, upper, records):
        difference = None
        crown = records.crown
        for index, node in enumerate(self.nodes):
            following = self.nodes[index + 1] if index + 1 < len(self.nodes) else None
            if not node.affine and not node.container:
                if records.inputs is not None:
                    records.inputs[id(node)] = lower
                limit = records.limits.get(id(node))
                if limit is not None:
                    lower, upper = _intersect((lower, upper), limit[:2])
                    if limit[2] is not None:
                        difference = limit[2] if difference is None else _intersect(difference, limit[2])
                if crown is not None:
                    lower, upper, difference = node.tighten(lower, upper, difference, records)
                    if limit is not None:  # a CROWN box replaces the interval box: the Lipschitz box cuts it too
                        lower, upper = _intersect((lower, upper), limit[:2])
                        if limit[2] is not None and difference is not None:
                            difference = _intersect(difference, limit[2])
            if isinstance(node, PairSort):
                lower, upper = node.interval(lower, upper, records, difference=difference)
                difference = None
            elif isinstance(following, PairSort) and hasattr(node, "interval_with_pairs"):
                lower, upper, difference = node.interval_with_pairs(lower, upper, records)
            else:
                lower, upper = node.interval(lower, upper, records)
            if crown is not None and not node.container:
                crown.follow(node, lower)
        return lower, upper

    def backward(self, A, bias, records):
        for node in reversed(self.nodes):
            A, bias = pull_back(node, A, bias, records)
        return A, bias

    backward_patches = backward

    def gain(self, gain, x, constants):
        for child in self.nodes:
            gain, x = child.gain(gain, x, constants)
        return gain, x


def _intersect(box: tuple[Tensor, Tensor], other: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Intersection of two enclosures of the same values (the upper end kept >= the lower one, against
    float rounding)."""
    lower = torch.maximum(box[0], other[0])
    return lower, torch.maximum(torch.minimum(box[1], other[1]), lower)


def _scaled(A: Patches | Tensor, weight: float) -> Patches | Tensor:
    if weight == 1:
        return A
    return A.with_coef(A.coef * weight) if isinstance(A, Patches) else A * weight


class Residual(Node):
    """``post(w_s * shortcut(x) + w_b * branch(x))`` with ``w_s, w_b >= 0``.

    deel-torchlip ``LipResidual``: ``w_s = sigmoid(alpha)``, ``w_b = 1 - w_s``, empty shortcut and post;
    torchvision ``BasicBlock``/``Bottleneck``: ``w_s = w_b = 1``, shortcut = ``downsample``, post = ReLU.
    IBP adds the two boxes; CROWN sends ``w_s A`` and ``w_b A`` down both paths and adds what comes back.

    Raises:
        ValueError: a negative residual weight (the relaxation of the sum needs ``w_s, w_b >= 0``).
    """

    container = True

    def __init__(
        self, shortcut: Chain, branch: Chain, shortcut_weight: float, branch_weight: float, post: Chain, path: str
    ) -> None:
        super().__init__(path)
        if shortcut_weight < 0 or branch_weight < 0:
            raise ValueError(f"residual weights must be nonnegative at '{path}'")
        self.shortcut, self.branch, self.post = shortcut, branch, post
        self.shortcut_weight, self.branch_weight = shortcut_weight, branch_weight

    def interval(self, lower, upper, records):
        crown = records.crown
        start = crown.state() if crown is not None else None
        short_lower, short_upper = self.shortcut.interval(lower, upper, records)
        if crown is not None:
            crown.restore(start)
        branch_lower, branch_upper = self.branch.interval(lower, upper, records)
        lower = self.shortcut_weight * short_lower + self.branch_weight * branch_lower
        upper = self.shortcut_weight * short_upper + self.branch_weight * branch_upper
        if crown is not None:
            crown.restore(start)
            crown.follow_with(lambda A, bias: self._merge_backward(A, bias, records), None)
        lower, upper = self.post.interval(lower, upper, records)
        if crown is not None:  # the outer chain continues from the residual's input through the whole block
            crown.restore(start)
            crown.follow(self, lower)
        return lower, upper

    def _merge_backward(self, A: Tensor, bias: Tensor, records) -> tuple[Tensor, Tensor]:
        zero = torch.zeros_like(bias)
        A_short, bias_short = self.shortcut.backward(_scaled(A, self.shortcut_weight), zero, records)
        A_branch, bias_branch = self.branch.backward(_scaled(A, self.branch_weight), zero, records)
        return add_rows(A_short, A_branch), bias + bias_short + bias_branch

    def backward(self, A, bias, records):
        return self._merge_backward(*self.post.backward(A, bias, records), records)

    backward_patches = backward

    def gain(self, gain, x, constants):
        short, x_short = self.shortcut.gain(gain, x, constants)
        branch, x_branch = self.branch.gain(gain, x, constants)
        merged = Gain(
            self.shortcut_weight * short.whole + self.branch_weight * branch.whole,
            self.shortcut_weight * short.coord + self.branch_weight * branch.coord,
        )
        return self.post.gain(merged, self.shortcut_weight * x_short + self.branch_weight * x_branch, constants)
