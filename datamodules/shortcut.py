"""``ShortcutShapesDataModule``: synthetic shapes with a class-coded watermark, to test "right for the right reasons".

A plain model trained on this data learns the watermark (the easy cue) more than the shape: it is accurate on
the ``iid`` test split and much less on the ``flipped`` split, where the watermark always names a wrong class.
A model that looks where humans look (the human map covers the object, never the watermark) keeps its accuracy
on ``flipped`` and puts little attribution mass on the watermark, which every batch marks as its
``spurious_mask`` (the data contract's optional key: pixels a model right for the right reasons should ignore).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

from datamodules.augmentation import make_sample, pad_crop_flip
from datamodules.folds import assign_folds, check_fold
from datamodules.shapes import SHAPE_NAMES, render_scenes, stamp_watermark, watermark_classes
from datamodules.shapes import watermark_mask as _watermark_mask
from datamodules.splits import SplitDataModule
from explain.validation import in_interval


class InMemoryDataset(Dataset):
    """Samples held in tensors: images uint8 [N, 3, S, S], labels [N], heatmaps float [N, S, S], has_heatmap [N].

    ``padding`` set: the training augmentation (:func:`~datamodules.augmentation.pad_crop_flip`, i.e. zero-pad,
    random crop, random flip, image and map alike), applied per batch through ``__getitems__``, which the
    DataLoader calls with the indices of a whole batch. ``watermark_labels`` [N] records the class each image's
    watermark shows (for analysis; not in the batch). ``spurious_mask`` bool [S, S] (the watermark's pixels, the
    same in every image) goes into each sample as ``spurious_mask``, moved by the same crop and flip as its image.

    Raises:
        ValueError: a ``spurious_mask`` that is not [H, W] like the images.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        heatmaps: Tensor,
        has_heatmap: Tensor,
        watermark_labels: Tensor,
        padding: int | None = None,
        spurious_mask: Tensor | None = None,
    ) -> None:
        self.images, self.labels, self.heatmaps = images, labels, heatmaps
        self.has_heatmap, self.watermark_labels = has_heatmap, watermark_labels
        self.padding = padding
        if spurious_mask is not None and spurious_mask.shape != images.shape[-2:]:
            raise ValueError(
                f"spurious_mask must be [H, W] = {tuple(images.shape[-2:])} like the images, got "
                f"{tuple(spurious_mask.shape)}"
            )
        self.spurious_mask = None if spurious_mask is None else spurious_mask.bool()

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Tensor]]:
        index = torch.as_tensor(indices, dtype=torch.long)
        images, heatmaps = self.images[index], self.heatmaps[index]
        if self.spurious_mask is not None:  # a 4th image channel, so it gets the image's crop and flip
            mask = self.spurious_mask.to(images.dtype).expand(images.shape[0], 1, *images.shape[-2:])
            images = torch.cat([images, mask], dim=1)
        if self.padding is not None:
            images, heatmaps = pad_crop_flip(images, heatmaps, self.padding)
        masks = images[:, 3].bool() if self.spurious_mask is not None else None
        images = images[:, :3].float() / 255
        samples = [
            make_sample(image, label, heatmap, has)
            for image, label, heatmap, has in zip(images, self.labels[index], heatmaps, self.has_heatmap[index])
        ]
        if masks is not None:
            for sample, mask in zip(samples, masks):
                sample["spurious_mask"] = mask
        return samples

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.__getitems__([index])[0]

    def subset(self, indices: Tensor, padding: int | None = None) -> InMemoryDataset:
        """The samples at ``indices`` (a copy), with the given augmentation."""
        return InMemoryDataset(
            self.images[indices],
            self.labels[indices],
            self.heatmaps[indices],
            self.has_heatmap[indices],
            self.watermark_labels[indices],
            padding,
            self.spurious_mask,
        )


