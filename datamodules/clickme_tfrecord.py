"""``ClickMeTFRecordDataModule``: the ClickMe shards serre-lab distributes, with random access, for DDP at scale.

Each record holds ``image`` (JPEG bytes, 256x256x3), ``heatmap`` (JPEG bytes, 256x256x1, uint8) and ``label``
(int64, ImageNet class), as a ``tf.train.Example`` parsed with the ``tfrecord`` package (no TensorFlow). The map gets
the reference preprocessing (:func:`datamodules.clickme_heatmap.clickme_heatmap`).

Random access, not streams. Every shard gets an index of its record offsets (:mod:`datamodules.tfrecord_index`:
the ``tfrecord2idx`` format, built on first use with both checksums of every record checked, cached beside the
shard or in ``index_dir``, rebuilt when the shard changes). :class:`ClickMeRecords` is then a map-style dataset:
record ``i`` is read at its (shard, offset). Training batches come from
:class:`~datamodules.mix_sampler.MixedBatchSampler`: exactly ``round(annotated_ratio * batch_size)`` ClickMe
records per batch, the rest from ``unannotated_dir``, with Lightning's ``DistributedSampler`` splitting the records
over the ranks (same number of batches on every rank, each record once per epoch, a seeded shuffle per epoch; see
that module for the remainder). Validation and test loaders are plain map-style loaders (Lightning adds its
``DistributedSampler`` under DDP).

Decoding. By default each DataLoader worker decodes its samples with ``torchvision.io.decode_jpeg``. With
``decode_device="cuda"`` the training loader ships the raw JPEG bytes and :meth:`on_after_batch_transfer` decodes a
whole batch at once on the GPU (nvjpeg), then applies the same preprocessing there; ``decode_device="cpu"`` runs that
batched path on the CPU (same code, for machines without a GPU and for tests). With ``compact_batches=True`` the
workers stop before the byte-heavy last steps (uint8 images, blurred 64x64 maps) and :meth:`on_after_batch_transfer`
finishes each batch on its device (:func:`finish_batch`): handing 800 KB float32 records from the worker processes
(through new shared memory for every batch) costs more than decoding them.

Errors name the shard file and the record's index in it (counting from 0): an empty shard, a checksum mismatch, a
length larger than the file, a record that is not a ``tf.train.Example``, a missing feature, an unreadable JPEG, a
label out of range.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from google.protobuf.message import DecodeError
from tfrecord import example_pb2
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as F
from typing_extensions import override

from datamodules.augmentation import PairedTransform, make_sample, train_transform
from datamodules.clickme_heatmap import BLUR_SIZE, blurred_heatmap, clickme_heatmap, expand_heatmap
from datamodules.mix_sampler import MixedBatchSampler, annotated_per_batch
from datamodules.threaded_loader import BufferPool, ThreadedDataLoader
from datamodules.tfrecord_index import read_record, shard_index
from explain.validation import in_interval, non_negative_int, one_of, positive_int

FEATURES = ("image", "heatmap", "label")
JPEG_MAGIC = b"\xff\xd8"


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


class ClickMeRecords(Dataset):
    """Map-style dataset of the raw ClickMe records of some shards: ``records[i]`` is a dict with ``image_jpeg``
    and ``heatmap_jpeg`` (bytes), ``label`` (int) and ``where`` (``"<shard>: record <k>"``).

    Args:
        shards: shard file paths; every one is indexed (:func:`datamodules.tfrecord_index.shard_index`).
        num_classes: labels must be in ``[0, num_classes)``.
        index_dir: where to cache the indexes; None: beside each shard, or the user cache when that is read-only.
    """

    def __init__(self, shards: Sequence[str], num_classes: int, index_dir: str | None = None) -> None:
        self.shards = [str(shard) for shard in shards]
        if not self.shards:
            raise ValueError("no shard given")
        self.num_classes = positive_int("num_classes", num_classes)
        indexes = [shard_index(shard, index_dir) for shard in self.shards]
        self.lengths = [len(index) for index in indexes]
        #: one row per record: shard number, record number in the shard, offset, framed length
        self.locations = np.concatenate(
            [
                np.column_stack([np.full(len(index), s), np.arange(len(index)), index])
                for s, index in enumerate(indexes)
            ]
        ).astype(np.int64)

    def __len__(self) -> int:
        return len(self.locations)

    def where(self, i: int) -> str:
        shard, record = self.locations[i, :2]
        return f"{self.shards[shard]}: record {record}"

    def __getitem__(self, i: int) -> dict[str, Any]:
        shard, record, offset, length = (int(v) for v in self.locations[i])
        where = f"{self.shards[shard]}: record {record}"
        example = example_pb2.Example()
        try:
            example.ParseFromString(read_record(self.shards[shard], record, offset, length))
        except DecodeError as error:
            raise ValueError(f"{where}: not a tf.train.Example ({error})") from error
        features = example.features.feature
        missing = [key for key in FEATURES if key not in features]
        if missing:
            raise ValueError(f"{where}: missing feature(s) {missing} (has {sorted(features)})")
        image, heatmap = features["image"].bytes_list.value, features["heatmap"].bytes_list.value
        labels = features["label"].int64_list.value
        if len(image) != 1 or len(heatmap) != 1 or len(labels) != 1:
            raise ValueError(f"{where}: 'image' and 'heatmap' must hold one bytes value and 'label' one int64")
        if not 0 <= labels[0] < self.num_classes:
            raise ValueError(f"{where}: label {labels[0]} is out of range [0, {self.num_classes})")
        return {"image_jpeg": image[0], "heatmap_jpeg": heatmap[0], "label": int(labels[0]), "where": where}


def _as_bytes_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_one(data: bytes, mode: ImageReadMode, where: str) -> Tensor:
    """JPEG (or, for unannotated files, any format torchvision reads) bytes -> uint8 [C, H, W] on the CPU."""
    try:
        if data[:2] == JPEG_MAGIC:
            return decode_jpeg(_as_bytes_tensor(data), mode=mode)
        return decode_image(_as_bytes_tensor(data), mode=mode)
    except RuntimeError as error:
        raise ValueError(f"{where} is not a readable image ({error})") from error


def decode_many(
    datas: Sequence[bytes], mode: ImageReadMode, wheres: Sequence[str], device: torch.device
) -> list[Tensor]:
    """Decode a batch: the JPEGs in one ``decode_jpeg`` call on ``device`` (nvjpeg on CUDA), other formats one by one
    on the CPU. A failing batch is decoded one by one to name the culprit."""
    jpegs = [k for k, data in enumerate(datas) if data[:2] == JPEG_MAGIC]
    out: list[Tensor | None] = [None] * len(datas)
    if jpegs:
        try:
            decoded = decode_jpeg([_as_bytes_tensor(datas[k]) for k in jpegs], mode=mode, device=device)
        except RuntimeError:
            decoded = [decode_one(datas[k], mode, wheres[k]).to(device) for k in jpegs]  # raises, naming it
        for k, image in zip(jpegs, decoded):
            out[k] = image
    for k, data in enumerate(datas):
        if out[k] is None:
            out[k] = decode_one(data, mode, wheres[k]).to(device)
    return out  # type: ignore[return-value]


class ClickMePreprocessing:
    """Decoded uint8 image [3,H,W] and raw map [H,W] (or None) -> the sample dict of the data contract.

    Without ``transform`` the image is resized to ``image_size`` (bilinear, no antialiasing, as
    ``tf.image.resize``) and the map is brought to ``image_size`` directly from its blurred 64x64 version, exactly
    as the reference parser does. With a paired ``transform`` (training
    augmentation) the map is prepared at the image's resolution first, then cropped/flipped with the image.

    ``compact=True`` leaves the last, byte-heavy steps to :func:`finish_batch` (after collation, on the batch's
    device): the image stays uint8 (4x fewer bytes) and, without ``transform``, the map is shipped as its blurred
    64x64 version under the key ``heatmap_blurred`` (12x fewer bytes at 224 px). Handing float32 batches from the
    DataLoader workers to the main process costs more than decoding them (the worker writes every batch into new
    shared memory): see BENCHMARKS.md, "ClickMe at scale".
    """

    def __init__(self, image_size: int, transform: PairedTransform | None = None, compact: bool = False) -> None:
        self.image_size, self.transform, self.compact = image_size, transform, compact

    def __call__(self, image: Tensor, heatmap: Tensor | None, label: int) -> dict[str, Tensor]:
        return self.many([image], [heatmap], [label])[0]

    def many(
        self, images: Sequence[Tensor], heatmaps: Sequence[Tensor | None], labels: Sequence[int]
    ) -> list[dict[str, Tensor]]:
        """Several samples at once, the values of one by one: without ``transform``, the maps of one size are
        resized to 64x64 and blurred together (3 operations for the batch instead of 5 per map, which is what
        DataLoader threads meet on at the GIL; BENCHMARKS.md)."""
        if self.transform is not None:
            return [self._augmented(image, heatmap, label) for image, heatmap, label in zip(images, heatmaps, labels)]
        size, samples = [self.image_size, self.image_size], []
        for image, blurred, label in zip(images, blurred_heatmaps(heatmaps), labels):
            # bilinear without antialiasing, as the reference's tf.image.resize; in uint8 (40% faster; within
            # 1/255 of resizing floats)
            image = F.resize(image, size, antialias=False)
            has_map = blurred is not None
            if self.compact:
                sample = make_sample(image, label, blurred if has_map else torch.zeros(BLUR_SIZE, BLUR_SIZE), has_map)
                sample["heatmap_blurred"] = sample.pop("heatmap")
            else:
                human = expand_heatmap(blurred, tuple(size)) if has_map else torch.zeros(size)
                sample = make_sample(F.to_dtype(image, torch.float32, scale=True), label, human, has_map)
            samples.append(sample)
        return samples

    def _augmented(self, image: Tensor, heatmap: Tensor | None, label: int) -> dict[str, Tensor]:
        """The map prepared at the image's resolution, then cropped and flipped with it by ``transform``."""
        human = clickme_heatmap(heatmap, tuple(image.shape[-2:])) if heatmap is not None else None
        image, human = self.transform(image, human if human is not None else image.new_zeros(image.shape[-2:]))
        if self.compact:  # the augmented image is a whole number of 255ths: exactly back to uint8
            image = F.to_dtype(image, torch.uint8, scale=True)
        return make_sample(image, label, human, heatmap is not None)


