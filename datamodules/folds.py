"""k-fold split of a training set, for the MeGe / ReCo stability metrics (Fel et al. 2022).

Model ``i`` is trained on every fold but ``i`` and evaluated on fold ``i``; comparing the explanations of models
that saw different data measures how much an explanation depends on the training sample.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import DataLoader


@runtime_checkable
class FoldedData(Protocol):
    """What ``scripts/stability.py`` needs of a datamodule to train k fold models and evaluate MeGe / ReCo.

    ``num_folds`` and ``fold`` are constructor arguments (the script sets ``--data.init_args.num_folds`` and
    ``--data.init_args.fold``) and attributes; model ``fold`` trains on every fold but ``fold``, and
    ``heldout_dataloader()`` serves fold ``fold``, unaugmented. :class:`~datamodules.splits.SplitDataModule`
    provides all three (``num_folds = 1``, ``fold = 0`` as class defaults).
    """

    num_folds: int
    fold: int

    def heldout_dataloader(self) -> DataLoader: ...


#: the members of :class:`FoldedData`
FOLD_MEMBERS: tuple[str, ...] = ("num_folds", "fold", "heldout_dataloader")


def missing_fold_members(cls: type) -> list[str]:
    """The members of :class:`FoldedData` that the datamodule class ``cls`` lacks (empty: it has folds).

    >>> from datamodules import ClickMeFolderDataModule, ClickMeTFRecordDataModule
    >>> missing_fold_members(ClickMeFolderDataModule)
    []
    >>> missing_fold_members(ClickMeTFRecordDataModule)
    ['num_folds', 'fold', 'heldout_dataloader']
    """
    return [name for name in FOLD_MEMBERS if not hasattr(cls, name)]


def check_fold(num_folds: int, fold: int) -> None:
    """Raise a clear error unless ``num_folds >= 1`` and ``0 <= fold < num_folds``.

    Raises:
        ValueError: ``num_folds`` not an int >= 1, or ``fold`` not an int in ``[0, num_folds)``.
    """
    if not isinstance(num_folds, int) or num_folds < 1:
        raise ValueError(f"num_folds must be an integer >= 1 (1 = no folds), got {num_folds!r}")
    if not isinstance(fold, int) or not 0 <= fold < num_folds:
        raise ValueError(f"fold must be an integer in [0, num_folds={num_folds}), got {fold!r}")


def assign_folds(num_samples: int, num_folds: int, seed: int) -> Tensor:
    """The fold of each sample: int64 [num_samples] with values in ``[0, num_folds)``.

    A random permutation drawn from ``seed`` is dealt round-robin, so the folds are disjoint, cover every
    sample, and their sizes differ by at most one. ``num_folds = 1`` puts every sample in fold 0.

    Raises:
        ValueError: more folds than samples.
    """
    check_fold(num_folds, 0)
    if num_folds > max(num_samples, 1):
        raise ValueError(f"num_folds={num_folds} is larger than the training set ({num_samples} samples)")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    folds = torch.empty(num_samples, dtype=torch.int64)
    folds[order] = torch.arange(num_samples) % num_folds
    return folds
