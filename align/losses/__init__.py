"""Losses: the harmonization loss (Fel et al. 2022), RRR (Ross et al. 2017) and the task losses (CE and
deel-torchlip's)."""

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
from align.losses.rrr import RRRLoss, log_probability_gradient, rrr_mask, rrr_penalty
from align.losses.task import TASK_LOSSES, TaskLoss, task_loss

__all__ = [
    "HarmonizationLoss",
    "RRRLoss",
    "TASK_LOSSES",
    "TaskLoss",
    "binomial_pyramid",
    "check_reduce",
    "harmonization_loss",
    "input_gradient",
    "input_saliency",
    "same_padding",
    "log_probability_gradient",
    "rrr_mask",
    "rrr_penalty",
    "standardize_cut",
    "task_loss",
]