def blurred_heatmaps(heatmaps: Sequence[Tensor | None]) -> list[Tensor | None]:
    """:func:`~datamodules.clickme_heatmap.blurred_heatmap` of each map (None stays None), the maps of the most
    common size in one call."""
    present = [heatmap for heatmap in heatmaps if heatmap is not None]
    if not present:
        return [None] * len(heatmaps)
    shape = max({m.shape for m in present}, key=[m.shape for m in present].count)
    together = iter(blurred_heatmap(torch.stack([m for m in present if m.shape == shape])).unbind(0))
    return [
        None if m is None else next(together) if m.shape == shape else blurred_heatmap(m) for m in heatmaps
    ]


def finish_batch(batch: dict[str, Tensor], buffers: BufferPool | None = None) -> dict[str, Tensor]:
    """A collated compact batch (:class:`ClickMePreprocessing` with ``compact=True``) -> the batch of the data
    contract, on the batch's device: uint8 images to float32 in [0, 1], blurred 64x64 maps to the image size
    (bilinear) and min-max. The values are those of the non-compact samples (same operations, batched).
    ``buffers``: CPU images are written into a tensor of this pool (reused memory: a 224 px float32 batch of 64
    is 38 MB, above what the C allocator keeps for reuse). A batch that is not compact is returned as it is."""
    batch = dict(batch)
    images = batch["image"]
    if images.dtype == torch.uint8:
        if buffers is None or images.device.type != "cpu":
            batch["image"] = F.to_dtype(images, torch.float32, scale=True)
        else:  # the operations of F.to_dtype(scale=True): image.to(float32).mul_(1 / 255)
            batch["image"] = buffers.empty(images.shape, torch.float32).copy_(images).mul_(1 / 255)
    if "heatmap_blurred" in batch:
        batch["heatmap"] = expand_heatmap(batch.pop("heatmap_blurred"), tuple(batch["image"].shape[-2:]))
    return batch


