"""k-fold assignment for MeGe / ReCo."""

import pytest
import torch

from datamodules.folds import assign_folds, check_fold


@pytest.mark.parametrize("n, k", [(10, 3), (7, 7), (100, 5), (5, 1)])
def test_folds_partition_with_balanced_sizes(n, k):
    folds = assign_folds(n, k, seed=3)
    assert folds.dtype == torch.int64 and folds.shape == (n,)
    counts = torch.bincount(folds, minlength=k)
    assert counts.sum() == n and len(counts) == k
    assert counts.max() - counts.min() <= 1


def test_folds_are_deterministic_and_depend_on_seed():
    torch.testing.assert_close(assign_folds(50, 4, seed=1), assign_folds(50, 4, seed=1))
    assert not torch.equal(assign_folds(50, 4, seed=1), assign_folds(50, 4, seed=2))


def test_bad_fold_arguments():
    with pytest.raises(ValueError, match="num_folds"):
        check_fold(0, 0)
    with pytest.raises(ValueError, match="fold must be"):
        check_fold(3, 3)
    with pytest.raises(ValueError, match="larger than the training set"):
        assign_folds(2, 3, seed=0)