class ShortcutShapesDataModule(SplitDataModule):
    """Shapes to classify, with a watermark that is a shortcut (DESIGN section 2).

    Each image shows one shape (the class: ``class_names``) of random colour, size and position on a noisy grey
    background, and a ``watermark_size`` colour patch in the top-left corner whose colour codes a class. In the
    train and val splits and in the ``iid`` test split, the watermark shows the true class with probability
    ``shortcut_prob`` and a uniformly drawn wrong class otherwise; in the ``flipped`` test split it always shows
    a wrong class (the ``flipped`` images are the ``iid`` images with another watermark, so the two splits
    differ only by the watermark). The human map is the object's mask, blurred (sigma = image_size / 32); it is
    exactly zero on the watermark.

    Args:
        num_classes: number of shapes, 2 to 8 (``SHAPE_NAMES`` in that order).
        image_size: side of the square images.
        shortcut_prob: probability that the train/val/iid watermark agrees with the label.
        watermark_size: side of the watermark patch in pixels (default ``image_size // 8``).
        object_size: range of the shape's half-width as a fraction of ``image_size`` (drawn uniformly per image;
            smaller shapes make the shape a harder cue than the watermark).
        noise_std: std of the Gaussian pixel noise over the whole image.
        train_size, val_size, test_size: number of images per split (``test_size`` for each test split).
        annotated_fraction: share of the TRAIN images that carry a human map (``has_heatmap``; the others get
            zeros). Val and test images all carry one.
        num_folds, fold: with ``num_folds > 1`` the training set is split into folds (``fold_of_sample``) and
            training uses every fold but ``fold``; :meth:`heldout_dataloader` serves the held-out fold.
        batch_size, num_workers: for every dataloader.
        seed: everything (scenes, watermarks, annotated subset, folds) is a function of the seed.
        augment: training augmentation: zero-pad by ``image_size // 8``, random crop, horizontal flip (image and
            map alike; done per batch, see :func:`~datamodules.augmentation.pad_crop_flip`). The watermark moves
            with the crop and the flip, as a real watermark would; val and test images are never augmented, so
            the watermark is exactly at :meth:`watermark_mask` there.

    Batches follow the data contract (``image``, ``label``, ``heatmap``, ``has_heatmap``) and carry its optional
    ``spurious_mask`` bool [B, S, S] in every split: the watermark's pixels (after the training crop and flip),
    where a model right for the right reasons should not look.
    ``test_dataloader()`` returns the loaders of ``test_split_names = ("iid", "flipped")`` in that order.

    Raises:
        ValueError: ``num_classes``, ``shortcut_prob``, ``annotated_fraction``, ``object_size``,
            ``watermark_size`` or a split size out of its domain, or a fold option as
            :func:`~datamodules.folds.check_fold` refuses.
    """

    test_split_names: tuple[str, ...] = ("iid", "flipped")
    pin_memory = False  # small tensors already in memory

    def __init__(
        self,
        num_classes: int = 4,
        image_size: int = 32,
        shortcut_prob: float = 0.9,
        watermark_size: int | None = None,
        object_size: tuple[float, float] = (0.22, 0.34),
        noise_std: float = 0.05,
        train_size: int = 5000,
        val_size: int = 1000,
        test_size: int = 1000,
        annotated_fraction: float = 1.0,
        num_folds: int = 1,
        fold: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        super().__init__()
        if not 2 <= num_classes <= len(SHAPE_NAMES):
            raise ValueError(
                f"num_classes must be in [2, {len(SHAPE_NAMES)}] (shapes: {SHAPE_NAMES}), got {num_classes}"
            )
        if not 0.0 <= shortcut_prob <= 1.0:
            raise ValueError(f"shortcut_prob must be a probability in [0, 1], got {shortcut_prob}")
        if not 0.0 <= annotated_fraction <= 1.0:
            raise ValueError(f"annotated_fraction must be in [0, 1], got {annotated_fraction}")
        if len(object_size) != 2 or not 0.0 < object_size[0] <= object_size[1] < 0.5:
            raise ValueError(f"object_size must be (low, high) with 0 < low <= high < 0.5, got {object_size}")
        in_interval("noise_std", noise_std, 0)  # NaN and inf refused too
        watermark_size = max(1, image_size // 8) if watermark_size is None else watermark_size
        if not 1 <= watermark_size < image_size // 2:
            raise ValueError(
                f"watermark_size must be in [1, image_size // 2 = {image_size // 2}), got {watermark_size}"
            )
        for name, size in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if size < 1:
                raise ValueError(f"{name} must be >= 1, got {size}")
        check_fold(num_folds, fold)
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.image_size = image_size
        self.shortcut_prob = shortcut_prob
        self.watermark_size = watermark_size
        self.object_size, self.noise_std = tuple(object_size), noise_std
        self.train_size, self.val_size, self.test_size = train_size, val_size, test_size
        self.annotated_fraction = annotated_fraction
        self.num_folds, self.fold = num_folds, fold
        self.batch_size, self.num_workers = batch_size, num_workers
        self.seed, self.augment = seed, augment
        self.class_names: list[str] = list(SHAPE_NAMES[:num_classes])
        #: fold of every sample of the full training set (int64 [train_size]; all zeros when num_folds == 1)
        self.fold_of_sample: Tensor = assign_folds(train_size, num_folds, self._seed(3))
        self._splits: dict[str, InMemoryDataset] = {}

    def watermark_mask(self, image_size: int | None = None) -> Tensor:
        """Pixels of the watermark in val/test images: bool [S, S], S = ``image_size`` (default: the data's).

        Another ``image_size`` rescales the region (for maps computed at another resolution).
        """
        mask = _watermark_mask(self.image_size, self.watermark_size)
        if image_size is None or image_size == self.image_size:
            return mask
        scaled = torch.nn.functional.interpolate(mask[None, None].float(), size=(image_size, image_size), mode="area")
        return scaled[0, 0] > 0

    def _seed(self, stream: int) -> int:
        # one independent stream per purpose: 0 train, 1 val, 2 test, 3 folds, 4 annotated subset
        return self.seed * 16 + stream

    def _generate(self, n: int, stream: int, agree_probs: tuple[float, ...]) -> list[dict[str, Tensor]]:
        generator = torch.Generator().manual_seed(self._seed(stream))
        scenes = render_scenes(
            n, self.num_classes, self.image_size, self.watermark_size, generator, self.object_size, self.noise_std
        )
        out = []
        for prob in agree_probs:
            marks = watermark_classes(scenes["labels"], self.num_classes, prob, generator)
            images = stamp_watermark(scenes["images"], marks, self.num_classes, self.watermark_size)
            out.append({**scenes, "images": (images * 255).round().to(torch.uint8), "watermark_labels": marks})
        return out

    def _dataset(self, split: dict[str, Tensor], has_heatmap: Tensor) -> InMemoryDataset:
        heatmaps = split["heatmaps"] * has_heatmap[:, None, None]
        return InMemoryDataset(
            split["images"],
            split["labels"],
            heatmaps,
            has_heatmap,
            split["watermark_labels"],
            spurious_mask=self.watermark_mask(),
        )

    @override
    def setup(self, stage: str | None = None) -> None:
        """Generate the splits (once; about a second for the defaults on one CPU core)."""
        if self._splits:
            return
        (train,) = self._generate(self.train_size, 0, (self.shortcut_prob,))
        generator = torch.Generator().manual_seed(self._seed(4))
        annotated = torch.zeros(self.train_size, dtype=torch.bool)
        num_annotated = round(self.annotated_fraction * self.train_size)
        annotated[torch.randperm(self.train_size, generator=generator)[:num_annotated]] = True
        full_train = self._dataset(train, annotated)
        held_out = (self.fold_of_sample == self.fold) & (self.num_folds > 1)  # no fold is held out when k = 1
        padding = max(1, self.image_size // 8) if self.augment else None
        self._splits["train"] = full_train.subset((~held_out).nonzero().squeeze(1), padding)
        self._splits["heldout"] = full_train.subset(held_out.nonzero().squeeze(1))

        (val,) = self._generate(self.val_size, 1, (self.shortcut_prob,))
        self._splits["val"] = self._dataset(val, torch.ones(self.val_size, dtype=torch.bool))
        iid, flipped = self._generate(self.test_size, 2, (self.shortcut_prob, 0.0))
        everyone = torch.ones(self.test_size, dtype=torch.bool)
        self._splits["iid"] = self._dataset(iid, everyone)
        self._splits["flipped"] = self._dataset(flipped, everyone)

    def dataset(self, split: str) -> InMemoryDataset:
        """The dataset of a split: ``train``, ``val``, ``iid``, ``flipped`` or ``heldout``.

        Raises:
            KeyError: an unknown ``split``.
        """
        self.setup()
        if split not in self._splits:
            raise KeyError(f"unknown split {split!r}; choose from {sorted(self._splits)}")
        return self._splits[split]