class FinishingCollate:
    """``collate_fn`` that turns compact samples into a batch of the data contract: ``default_collate``, then
    :func:`finish_batch` into the reused buffers of a :class:`~datamodules.threaded_loader.BufferPool`.

    For loaders whose workers are threads (:class:`~datamodules.threaded_loader.ThreadedDataLoader`): the finishing
    runs on the loader's threads, and a batch's memory serves again once nothing holds the batch. Not for worker
    processes, whose batches must be collated into shared memory (``default_collate`` does that)."""

    def __init__(self, capacity: int = 16) -> None:
        self.buffers = BufferPool(capacity)

    def __call__(self, samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return finish_batch(default_collate(samples), self.buffers)


class ClickMeSamples(Dataset):
    """ClickMe records (indices ``0..N-1``) and optional unannotated images (indices ``N..N+M-1``).

    ``len()`` is ``N``: an epoch is one pass over the ClickMe records, and Lightning's ``DistributedSampler`` (which
    spans ``range(len(dataset))``) splits only them; :class:`~datamodules.mix_sampler.MixedBatchSampler` addresses
    the unannotated images above ``N``.

    Args:
        records: the ClickMe records.
        preprocessing: decoded image/map -> sample dict.
        unannotated: ``(path, label)`` of images without human map.
        decode: True: items are decoded sample dicts (in the DataLoader workers); False: raw items (``image_jpeg``,
            ``heatmap_jpeg`` (empty for no map), ``label``, ``where``) for :func:`decode_batch`.
    """

    def __init__(
        self,
        records: ClickMeRecords,
        preprocessing: ClickMePreprocessing,
        unannotated: Sequence[tuple[str, int]] = (),
        decode: bool = True,
    ) -> None:
        self.records, self.preprocessing = records, preprocessing
        self.unannotated, self.decode = list(unannotated), decode

    def __len__(self) -> int:
        return len(self.records)

    def raw(self, i: int) -> dict[str, Any]:
        if i < len(self.records):
            return self.records[i]
        path, label = self.unannotated[i - len(self.records)]
        where = f"unannotated image {path}"
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise ValueError(f"{where}: cannot read it ({error})") from error
        return {"image_jpeg": data, "heatmap_jpeg": b"", "label": label, "where": where}

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """``[self[i] for i in indices]``, preprocessed together (:meth:`ClickMePreprocessing.many`). PyTorch's
        DataLoader calls it with the indices of a batch, and so does :class:`ThreadedDataLoader`."""
        items = [self.raw(i) for i in indices]
        if not self.decode:
            return items
        images, heatmaps = [], []
        for item in items:
            where = item["where"]
            images.append(decode_one(item["image_jpeg"], ImageReadMode.RGB, f"{where}: feature 'image'"))
            data = item["heatmap_jpeg"]
            heatmaps.append(decode_one(data, ImageReadMode.GRAY, f"{where}: feature 'heatmap'")[0] if data else None)
        return self.preprocessing.many(images, heatmaps, [item["label"] for item in items])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The ClickMe records in order (the unannotated images are reached by index only)."""
        return (self[i] for i in range(len(self)))


class ClickMeTFRecordDataset(ClickMeSamples):
    """The decoded ClickMe records of some shards, in one line: ``ClickMeTFRecordDataset(shards, 224, 1000)[i]``.

    Args:
        shards: shard paths (or a glob, see :func:`expand_shards`).
        image_size: side of the square output images.
        num_classes: labels must be in ``[0, num_classes)``.
        transform: paired training augmentation, or None for the reference preprocessing at ``image_size``.
        index_dir: where to cache the shard indexes (:class:`ClickMeRecords`).
        compact: samples with uint8 images and blurred 64x64 maps, for :func:`finish_batch` after collation
            (:class:`ClickMePreprocessing`).
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        image_size: int,
        num_classes: int,
        transform: PairedTransform | None = None,
        index_dir: str | None = None,
        compact: bool = False,
    ) -> None:
        records = ClickMeRecords(expand_shards(shards), num_classes, index_dir)
        preprocessing = ClickMePreprocessing(positive_int("image_size", image_size), transform, compact)
        super().__init__(records, preprocessing)


