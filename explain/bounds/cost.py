"""What full CROWN will cost, told before it runs.

Full CROWN bounds every unstable neuron of every layer by a backward pass to the input
(:class:`explain.bounds.crown.BackwardToInput`): two rows per neuron, each as large as the neuron's receptive
field over the layers it crosses (:mod:`explain.bounds.patches`), or as a whole layer where rows are dense. Its
cost is therefore ``sum over rows of the row's size``, which an interval pass predicts: the rows full CROWN
chooses on its boxes (:meth:`~explain.bounds.node.Node.crown_rows`) chosen on the interval boxes, which are
usually wider (where a CROWN box replaces a narrower interval box, auto_LiRPA's rule, they are not), so the count
is about, usually at least, what full CROWN runs; one probe row per layer gives the row size.
:func:`estimate_full_crown` counts them; ``seconds`` converts the coefficient count at
:data:`COEFFICIENTS_PER_SECOND`, measured on 2 CPU cores (on a GPU the estimate is high).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from explain.bounds.crown import ROW_PROGRESS, BackwardToInput
from explain.bounds.graph import BoundGraph
from explain.bounds.node import Records
from explain.bounds.patches import Patches

#: coefficients of backward rows processed per CPU-second by full CROWN (issue 21's max-pooling CNN at eps 0.01
#: and 0.05: 1.4e7-1.8e7 per CPU-second, so 3e7 per second on 2 cores)
COEFFICIENTS_PER_SECOND = 3e7
#: a bound whose estimate exceeds this many seconds shows a progress bar and logs its estimate
LONG_BOUND_SECONDS = 10.0


@dataclass
class CostEstimate:
    """``unstable`` neurons (the rows full CROWN would choose on the interval boxes, usually at least those it
    meets), ``rows``
    backward rows (two per neuron), ``coefficients`` (sum over rows of their largest size) and the implied
    ``seconds`` for all the boxes."""

    unstable: int
    rows: int
    coefficients: float

    @property
    def seconds(self) -> float:
        return self.coefficients / COEFFICIENTS_PER_SECOND

    def describe(self, boxes: int) -> str:
        return (f"full CROWN will bound about {self.unstable // max(boxes, 1):,} unstable neurons per image "
                f"({self.rows // max(boxes, 1):,} backward rows), about {self.seconds / max(boxes, 1):.0f} s per "
                "image on 2 CPU cores")


class _CostProbe(BackwardToInput):
    """Full CROWN's bookkeeping without its passes: each layer counts the rows it would need on the interval
    boxes and sends one probe row back to measure their size."""

    def __init__(self, records: Records, lower: Tensor, upper: Tensor, tight: bool = False) -> None:
        super().__init__(records, lower, upper, tight=tight)
        self.estimate = CostEstimate(0, 0, 0.0)

    def tighten(self, lower, upper, needed, on_input=None, replace=False):
        needed = self.needed(needed, on_input)
        count = 0 if needed is None else int(needed.sum())
        if count == 0:
            return lower, upper
        n, shape = lower.shape[0], lower.shape[1:]
        index = needed.reshape(n, -1).to(torch.uint8).argmax(1, keepdim=True)
        if self.patches and on_input is None and len(shape) == 3:
            spec = Patches.unit_rows(index, lower.new_ones(n, 1), tuple(shape), lower.dtype)
        else:
            spec = lower.new_zeros(n, 1, shape.numel()).scatter_(2, index.unsqueeze(-1), 1.0).view(n, 1, *shape)
            spec = on_input(spec) if on_input is not None else spec
        A, _ = self.to_input(spec, lower.new_zeros(n, 1))
        size = A.peak if isinstance(A, Patches) else max(self.largest, shape.numel())
        self.estimate.unstable += count
        self.estimate.rows += 2 * count
        self.estimate.coefficients += 2.0 * count * size
        return lower, upper


@contextmanager
def progress_bar(total_rows: int, description: str = "full CROWN") -> Iterator[None]:
    """A rich progress bar over the backward rows of full CROWN's intermediate passes run inside the block."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} rows"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total_rows)
        token = ROW_PROGRESS.set(lambda rows: bar.advance(task, rows))
        try:
            yield
        finally:
            ROW_PROGRESS.reset(token)


def estimate_full_crown(graph: BoundGraph, lower: Tensor, upper: Tensor, tight_boxes: bool = False) -> CostEstimate:
    """The cost of full CROWN's intermediate bounds over the boxes ``[lower, upper]`` (one interval pass and one
    probe row per layer; ``tight_boxes``: of full CROWN with tight boxes)."""
    records = Records()
    records.crown = probe = _CostProbe(records, lower, upper, tight_boxes)
    with torch.no_grad():
        graph.root.interval(lower, upper, records)
    return probe.estimate
