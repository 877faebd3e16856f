"""``SplitDataModule``: the dataloaders of a datamodule whose data come as named splits.

A subclass implements ``dataset(split)`` for ``"train"``, ``"val"``, each of ``test_split_names`` and (with
folds) ``"heldout"``; every dataloader is then made by one method, :meth:`SplitDataModule._dataloader`.
"""

from __future__ import annotations

from typing import ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override


class SplitDataModule(L.LightningDataModule):
    """``train``/``val``/``test``/``heldout`` dataloaders from ``dataset(split)``.

    Subclasses set ``batch_size`` and ``num_workers`` (and ``num_folds``/``fold`` when they have folds, see
    :class:`datamodules.folds.FoldedData`). ``test_dataloader()`` returns the loader of the single test split, or a
    list of loaders in the order of ``test_split_names`` when there are several.
    """

    test_split_names: ClassVar[tuple[str, ...]] = ("test",)
    #: pin host memory when CUDA is available (off for data generated in memory)
    pin_memory: ClassVar[bool] = True
    batch_size: int
    num_workers: int
    num_folds: int = 1
    fold: int = 0

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split``.

        Raises:
            NotImplementedError: a subclass does not implement it.
        """
        raise NotImplementedError

    def _dataloader(self, split: str) -> DataLoader:
        """The one way this datamodule makes a dataloader: ``split``'s dataset, shuffled for ``"train"`` only."""
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=split == "train",
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._dataloader("train")

    @override
    def val_dataloader(self) -> DataLoader:
        return self._dataloader("val")

    @override
    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [self._dataloader(split) for split in self.test_split_names]
        return loaders[0] if len(loaders) == 1 else loaders

    def heldout_dataloader(self) -> DataLoader:
        """The training samples of fold ``fold`` (no augmentation): what model ``fold`` did not train on.

        Raises:
            ValueError: ``num_folds == 1`` (every sample is trained on).
        """
        if self.num_folds == 1:
            raise ValueError("heldout_dataloader() needs num_folds > 1: with num_folds=1 every sample is trained on")
        return self._dataloader("heldout")
