"""ClickMeTFRecordDataModule: ClickMe shards, reference heatmap preprocessing, sharding, mixing, errors."""

import io

import numpy as np
import pytest
import scipy.ndimage as ndimage
import torch
from PIL import Image
from tfrecord.writer import TFRecordWriter
from torch.utils.data import DataLoader

from datamodules import ClickMeTFRecordDataModule, clickme_heatmap
from datamodules.clickme_heatmap import clickme_kernel
from datamodules.clickme_tfrecord import ClickMeTFRecordDataset, expand_shards

CONTRACT = {"image": torch.float32, "label": torch.int64, "heatmap": torch.float32, "has_heatmap": torch.bool}


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def record(label: int, size: int = 64, seed: int = 0, **overrides):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    blob = np.exp(-((yy - size * 0.3) ** 2 + (xx - size * 0.6) ** 2) / (2 * (size / 8) ** 2))
    heatmap = (255 * blob).astype(np.uint8)
    datum = {"image": (jpeg(image), "byte"), "heatmap": (jpeg(heatmap), "byte"), "label": (label, "int")}
    datum.update(overrides)
    return {key: value for key, value in datum.items() if value is not None}


def write_shard(path, records):
    writer = TFRecordWriter(str(path))
    for datum in records:
        writer.write(datum)
    writer.close()
    return str(path)


@pytest.fixture
def shards(tmp_path):
    """3 shards of 5, 4 and 3 records; the label of record k (over all shards) is k."""
    paths, k = [], 0
    for s, count in enumerate((5, 4, 3)):
        paths.append(write_shard(tmp_path / f"train-{s}.tfrecords", [record(k + i, seed=k + i) for i in range(count)]))
        k += count
    return paths


# ----------------------------------------------------------------------- reference heatmap preprocessing
def tf_resize_bilinear(array: np.ndarray, size) -> np.ndarray:
    """tf.image.resize(method='bilinear') of TF2: half-pixel centres, edge clamp, no antialias."""
    coords = []
    for n_in, n_out in zip(array.shape, size):
        centres = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        coords.append(np.clip(centres, 0, n_in - 1))
    grid = np.meshgrid(*coords, indexing="ij")
    return ndimage.map_coordinates(array.astype(np.float64), grid, order=1, mode="nearest")


def reference_kernel() -> np.ndarray:
    # serre-lab/Harmonization blur.py: x = tf.range(-(size-1)//2, (size-1)//2 + 1), y the reverse range,
    # exp(-(x^2 + y^2) / (2 sigma^2)) normalized, size 10, sigma 10
    x = np.arange(-5, 5)
    y = np.arange(4, -6, -1)
    kernel = np.exp(-(x[None, :] ** 2 + y[:, None] ** 2) / (2 * 10.0**2))
    return kernel / kernel.sum()


def reference_preprocessing(heatmap: np.ndarray, size) -> np.ndarray:
    small = tf_resize_bilinear(heatmap, (64, 64))
    # tf.nn.conv2d(padding='SAME') with a 10x10 kernel: cross-correlation, zero padding 4 before / 5 after,
    # i.e. out[i] = sum_a k[a] x[i + a - 4]: scipy's correlate centres an even kernel at 5 + origin -> origin -1
    blurred = ndimage.correlate(small, reference_kernel(), mode="constant", cval=0.0, origin=(-1, -1))
    out = tf_resize_bilinear(blurred, size)
    return (out - out.min()) / (out.max() - out.min())


def test_kernel_matches_the_reference_formula():
    kernel = clickme_kernel()
    assert kernel.shape == (10, 10)
    np.testing.assert_allclose(kernel.numpy(), reference_kernel(), atol=1e-7)
    # the even grid is off-centre: rows peak at tap 4, columns at tap 5
    assert kernel.sum(dim=1).argmax() == 4 and kernel.sum(dim=0).argmax() == 5


