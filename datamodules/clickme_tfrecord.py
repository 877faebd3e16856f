"""``ClickMeTFRecordDataModule``: the ClickMe shards serre-lab distributes, read with ``tfrecord`` (no TensorFlow).

Each record holds ``image`` (JPEG bytes, 256x256x3), ``heatmap`` (JPEG bytes, 256x256x1, uint8) and ``label``
(int64, ImageNet class). The map gets the reference preprocessing
(:func:`datamodules.clickme_heatmap.clickme_heatmap`).

Sharding. The dataset is an ``IterableDataset`` read by ``world_size`` ranks x ``num_workers`` DataLoader
workers, i.e. ``n`` consumers; consumer ``c = rank * num_workers + worker``. With at least ``n`` shards, shard
``s`` is read by consumer ``s % n`` alone. With fewer shards than consumers, every consumer reads every shard
but keeps only record ``i`` of shard ``s`` when ``(s + i) % n == c``: each record is still served exactly once
per epoch, at the cost of each file being scanned ``n`` times (only the kept records are decoded). Under DDP the
ranks may then get a few batches more or less than each other (shards of unequal length, or a shard count that
is not a multiple of ``n``); give every rank the same number of records, or set ``trainer.limit_train_batches``,
or Lightning's collective calls wait on the rank that stops first.

Errors name the shard file and the record's index in it (counting from 0): corrupt framing, a record that is not
a ``tf.train.Example``, a missing feature, an unreadable JPEG, a label out of range.
"""

from __future__ import annotations

import glob
import itertools
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from google.protobuf.message import DecodeError
from tfrecord import example_pb2
from tfrecord.reader import tfrecord_iterator
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from datamodules.augmentation import PairedTransform, make_sample, train_transform
from datamodules.clickme_folder import load_image
from datamodules.clickme_heatmap import clickme_heatmap


def expand_shards(shards: str | Sequence[str], argument: str = "shards") -> list[str]:
    """Shard paths from a glob, a path, or a list of either: sorted within each pattern, duplicates kept out."""
    patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    paths: list[str] = []
    for pattern in map(str, patterns):
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
        else:
            matches = [pattern] if Path(pattern).is_file() else []
        if not matches:
            raise FileNotFoundError(f"{argument}: no shard file matches {pattern!r}")
        paths.extend(path for path in matches if path not in paths)
    return paths


