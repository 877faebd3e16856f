"""LightningDataModules that yield the batch dict of the data contract (DESIGN section 2).

``image`` float [B, 3, H, W] in [0, 1], ``label`` int64 [B], ``heatmap`` float [B, H, W] in [0, 1] (zeros where
there is no human map), ``has_heatmap`` bool [B]. Image and map always get the same crop and flip.
"""

from datamodules.augmentation import PairedTransform, eval_transform, train_transform
from datamodules.clickme_folder import ClickMeFolderDataModule
from datamodules.clickme_heatmap import clickme_heatmap
from datamodules.clickme_tfrecord import ClickMeTFRecordDataModule, ClickMeTFRecordDataset
from datamodules.mix_sampler import MixedBatchSampler
from datamodules.shortcut import ShortcutShapesDataModule
from datamodules.threaded_loader import BufferPool, ThreadedDataLoader

__all__ = [
    "BufferPool",
    "ClickMeFolderDataModule",
    "ClickMeTFRecordDataModule",
    "ClickMeTFRecordDataset",
    "MixedBatchSampler",
    "PairedTransform",
    "ShortcutShapesDataModule",
    "ThreadedDataLoader",
    "clickme_heatmap",
    "eval_transform",
    "train_transform",
]
