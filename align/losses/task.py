"""Task losses, one call for all of them: ``TaskLoss(name, **options)(logits [B,K], labels int64 [B])``.

* ``ce``: cross-entropy with label smoothing 0.1 (the reference harmonization recipe);
* ``hkr``: ``deel.torchlip.HKRMulticlassLoss`` (hinge + Kantorovich-Rubinstein, Serrurier et al. 2021);
* ``softhkr``: ``deel.torchlip.SoftHKRMulticlassLoss`` (Serrurier, Mamalet, Fel et al. 2024);
* ``tau_ce``: ``deel.torchlip.TauCrossEntropyLoss``, ``CE(tau * logits) / tau``.

The torchlip multiclass losses want one-hot targets; the conversion is done here, so every loss takes class
indices like ``nn.CrossEntropyLoss``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from deel import torchlip
from torch import Tensor, nn

#: name -> (constructor, default options, needs one-hot targets)
TASK_LOSSES: dict[str, tuple[Any, dict[str, Any], bool]] = {
    "ce": (nn.CrossEntropyLoss, {"label_smoothing": 0.1}, False),
    # alpha=100/101, min_margin=0.25: the multiclass HKR setting of torchlip's fashion-MNIST example
    "hkr": (torchlip.HKRMulticlassLoss, {"alpha": 0.99, "min_margin": 0.25}, True),
    "softhkr": (torchlip.SoftHKRMulticlassLoss, {"alpha": 0.9, "min_margin": 1.0, "temperature": 1.0}, True),
    "tau_ce": (torchlip.TauCrossEntropyLoss, {"tau": 10.0}, False),
}


class TaskLoss(nn.Module):
    """A classification loss chosen by name (see :data:`TASK_LOSSES`); ``forward(logits, labels) -> scalar``.

    ``options`` override the defaults of the chosen loss (e.g. ``TaskLoss("hkr", alpha=0.98, min_margin=0.5)``).

    Raises:
        ValueError: an unknown task loss ``name``; at the call, logits not [B, K].
        TypeError: options that the task loss does not take.
    """

    def __init__(self, name: str = "ce", **options: Any) -> None:
        super().__init__()
        if name not in TASK_LOSSES:
            raise ValueError(f"unknown task loss {name!r}: choose one of {sorted(TASK_LOSSES)}")
        factory, defaults, one_hot = TASK_LOSSES[name]
        self.name = name
        self.options = {**defaults, **options}
        self.one_hot = one_hot
        try:
            self.loss = factory(**self.options)
        except TypeError as error:
            raise TypeError(f"bad options {options} for task loss {name!r}: {error}") from None

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.ndim != 2:
            raise ValueError(f"logits must be [B, K], got shape {tuple(logits.shape)}")
        labels = labels.reshape(-1).long()
        target = F.one_hot(labels, logits.shape[1]).to(logits.dtype) if self.one_hot else labels
        if self.training or not hasattr(self.loss, "current_mean"):
            return self.loss(logits, target)
        # SoftHKR keeps a running mean of |logits| that its forward updates: evaluation must not move it
        running = self.loss.current_mean
        try:
            return self.loss(logits, target)
        finally:
            self.loss.current_mean = running

    def extra_repr(self) -> str:
        return f"{self.name!r}, {self.options}"


def task_loss(name: str, logits: Tensor, labels: Tensor, **options: Any) -> Tensor:
    """Functional form: ``task_loss("hkr", logits, labels, alpha=0.98)``."""
    return TaskLoss(name, **options)(logits, labels)