def decode_batch(batch: dict[str, Any], preprocessing: ClickMePreprocessing, device: torch.device) -> dict[str, Tensor]:
    """A collated batch of raw items (lists ``image_jpeg``, ``heatmap_jpeg``, ``where``; ``label`` [B]) -> the batch
    dict of the data contract, decoded in one ``decode_jpeg`` call per kind on ``device``."""
    wheres = list(batch["where"])
    images = decode_many(batch["image_jpeg"], ImageReadMode.RGB, [f"{w}: feature 'image'" for w in wheres], device)
    with_map = [k for k, data in enumerate(batch["heatmap_jpeg"]) if data]
    maps = decode_many(
        [batch["heatmap_jpeg"][k] for k in with_map],
        ImageReadMode.GRAY,
        [f"{wheres[k]}: feature 'heatmap'" for k in with_map],
        device,
    )
    heatmaps: list[Tensor | None] = [None] * len(images)
    for k, heatmap in zip(with_map, maps):
        heatmaps[k] = heatmap[0]
    samples = preprocessing.many(images, heatmaps, torch.as_tensor(batch["label"]).tolist())
    return {key: torch.stack([sample[key] for sample in samples]).to(device) for key in samples[0]}


class ClickMeTFRecordDataModule(L.LightningDataModule):
    """ClickMe TFRecord shards (module docstring), mixed with unannotated images for training.

    Args:
        train_shards, val_shards, test_shards: a glob (``"clickme/train-*.tfrecords"``), a path, or a list.
        image_size: side of the square output images (224 in the reference).
        batch_size: items per batch and per process.
        num_workers: DataLoader workers per process.
        num_classes: labels must be in ``[0, num_classes)`` (1000: ImageNet).
        unannotated_dir: optional folder of images WITHOUT human maps, one sub-folder per class (torchvision
            ``ImageFolder`` layout: classes are the sorted sub-folder names, so an ImageNet train folder of WordNet
            ids gets the usual ImageNet indices, as in ClickMe). Training batches then hold exactly
            ``round(annotated_ratio * batch_size)`` ClickMe records, the rest from this folder (reference: 0.2, i.e.
            20% ClickMe, 80% ImageNet); an epoch is one pass over the ClickMe training records. Without it,
            batches are all ClickMe and ``annotated_ratio`` is not used.
        augment: training augmentation (``RandomResizedCrop(image_size, scale=(0.25, 1))`` + horizontal flip,
            image and map alike; the map is prepared at the image's resolution first). Without it, and always
            for val/test, the image is resized to ``image_size`` and the map follows the reference exactly.
        drop_last: what becomes of each rank's last incomplete group of ClickMe records
            (:class:`~datamodules.mix_sampler.MixedBatchSampler`): False completes it with records from the start
            of the epoch's order (a few served twice), True drops it (a few skipped, others each epoch).
        seed: seed of the shuffle on one process (under DDP Lightning's sampler uses the ``seed_everything`` seed);
            None: the ``seed_everything`` seed (``PL_GLOBAL_SEED``), else 0.
        index_dir: where to cache the shard indexes; None: beside the shards, or ``~/.cache/harmonization/tfindex``
            when their folder is read-only.
        decode_device: None decodes in the DataLoader workers; ``"cuda"`` (or ``"cpu"``) decodes each training
            batch at once on that device in :meth:`on_after_batch_transfer` (nvjpeg on CUDA). Val/test batches
            are always decoded in the workers (the explanation monitors read them sample by sample).
        compact_batches: the workers hand over training batches with uint8 images and (without ``augment``) the
            blurred 64x64 maps, and :meth:`on_after_batch_transfer` finishes them on the batch's device
            (:func:`finish_batch`; same values). About 5x fewer bytes from the workers to the main process and
            to the GPU: on 2 CPU cores it cuts the workers' time per record by half (BENCHMARKS.md). The batches
            of ``train_dataloader()`` itself are then compact; the LightningModule sees the contract.
        worker_threads: the ``num_workers`` workers are threads of the training process
            (:class:`~datamodules.threaded_loader.ThreadedDataLoader`, tf.data's model) instead of processes. The
            training batches are then finished on those threads into reused memory (:class:`FinishingCollate`;
            with ``compact_batches`` they stay compact for the device). On 2 CPU cores this is the fastest loader
            (at or above the reference tf.data pipeline's records/s, BENCHMARKS.md); worker processes keep the
            training loop's Python apart from the loader's, which matters on a GPU machine with many cores.
            Augmentation draws are then not reproducible run to run (the threads share torch's global generator).
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
        drop_last: bool = False,
        seed: int | None = None,
        index_dir: str | None = None,
        decode_device: str | None = None,
        compact_batches: bool = False,
        worker_threads: bool = False,
    ) -> None:
        super().__init__()
        in_interval("annotated_ratio", annotated_ratio, 0, 1, low_open=True)
        positive_int("image_size", image_size)
        positive_int("batch_size", batch_size)
        non_negative_int("num_workers", num_workers)
        positive_int("num_classes", num_classes)
        non_negative_int("seed", seed, allow_none=True)
        one_of("compact_batches", compact_batches, (False, True))
        one_of("worker_threads", worker_threads, (False, True))
        if decode_device is not None:
            one_of("decode_device", str(decode_device).split(":")[0], ("cpu", "cuda"))
        if unannotated_dir is not None:
            annotated_per_batch(batch_size, annotated_ratio)  # fails early on a ratio that rounds to 0
        self.save_hyperparameters()
        self.train_shards, self.val_shards, self.test_shards = train_shards, val_shards, test_shards
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.num_classes, self.augment, self.drop_last = num_classes, augment, drop_last
        self.unannotated_dir, self.annotated_ratio = unannotated_dir, annotated_ratio
        self.seed, self.index_dir, self.decode_device = seed, index_dir, decode_device
        self.compact_batches, self.worker_threads = compact_batches, worker_threads
        self.class_names: list[str] | None = None
        self._unannotated: list[tuple[str, int]] | None = None
        self._records: dict[str, ClickMeRecords] = {}

    # ------------------------------------------------------------------ data
    @override
    def prepare_data(self) -> None:
        """Build (or check) the index of every shard once per node, before the ranks read them."""
        for shards, argument in self._shard_sets():
            for shard in expand_shards(shards, argument):
                shard_index(shard, self.index_dir)

    def _shard_sets(self) -> list[tuple[str | list[str], str]]:
        sets = [(self.train_shards, "train_shards"), (self.val_shards, "val_shards")]
        return sets + ([(self.test_shards, "test_shards")] if self.test_shards is not None else [])

    def records(self, shards: str | list[str], argument: str) -> ClickMeRecords:
        """The indexed records of a shard set (built once per set)."""
        if argument not in self._records:
            self._records[argument] = ClickMeRecords(expand_shards(shards, argument), self.num_classes, self.index_dir)
        return self._records[argument]

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

    def _seed(self) -> int:
        return self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _loader(self, dataset: Dataset, **options: Any) -> DataLoader:
        if self.worker_threads and self.num_workers > 0:
            return ThreadedDataLoader(
                dataset, num_threads=self.num_workers, pin_memory=torch.cuda.is_available(), **options
            )
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            **options,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        records = self.records(self.train_shards, "train_shards")
        unannotated = self.unannotated_samples() if self.unannotated_dir else []
        transform = train_transform(self.image_size) if self.augment else None
        # on loader threads, samples are compact and batches are finished there, into reused memory
        finish_on_threads = self.worker_threads and self.num_workers > 0 and not self.compact_batches
        preprocessing = ClickMePreprocessing(self.image_size, transform, self.compact_batches or finish_on_threads)
        dataset = ClickMeSamples(records, preprocessing, unannotated, decode=self.decode_device is None)
        self._train_preprocessing = preprocessing
        # a BatchSampler subclass with a `sampler` argument: Lightning re-creates it with its DistributedSampler
        batch_sampler = MixedBatchSampler(
            None,
            self.batch_size,
            drop_last=self.drop_last,
            annotated_ratio=self.annotated_ratio if unannotated else 1.0,
            num_annotated=len(records),
            num_unannotated=len(unannotated),
            seed=self._seed(),
        )
        collate = FinishingCollate() if finish_on_threads and self.decode_device is None else None
        return self._loader(dataset, batch_sampler=batch_sampler, collate_fn=collate)

    def _eval_loader(self, shards: str | list[str], argument: str) -> DataLoader:
        dataset = ClickMeSamples(self.records(shards, argument), ClickMePreprocessing(self.image_size))
        return self._loader(dataset, batch_size=self.batch_size, shuffle=False)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_shards, "val_shards")

    @property
    def has_test_split(self) -> bool:
        """Whether ``test_shards`` is set (``run.test_after_fit`` skips the test when it is not)."""
        return self.test_shards is not None

    @override
    def test_dataloader(self) -> DataLoader:
        if self.test_shards is None:
            raise ValueError("test_shards is not set: pass test_shards (a glob or a list) to test")
        return self._eval_loader(self.test_shards, "test_shards")

    # ---------------------------------------------------------- device side
    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Decode a raw training batch on ``decode_device`` (when set), finish a compact one (:func:`finish_batch`)."""
        if not isinstance(batch, dict):
            return batch
        if "image_jpeg" in batch:
            device = torch.device(self.decode_device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("decode_device='cuda' but no GPU is available: use decode_device=None or 'cpu'")
            target = batch["label"].device
            decoded = decode_batch(batch, self._train_preprocessing, device)
            batch = {key: value.to(target) for key, value in decoded.items()}
        return finish_batch(batch)