class ClickMeTFRecordDataset(IterableDataset):
    """Stream of ClickMe samples from TFRecord shards, split across ranks and DataLoader workers.

    Args:
        shards: shard file paths.
        image_size: side of the square output images.
        num_classes: labels must be in ``[0, num_classes)``.
        transform: paired training augmentation, or None to resize to ``image_size`` (the map is then brought
            to ``image_size`` directly from its blurred 64x64 version, exactly as the reference does).
        shuffle_buffer: >0 shuffles the shard order of each consumer and the records through a buffer of that
            many (undecoded) records, with a new order every epoch (drawn from torch's RNG, so it follows
            ``seed_everything``).
        unannotated: optional (path, label) list of images without human maps, mixed in so that the annotated
            records make ``annotated_ratio`` of the stream (the epoch ends with the annotated records).
        rank, world_size: this process's place among the DDP ranks (set by the datamodule).
    """

    FEATURES = ("image", "heatmap", "label")

    def __init__(
        self,
        shards: Sequence[str],
        image_size: int,
        num_classes: int,
        transform: PairedTransform | None = None,
        shuffle_buffer: int = 0,
        unannotated: Sequence[tuple[str, int]] | None = None,
        annotated_ratio: float = 1.0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if not 0.0 < annotated_ratio <= 1.0:
            raise ValueError(f"annotated_ratio must be in (0, 1], got {annotated_ratio}")
        self.shards, self.image_size, self.num_classes = list(shards), image_size, num_classes
        self.transform, self.shuffle_buffer = transform, shuffle_buffer
        self.unannotated, self.annotated_ratio = list(unannotated or []), annotated_ratio
        self.rank, self.world_size = rank, world_size

    def consumer(self) -> tuple[int, int]:
        """``(consumer index, number of consumers)`` of the calling process/worker."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * num_workers + worker, self.world_size * num_workers

    def records(
        self, consumer: int, num_consumers: int, rng: random.Random | None = None
    ) -> Iterator[tuple[str, int, bytes]]:
        """``(shard, record index, raw record)`` of every record this consumer serves (module docstring)."""
        whole_shards = len(self.shards) >= num_consumers
        mine = [(s, path) for s, path in enumerate(self.shards) if not whole_shards or s % num_consumers == consumer]
        if rng is not None:
            rng.shuffle(mine)
        for s, path in mine:
            index = -1
            try:
                for index, record in enumerate(tfrecord_iterator(path)):
                    if whole_shards or (s + index) % num_consumers == consumer:
                        yield path, index, bytes(record)
            except RuntimeError as error:  # tfrecord's framing errors: truncated file, bad length
                raise RuntimeError(f"{path}: record {index + 1}: corrupt TFRecord framing ({error})") from error

    def decode(self, path: str, index: int, record: bytes) -> dict[str, Tensor]:
        """One raw record -> the sample dict; errors name the shard and the record index."""
        where = f"{path}: record {index}"
        example = example_pb2.Example()
        try:
            example.ParseFromString(record)
        except DecodeError as error:
            raise ValueError(f"{where}: not a tf.train.Example ({error})") from error
        features = example.features.feature
        missing = [key for key in self.FEATURES if key not in features]
        if missing:
            raise ValueError(f"{where}: missing feature(s) {missing} (has {sorted(features)})")
        image_bytes, heatmap_bytes = features["image"].bytes_list.value, features["heatmap"].bytes_list.value
        labels = features["label"].int64_list.value
        if len(image_bytes) != 1 or len(heatmap_bytes) != 1 or len(labels) != 1:
            raise ValueError(f"{where}: 'image' and 'heatmap' must hold one bytes value and 'label' one int64")
        label = labels[0]
        if not 0 <= label < self.num_classes:
            raise ValueError(f"{where}: label {label} is out of range [0, {self.num_classes})")
        image = _decode_jpeg(image_bytes[0], ImageReadMode.RGB, f"{where}: feature 'image'")
        heatmap = _decode_jpeg(heatmap_bytes[0], ImageReadMode.GRAY, f"{where}: feature 'heatmap'")[0]
        if self.transform is None:
            size = [self.image_size, self.image_size]
            image = F.to_dtype(F.resize(image, size, antialias=True), torch.float32, scale=True)
            heatmap = clickme_heatmap(heatmap, (self.image_size, self.image_size))
        else:
            image, heatmap = self.transform(image, clickme_heatmap(heatmap, tuple(image.shape[-2:])))
        return make_sample(image, label, heatmap, True)

    def load_unannotated(self, path: str, label: int) -> dict[str, Tensor]:
        """An image without human map: zeros, ``has_heatmap`` False."""
        image = load_image(Path(path), "unannotated image")
        heatmap = torch.zeros(image.shape[-2:])
        if self.transform is None:
            image = F.to_dtype(F.resize(image, [self.image_size] * 2, antialias=True), torch.float32, scale=True)
            heatmap = torch.zeros(self.image_size, self.image_size)
        else:
            image, heatmap = self.transform(image, heatmap)
        return make_sample(image, label, heatmap, False)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        consumer, num_consumers = self.consumer()
        # a fresh seed per epoch and per worker: DataLoader reseeds torch in each worker from a new base seed
        rng = random.Random(int(torch.empty((), dtype=torch.int64).random_())) if self.shuffle_buffer > 0 else None
        records = self.records(consumer, num_consumers, rng)
        if rng is not None:
            records = _shuffled(records, self.shuffle_buffer, rng)
        annotated = (self.decode(*record) for record in records)
        if not self.unannotated:
            yield from annotated
            return
        others = self.unannotated[consumer::num_consumers]
        if not others:
            raise ValueError(
                f"{len(self.unannotated)} unannotated images cannot be shared among {num_consumers} consumers "
                "(ranks x workers): add images or use fewer workers"
            )
        yield from _mix(annotated, self._cycle(others, rng), self.annotated_ratio)

    def _cycle(self, items: list[tuple[str, int]], rng: random.Random | None) -> Iterator[dict[str, Tensor]]:
        while True:
            order = list(items)
            if rng is not None:
                rng.shuffle(order)
            for path, label in order:
                yield self.load_unannotated(path, label)


def _decode_jpeg(data: bytes, mode: ImageReadMode, where: str) -> Tensor:
    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except RuntimeError as error:
        raise ValueError(f"{where} is not a readable JPEG ({error})") from error


def _shuffled(items: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """Shuffle a stream through a buffer (as ``tf.data.Dataset.shuffle``): each item leaves at a random time."""
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = rng.randrange(buffer_size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def _mix(annotated: Iterator, unannotated: Iterator, ratio: float) -> Iterator:
    """Interleave two streams so that ``annotated`` makes ``ratio`` of the output at every prefix (within one
    item): slot ``t`` takes an annotated item while ``count <= ratio * t``. Ends with ``annotated``."""
    count = 0
    for t in itertools.count():
        if count <= ratio * t + 1e-9:
            item = next(annotated, None)
            if item is None:
                return
            count += 1
            yield item
        else:
            yield next(unannotated)


class ClickMeTFRecordDataModule(L.LightningDataModule):
    """ClickMe TFRecord shards (module docstring), optionally mixed with unannotated images for training.

    Args:
        train_shards, val_shards, test_shards: a glob (``"clickme/train-*.tfrecords"``), a path, or a list.
        image_size: side of the square output images (224 in the reference).
        num_classes: labels must be in ``[0, num_classes)`` (1000: ImageNet).
        unannotated_dir: optional folder of images WITHOUT human maps, one sub-folder per class
            (torchvision ``ImageFolder`` layout: classes are the sorted sub-folder names, so an ImageNet train
            folder of WordNet ids gets the usual ImageNet indices, as in ClickMe). They are mixed into the
            TRAINING stream only, so that ClickMe records make ``annotated_ratio`` of it (reference: 0.2, i.e.
            20% ClickMe, 80% ImageNet); an epoch is one pass over the ClickMe shards.
        augment: training augmentation (``RandomResizedCrop(image_size, scale=(0.25, 1))`` + horizontal flip,
            image and map alike; the map is prepared at the image's resolution first). Without it, and always
            for val/test, the image is resized to ``image_size`` and the map follows the reference exactly.
        shuffle_buffer: records held to shuffle the training stream (and the shard order); 0 disables.
    """

    test_split_names: tuple[str, ...] = ("test",)

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str],
        test_shards: str | list[str] | None = None,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 4,
        num_classes: int = 1000,
        unannotated_dir: str | None = None,
        annotated_ratio: float = 0.2,
        augment: bool = True,
        shuffle_buffer: int = 1024,
    ) -> None:
        super().__init__()
        if not 0.0 < annotated_ratio <= 1.0:
            raise ValueError(f"annotated_ratio must be in (0, 1], got {annotated_ratio}")
        self.save_hyperparameters()
        self.train_shards, self.val_shards, self.test_shards = train_shards, val_shards, test_shards
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.num_classes, self.augment, self.shuffle_buffer = num_classes, augment, shuffle_buffer
        self.unannotated_dir, self.annotated_ratio = unannotated_dir, annotated_ratio
        self.class_names: list[str] | None = None
        self._unannotated: list[tuple[str, int]] | None = None

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def unannotated_samples(self) -> list[tuple[str, int]]:
        """``(path, label)`` of every image of ``unannotated_dir`` (listed once)."""
        if self._unannotated is None:
            if not Path(self.unannotated_dir).is_dir():
                raise FileNotFoundError(f"unannotated_dir {self.unannotated_dir} does not exist")
            folder = ImageFolder(self.unannotated_dir, allow_empty=True)
            if len(folder.classes) > self.num_classes:
                raise ValueError(
                    f"unannotated_dir {self.unannotated_dir} has {len(folder.classes)} class folders, more than "
                    f"num_classes={self.num_classes}"
                )
            if not folder.samples:
                raise ValueError(f"unannotated_dir {self.unannotated_dir} holds no image")
            self._unannotated = list(folder.samples)
        return self._unannotated

    def _loader(self, shards: str | list[str], argument: str, train: bool = False) -> DataLoader:
        rank, world_size = self._rank()
        dataset = ClickMeTFRecordDataset(
            expand_shards(shards, argument),
            self.image_size,
            self.num_classes,
            transform=train_transform(self.image_size) if train and self.augment else None,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            unannotated=self.unannotated_samples() if train and self.unannotated_dir else None,
            annotated_ratio=self.annotated_ratio if train else 1.0,
            rank=rank,
            world_size=world_size,
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_shards, "train_shards", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_shards, "val_shards")

    @property
    def has_test_split(self) -> bool:
        """Whether ``test_shards`` is set (``run.test_after_fit`` skips the test when it is not)."""
        return self.test_shards is not None

    def test_dataloader(self) -> DataLoader:
        if self.test_shards is None:
            raise ValueError("test_shards is not set: pass test_shards (a glob or a list) to test")
        return self._loader(self.test_shards, "test_shards")

