"""``DictionaryQuality``: reconstruction and sparsity of a dictionary over a stream of batches, as a torchmetrics
Metric (the formulas are the functions of :mod:`explain.metrics.functional.dictionary`)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from explain.metrics.functional.dictionary import _EPSILON, hoyer
from explain.validation import positive_int


class DictionaryQuality(Metric):
    """R² (per dimension and global), dead codes, L0, active codes and mean Hoyer sparsity over every row seen.

    ``update(x [n, c], codes [n, r], x_hat [n, c])`` with ``x_hat = dictionary.decode(codes)``; ``compute()`` ->
    ``{"r2_per_dimension", "r2_global", "dead_codes", "l0", "active_codes", "hoyer"}``, equal to the functions of
    :mod:`explain.metrics.functional.dictionary` on all the rows at once. Sums (float64) are synced across
    processes.

    Raises:
        ValueError: ``n_channels`` or ``n_concepts`` not positive ints; at ``update``, shapes that do not match them.

    >>> import torch
    >>> metric = DictionaryQuality(n_channels=3, n_concepts=2)
    >>> x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]])
    >>> metric.update(x, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), x)
    >>> {k: round(float(v), 3) for k, v in metric.compute().items()}["r2_per_dimension"]
    1.0
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, n_channels: int, n_concepts: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_channels = positive_int("n_channels", n_channels)
        self.n_concepts = positive_int("n_concepts", n_concepts)
        double = torch.float64
        self.add_state("rows", torch.tensor(0.0, dtype=double), dist_reduce_fx="sum")
        self.add_state("residual", torch.tensor(0.0, dtype=double), dist_reduce_fx="sum")
        self.add_state("x_sum", torch.zeros(n_channels, dtype=double), dist_reduce_fx="sum")
        self.add_state("x_square_sum", torch.zeros(n_channels, dtype=double), dist_reduce_fx="sum")
        self.add_state("code_sum", torch.zeros(n_concepts, dtype=double), dist_reduce_fx="sum")
        self.add_state("nonzero", torch.tensor(0.0, dtype=double), dist_reduce_fx="sum")
        self.add_state("hoyer_sum", torch.tensor(0.0, dtype=double), dist_reduce_fx="sum")

    def update(self, x: Tensor, codes: Tensor, x_hat: Tensor) -> None:
        """Add one batch (class docstring)."""
        if x.ndim != 2 or x.shape != x_hat.shape or x.shape[1] != self.n_channels:
            raise ValueError(
                f"x and x_hat must be [n, {self.n_channels}], got {tuple(x.shape)} and {tuple(x_hat.shape)}"
            )
        if codes.shape != (x.shape[0], self.n_concepts):
            raise ValueError(f"codes must be [{x.shape[0]}, {self.n_concepts}], got {tuple(codes.shape)}")
        x64, codes64 = x.double(), codes.double()
        self.rows += x.shape[0]
        self.residual += (x64 - x_hat.double()).square().sum()
        self.x_sum += x64.sum(dim=0)
        self.x_square_sum += x64.square().sum(dim=0)
        self.code_sum += codes64.sum(dim=0)
        self.nonzero += (codes != 0).sum()
        self.hoyer_sum += hoyer(codes).double().sum()

    def compute(self) -> dict[str, Tensor]:
        """The quality measures of every row seen (class docstring)."""
        rows = self.rows.clamp_min(1)
        per_channel_total = self.x_square_sum - self.x_sum.square() / rows
        entries = rows * self.n_channels
        global_variance = self.x_square_sum.sum() / entries - (self.x_sum.sum() / entries).square()
        return {
            "r2_per_dimension": (1 - self.residual / per_channel_total.sum().clamp_min(1e-30)).float(),
            "r2_global": (1 - (self.residual / entries) / (global_variance + _EPSILON)).float(),
            "dead_codes": (self.code_sum == 0).float().mean(),
            "l0": (self.nonzero / (rows * self.n_concepts)).float(),
            "active_codes": (self.nonzero / rows).float(),
            "hoyer": (self.hoyer_sum / rows).float(),
        }
