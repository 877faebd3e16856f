"""k-fold split of a training set, for the MeGe / ReCo stability metrics (Fel et al. 2022).

Model ``i`` is trained on every fold but ``i`` and evaluated on fold ``i``; comparing the explanations of models
that saw different data measures how much an explanation depends on the training sample.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_fold(num_folds: int, fold: int) -> None:
    """Raise a clear error unless ``num_folds >= 1`` and ``0 <= fold < num_folds``."""
    if not isinstance(num_folds, int) or num_folds < 1:
        raise ValueError(f"num_folds must be an integer >= 1 (1 = no folds), got {num_folds!r}")
    if not isinstance(fold, int) or not 0 <= fold < num_folds:
        raise ValueError(f"fold must be an integer in [0, num_folds={num_folds}), got {fold!r}")


def assign_folds(num_samples: int, num_folds: int, seed: int) -> Tensor:
    """The fold of each sample: int64 [num_samples] with values in ``[0, num_folds)``.

    A random permutation drawn from ``seed`` is dealt round-robin, so the folds are disjoint, cover every
    sample, and their sizes differ by at most one. ``num_folds = 1`` puts every sample in fold 0.
    """
    check_fold(num_folds, 0)
    if num_folds > max(num_samples, 1):
        raise ValueError(f"num_folds={num_folds} is larger than the training set ({num_samples} samples)")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    folds = torch.empty(num_samples, dtype=torch.int64)
    folds[order] = torch.arange(num_samples) % num_folds
    return folds