@pytest.mark.parametrize("size", [(224, 224), (32, 32), (64, 64)])
def test_heatmap_preprocessing_matches_independent_computation(size):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (256, 256)).astype(np.uint8)
    raw[100:140, 30:90] = 255  # some structure, off-centre
    out = clickme_heatmap(torch.from_numpy(raw), size)
    assert out.shape == size and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), reference_preprocessing(raw, size), atol=2e-5)
    assert out.min() == 0 and out.max() == 1
    # batched input gives the same per map; a constant map gives zeros, not NaN
    batch = clickme_heatmap(torch.stack([torch.from_numpy(raw), torch.zeros(256, 256, dtype=torch.uint8)]), size)
    torch.testing.assert_close(batch[0], out)
    assert (batch[1] == 0).all()


# ---------------------------------------------------------------------------------------------- loading
def test_batches_follow_the_contract(shards, tmp_path):
    val = write_shard(tmp_path / "val-0.tfrecords", [record(i, seed=50 + i) for i in range(3)])
    dm = ClickMeTFRecordDataModule(str(tmp_path / "train-*.tfrecords"), [val], image_size=32, batch_size=4,
                                   num_workers=0, num_classes=20, shuffle_buffer=4)
    for loader, b in ((dm.train_dataloader(), 4), (dm.val_dataloader(), 3)):  # val holds 3 records
        batch = next(iter(loader))
        for key, dtype in CONTRACT.items():
            assert batch[key].dtype == dtype, key
        assert batch["image"].shape == (b, 3, 32, 32) and batch["heatmap"].shape == (b, 32, 32)
        assert batch["has_heatmap"].all()
        assert 0 <= batch["image"].min() and batch["image"].max() <= 1
        assert 0 <= batch["heatmap"].min() and batch["heatmap"].max() <= 1
    # training order is shuffled but complete: every record once per epoch
    labels = torch.cat([b["label"] for b in dm.train_dataloader()])
    assert sorted(labels.tolist()) == list(range(12))
    with pytest.raises(ValueError, match="test_shards"):
        dm.test_dataloader()


def test_eval_heatmap_is_the_reference_pipeline(shards):
    dataset = ClickMeTFRecordDataset(shards[:1], image_size=48, num_classes=20)
    sample = next(iter(dataset))
    raw = np.asarray(Image.open(io.BytesIO(record(0, seed=0)["heatmap"][0])))  # decoded by Pillow
    np.testing.assert_allclose(sample["heatmap"].numpy(), reference_preprocessing(raw, (48, 48)), atol=2e-3)
    assert sample["image"].shape == (3, 48, 48)


def test_train_augmentation_shapes(shards):
    dm = ClickMeTFRecordDataModule(shards, shards, image_size=24, batch_size=3, num_workers=0, num_classes=20)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 3, 24, 24) and batch["heatmap"].shape == (3, 24, 24)
    assert (batch["heatmap"].amax(dim=(1, 2)) > 0).all()


def labels_served(dataset, num_workers):
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return [int(sample["label"]) for sample in loader]


def test_each_record_once_across_two_workers(shards):
    # 3 shards >= 2 consumers: whole shards per worker
    dataset = ClickMeTFRecordDataset(shards, image_size=16, num_classes=20)
    served = labels_served(dataset, num_workers=2)
    assert sorted(served) == list(range(12))


def test_each_record_once_across_ranks_and_workers(shards):
    # 2 ranks x 2 workers = 4 consumers > 3 shards: records are split within the shards
    served = []
    for rank in range(2):
        dataset = ClickMeTFRecordDataset(shards, image_size=16, num_classes=20, rank=rank, world_size=2)
        served += labels_served(dataset, num_workers=2)
    assert sorted(served) == list(range(12))
    # and with one shard and two ranks in the main process
    served = []
    for rank in range(2):
        dataset = ClickMeTFRecordDataset(shards[:1], image_size=16, num_classes=20, rank=rank, world_size=2)
        part = labels_served(dataset, num_workers=0)
        assert len(part) in (2, 3)
        served += part
    assert sorted(served) == list(range(5))


