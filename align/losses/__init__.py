"""Losses: the harmonization loss (Fel et al. 2022) and the task losses (CE and deel-torchlip's)."""

from align.losses.harmonization import (
    HarmonizationLoss,
    binomial_pyramid,
    check_reduce,
    harmonization_loss,
    input_gradient,
    input_saliency,
    same_padding,
    standardize_cut,
)
from align.losses.task import TASK_LOSSES, TaskLoss, task_loss

__all__ = [
    "HarmonizationLoss",
    "TASK_LOSSES",
    "TaskLoss",
    "binomial_pyramid",
    "check_reduce",
    "harmonization_loss",
    "input_gradient",
    "input_saliency",
    "same_padding",
    "standardize_cut",
    "task_loss",
]