def test_unannotated_images_are_mixed_at_the_ratio(shards, tmp_path):
    folder = tmp_path / "imagenet"
    for cls, count in (("n001", 3), ("n002", 4)):
        (folder / cls).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((40, 30, 3), 40 * i, dtype=np.uint8)).save(folder / cls / f"{i}.jpg")
    dm = ClickMeTFRecordDataModule(shards, shards, image_size=16, batch_size=1, num_workers=0, num_classes=20,
                                   unannotated_dir=str(folder), annotated_ratio=0.25)
    samples = [dict(sample) for sample in dm.train_dataloader()]
    flags = torch.cat([s["has_heatmap"] for s in samples])
    assert flags.sum() == 12  # every annotated record once
    assert len(samples) == 12 * 4  # 1 annotated for 3 unannotated
    counts = torch.cumsum(flags.float(), 0)  # at every prefix, the annotated count is within 1 of 25%
    assert ((counts - 0.25 * torch.arange(1, len(flags) + 1)).abs() <= 1).all(), flags
    for s in samples:
        if not s["has_heatmap"]:
            assert (s["heatmap"] == 0).all() and s["label"].item() in (0, 1)
            assert s["image"].shape == (1, 3, 16, 16)
    # validation never mixes
    assert all(b["has_heatmap"].all() for b in dm.val_dataloader())


# ------------------------------------------------------------------------------------------------ errors
def test_corrupt_jpeg_names_shard_and_record(tmp_path):
    shard = write_shard(tmp_path / "bad.tfrecords", [record(0), record(1, image=(b"not a jpeg", "byte"))])
    dataset = ClickMeTFRecordDataset([shard], image_size=16, num_classes=5)
    with pytest.raises(ValueError, match=r"bad\.tfrecords: record 1: feature 'image' is not a readable JPEG"):
        list(dataset)


def test_missing_feature_names_shard_and_record(tmp_path):
    shard = write_shard(tmp_path / "nomap.tfrecords", [record(0, heatmap=None)])
    with pytest.raises(ValueError, match=r"nomap\.tfrecords: record 0: missing feature\(s\) \['heatmap'\]"):
        list(ClickMeTFRecordDataset([shard], image_size=16, num_classes=5))


def test_label_out_of_range_names_shard_and_record(tmp_path):
    shard = write_shard(tmp_path / "labels.tfrecords", [record(0), record(1), record(7)])
    with pytest.raises(ValueError, match=r"labels\.tfrecords: record 2: label 7 is out of range \[0, 5\)"):
        list(ClickMeTFRecordDataset([shard], image_size=16, num_classes=5))


def test_truncated_shard_names_shard_and_record(tmp_path):
    shard = write_shard(tmp_path / "cut.tfrecords", [record(0), record(1)])
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) - 100])
    with pytest.raises(RuntimeError, match=r"cut\.tfrecords: record 1: corrupt TFRecord framing"):
        list(ClickMeTFRecordDataset([shard], image_size=16, num_classes=5))


def test_shard_arguments(shards, tmp_path):
    assert expand_shards(str(tmp_path / "train-*.tfrecords")) == shards
    assert expand_shards([shards[2], str(tmp_path / "train-*.tfrecords")]) == [shards[2], shards[0], shards[1]]
    with pytest.raises(FileNotFoundError, match=r"val_shards: no shard file matches .*nothing-\*"):
        expand_shards(str(tmp_path / "nothing-*"), "val_shards")
    with pytest.raises(FileNotFoundError, match="no shard file matches"):
        expand_shards([str(tmp_path / "missing.tfrecords")])


def test_bad_ratio_and_unannotated_dir(shards, tmp_path):
    with pytest.raises(ValueError, match="annotated_ratio"):
        ClickMeTFRecordDataModule(shards, shards, annotated_ratio=0.0)
    dm = ClickMeTFRecordDataModule(shards, shards, num_workers=0, unannotated_dir=str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="unannotated_dir .*absent does not exist"):
        dm.train_dataloader()
