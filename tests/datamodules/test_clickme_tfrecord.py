"""ClickMeTFRecordDataModule: indexed ClickMe shards, reference heatmap preprocessing, mixing, decoding, errors."""

import io
import os
import struct

import numpy as np
import pytest
import scipy.ndimage as ndimage
import torch
from PIL import Image

from datamodules import ClickMeTFRecordDataModule, ClickMeTFRecordDataset, clickme_heatmap
from datamodules.clickme_heatmap import blurred_heatmap, clickme_kernel
from datamodules.clickme_synthetic import synthetic_record, write_image_folder, write_shard
from datamodules.clickme_tfrecord import ClickMeRecords, blurred_heatmaps, expand_shards, finish_batch
from datamodules.threaded_loader import ThreadedDataLoader
from datamodules.tfrecord_index import CorruptShardError, index_candidates, masked_crc32c, shard_index

CONTRACT = {"image": torch.float32, "label": torch.int64, "heatmap": torch.float32, "has_heatmap": torch.bool}


def record(label: int, size: int = 64, seed: int = 0, **overrides):
    return synthetic_record(label, size, seed, **overrides)


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


@pytest.mark.parametrize(
    ("size", "raw_shape"),
    [((224, 224), (256, 256)), ((32, 32), (256, 256)), ((64, 64), (256, 256)),
     ((224, 224), (192, 320)), ((224, 224), (200, 130)), ((48, 48), (64, 64))],
)  # whole factors 4, 3 and 5 (picked pixels), 1; other sides (resize matrices)
def test_heatmap_preprocessing_matches_independent_computation(size, raw_shape):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, raw_shape).astype(np.uint8)
    raw[40:70, 30:90] = 255  # some structure, off-centre
    out = clickme_heatmap(torch.from_numpy(raw), size)
    assert out.shape == size and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), reference_preprocessing(raw, size), atol=2e-5)
    assert out.min() == 0 and out.max() == 1
    # batched input gives the same per map; a constant map gives zeros, not NaN
    batch = clickme_heatmap(torch.stack([torch.from_numpy(raw), torch.zeros(raw_shape, dtype=torch.uint8)]), size)
    torch.testing.assert_close(batch[0], out)
    assert (batch[1] == 0).all()


# ---------------------------------------------------------------------------------------------- loading
def test_batches_follow_the_contract(shards, tmp_path):
    val = write_shard(tmp_path / "val-0.tfrecords", [record(i, seed=50 + i) for i in range(3)])
    dm = ClickMeTFRecordDataModule(str(tmp_path / "train-*.tfrecords"), [val], image_size=32, batch_size=4,
                                   num_workers=0, num_classes=20)
    assert len(dm.train_dataloader()) == 3  # 12 records, 4 per batch: the progress bar knows the epoch
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
    assert sorted(labels.tolist()) == list(range(12)) and labels.tolist() != list(range(12))
    with pytest.raises(ValueError, match="test_shards"):
        dm.test_dataloader()


def test_random_access_and_length(shards):
    dataset = ClickMeTFRecordDataset(shards, image_size=16, num_classes=20)
    assert len(dataset) == 12
    assert [int(dataset[i]["label"]) for i in (11, 0, 7, 5)] == [11, 0, 7, 5]
    records = dataset.records
    assert records.lengths == [5, 4, 3]
    assert records.where(6) == f"{shards[1]}: record 1"
    assert records[6]["image_jpeg"] == record(6, seed=6)["image"][0]  # the very bytes that were written


def test_eval_heatmap_is_the_reference_pipeline(shards):
    dataset = ClickMeTFRecordDataset(shards[:1], image_size=48, num_classes=20)
    sample = dataset[0]
    raw = np.asarray(Image.open(io.BytesIO(record(0, seed=0)["heatmap"][0])))  # decoded by Pillow
    np.testing.assert_allclose(sample["heatmap"].numpy(), reference_preprocessing(raw, (48, 48)), atol=2e-3)
    assert sample["image"].shape == (3, 48, 48)


def test_train_augmentation_shapes(shards):
    dm = ClickMeTFRecordDataModule(shards, shards, image_size=24, batch_size=3, num_workers=0, num_classes=20)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 3, 24, 24) and batch["heatmap"].shape == (3, 24, 24)
    assert (batch["heatmap"].amax(dim=(1, 2)) > 0).all()


def imagenet_folder(tmp_path):
    folder = tmp_path / "imagenet"
    write_image_folder(folder, [3, 4], size=40)
    Image.fromarray(np.full((30, 20, 3), 90, dtype=np.uint8)).save(folder / "class0001" / "png.png")  # not a JPEG
    return str(folder)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_batch_has_the_exact_mix(shards, tmp_path, num_workers):
    dm = ClickMeTFRecordDataModule(shards, shards, image_size=16, batch_size=5, num_workers=num_workers,
                                   num_classes=20, unannotated_dir=imagenet_folder(tmp_path), annotated_ratio=0.4)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 6  # 12 records, round(0.4 * 5) = 2 per batch
    served = []
    for batch in batches:
        assert batch["image"].shape == (5, 3, 16, 16)
        assert batch["has_heatmap"].tolist() == [True, True, False, False, False]
        assert (batch["heatmap"][2:] == 0).all() and (batch["heatmap"][:2].amax(dim=(1, 2)) > 0).all()
        assert set(batch["label"][2:].tolist()) <= {0, 1}
        served += batch["label"][:2].tolist()
    assert sorted(served) == list(range(12))  # every record exactly once, across the workers
    # validation never mixes
    assert all(b["has_heatmap"].all() for b in dm.val_dataloader())


def test_decoding_after_transfer_is_the_workers_decoding(shards, tmp_path):
    """decode_device='cpu' runs the batched path of decode_device='cuda': same batch as decoding in the workers."""
    options = dict(image_size=16, batch_size=5, num_workers=0, num_classes=20, augment=False, seed=3,
                   unannotated_dir=imagenet_folder(tmp_path), annotated_ratio=0.4)
    in_workers = ClickMeTFRecordDataModule(shards, shards, **options)
    batched = ClickMeTFRecordDataModule(shards, shards, decode_device="cpu", **options)
    for plain, raw in zip(in_workers.train_dataloader(), batched.train_dataloader(), strict=True):
        assert isinstance(raw["image_jpeg"][0], bytes) and raw["heatmap_jpeg"][-1] == b""
        decoded = batched.on_after_batch_transfer(raw, 0)
        assert decoded.keys() == plain.keys()
        for key in plain:
            torch.testing.assert_close(decoded[key], plain[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="decode_device"):
        ClickMeTFRecordDataModule(shards, shards, decode_device="tpu")


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("decode_device", [None, "cpu"])
def test_compact_batches_finish_to_the_workers_batches(shards, tmp_path, augment, decode_device):
    """compact_batches ships uint8 images and blurred 64x64 maps; on_after_batch_transfer makes them the batches
    of the default path (same values), with and without augmentation, mix, and batched decoding."""
    options = dict(image_size=24, batch_size=5, num_workers=0, num_classes=20, augment=augment, seed=3,
                   unannotated_dir=imagenet_folder(tmp_path), annotated_ratio=0.4)
    full = ClickMeTFRecordDataModule(shards, shards, **options)
    compact = ClickMeTFRecordDataModule(shards, shards, compact_batches=True, decode_device=decode_device, **options)
    torch.manual_seed(0)  # the augmentation's random draws: the same sequence on both sides
    plain = list(full.train_dataloader())
    torch.manual_seed(0)
    raw = list(compact.train_dataloader())
    assert len(raw) == len(plain) == 6
    for plain_batch, raw_batch in zip(plain, raw, strict=True):
        if decode_device is None:
            assert raw_batch["image"].dtype == torch.uint8
            assert ("heatmap_blurred" in raw_batch) != augment and ("heatmap" in raw_batch) == augment
            if not augment:
                assert raw_batch["heatmap_blurred"].shape == (5, 64, 64)
        finished = compact.on_after_batch_transfer(raw_batch, 0)
        assert finished.keys() == plain_batch.keys()
        for key, dtype in CONTRACT.items():
            assert finished[key].dtype == dtype, key
        torch.testing.assert_close(finished["image"], plain_batch["image"], rtol=0, atol=0)
        torch.testing.assert_close(finished["heatmap"], plain_batch["heatmap"], rtol=0, atol=1e-6)
        peaks = finished["heatmap"][:2].amax(dim=(1, 2))  # min-max scaled before the crop of the augmentation
        assert (finished["heatmap"][2:] == 0).all() and ((peaks > 0) if augment else (peaks == 1)).all()
        for key in ("label", "has_heatmap"):
            assert finished[key].tolist() == plain_batch[key].tolist()
    # a finished (or never compact) batch passes through unchanged
    again = compact.on_after_batch_transfer(finished, 0)
    assert all(again[key] is finished[key] for key in finished)
    with pytest.raises(ValueError, match="compact_batches"):
        ClickMeTFRecordDataModule(shards, shards, compact_batches="yes")


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("compact_batches", [False, True])
def test_worker_threads_give_the_batches_of_the_plain_loader(shards, tmp_path, augment, compact_batches):
    """worker_threads=True: a ThreadedDataLoader of num_workers threads whose batches (finished on the threads, or
    compact and finished by on_after_batch_transfer) are those of the plain loader: same values without
    augmentation, same labels and mix with it; the validation loader too."""
    options = dict(image_size=24, batch_size=5, num_classes=20, augment=augment, seed=3,
                   unannotated_dir=imagenet_folder(tmp_path), annotated_ratio=0.4)
    plain = ClickMeTFRecordDataModule(shards, shards, num_workers=0, **options)
    threaded = ClickMeTFRecordDataModule(shards, shards, num_workers=2, worker_threads=True,
                                         compact_batches=compact_batches, **options)
    loader = threaded.train_dataloader()
    assert isinstance(loader, ThreadedDataLoader) and loader.num_threads == 2
    ours = [threaded.on_after_batch_transfer(batch, 0) for batch in loader]
    theirs = list(plain.train_dataloader())
    assert len(ours) == len(theirs) == 6
    for batch, expected in zip(ours, theirs, strict=True):
        assert batch.keys() == expected.keys()
        for key, dtype in CONTRACT.items():
            assert batch[key].dtype == dtype and batch[key].shape == expected[key].shape, key
        for key in ("label", "has_heatmap"):
            assert batch[key].tolist() == expected[key].tolist()
        if augment:  # random crops: only where the maps are
            assert ((batch["heatmap"].amax(dim=(1, 2)) > 0) == batch["has_heatmap"]).all()
        else:
            torch.testing.assert_close(batch["image"], expected["image"], rtol=0, atol=0)
            torch.testing.assert_close(batch["heatmap"], expected["heatmap"], rtol=0, atol=1e-6)
    val = threaded.val_dataloader()
    assert isinstance(val, ThreadedDataLoader)
    for batch, expected in zip(val, plain.val_dataloader(), strict=True):
        for key in CONTRACT:
            torch.testing.assert_close(batch[key], expected[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="worker_threads"):
        ClickMeTFRecordDataModule(shards, shards, worker_threads="yes")


def test_threaded_batches_reuse_the_memory_of_released_ones(shards):
    """FinishingCollate writes the images into pooled buffers: a batch nobody holds gives its memory to a later
    one, a batch still held keeps it."""
    dm = ClickMeTFRecordDataModule(shards, shards, image_size=24, batch_size=2, num_workers=2, num_classes=20,
                                   augment=False, worker_threads=True)
    loader = dm.train_dataloader()
    pointers = [batch["image"].data_ptr() for _ in range(3) for batch in loader]  # each batch dropped at once
    assert len(pointers) == 18 and len(set(pointers)) <= 2 * loader.prefetch_batches
    kept = list(loader)  # all held: no two share memory
    assert len({batch["image"].data_ptr() for batch in kept}) == len(kept)
    first = kept[0]["image"].clone()
    list(loader)
    torch.testing.assert_close(kept[0]["image"], first, rtol=0, atol=0)  # not overwritten by the next epoch


@pytest.mark.parametrize("compact", [False, True])
def test_a_batch_of_items_is_the_items_one_by_one(shards, compact):
    """__getitems__ (what the DataLoaders call) prepares the maps of a batch together: the same samples as one
    index at a time, in the order asked."""
    dataset = ClickMeTFRecordDataset(shards, image_size=24, num_classes=20, compact=compact)
    order = [7, 0, 11, 3, 3]
    together = dataset.__getitems__(order)
    assert [int(sample["label"]) for sample in together] == order
    for sample, i in zip(together, order, strict=True):
        alone = dataset[i]
        assert sample.keys() == alone.keys()
        for key in sample:
            torch.testing.assert_close(sample[key], alone[key], rtol=0, atol=1e-6 if "heatmap" in key else 0)


def test_blurred_maps_of_several_sizes_keep_their_order():
    rng = np.random.default_rng(1)
    maps = [torch.from_numpy(rng.integers(0, 256, shape).astype(np.uint8))
            for shape in ((256, 256), (192, 320), (256, 256), (64, 64))]
    listed = [maps[0], None, maps[1], maps[2], None, maps[3]]
    blurred = blurred_heatmaps(listed)
    assert blurred[1] is None and blurred[4] is None
    for got, heatmap in zip(blurred, listed, strict=True):
        if heatmap is not None:
            torch.testing.assert_close(got, blurred_heatmap(heatmap), rtol=1e-5, atol=1e-4)
    assert blurred_heatmaps([None, None]) == [None, None]


def test_compact_dataset_heatmap_is_the_reference_pipeline(shards):
    """The compact sample's blurred map, finished alone, is the reference preprocessing (as the full sample)."""
    dataset = ClickMeTFRecordDataset(shards[:1], image_size=48, num_classes=20, compact=True)
    sample = dataset[0]
    assert sample["image"].dtype == torch.uint8 and sample["heatmap_blurred"].shape == (64, 64)
    batch = finish_batch({key: value[None] for key, value in sample.items()})
    raw = np.asarray(Image.open(io.BytesIO(record(0, seed=0)["heatmap"][0])))  # decoded by Pillow
    np.testing.assert_allclose(batch["heatmap"][0].numpy(), reference_preprocessing(raw, (48, 48)), atol=2e-3)
    full = ClickMeTFRecordDataset(shards[:1], image_size=48, num_classes=20)[0]
    torch.testing.assert_close(batch["image"][0], full["image"], rtol=0, atol=0)


def test_photo_like_records_are_smooth_jpegs(tmp_path):
    """kind="photo" (the benchmark's natural-image stand-in): a valid record whose picture is far smoother than
    noise (neighbouring pixels close) and compresses better; the dataset reads it like any other."""
    photo, noise = record(0, size=256, kind="photo"), record(0, size=256)
    pixels = {name: np.asarray(Image.open(io.BytesIO(r["image"][0])), dtype=np.float64) for name, r in
              (("photo", photo), ("noise", noise))}
    steps = {name: np.abs(np.diff(p, axis=1)).mean() for name, p in pixels.items()}
    assert pixels["photo"].shape == (256, 256, 3) and steps["photo"] < steps["noise"] / 4
    assert len(photo["image"][0]) < len(noise["image"][0]) / 2
    shard = write_shard(tmp_path / "photo.tfrecords", [photo])
    assert ClickMeTFRecordDataset(shard, image_size=32, num_classes=5)[0]["image"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="kind"):
        record(0, kind="drawing")


def test_batched_decoding_names_the_bad_record(tmp_path):
    shard = write_shard(tmp_path / "bad.tfrecords", [record(0), record(1, heatmap=(b"\xff\xd8junk", "byte"))])
    dm = ClickMeTFRecordDataModule(shard, shard, image_size=16, batch_size=2, num_workers=0, num_classes=5,
                                   decode_device="cpu")
    raw = next(iter(dm.train_dataloader()))
    with pytest.raises(ValueError, match=r"bad\.tfrecords: record 1: feature 'heatmap' is not a readable image"):
        dm.on_after_batch_transfer(raw, 0)


# ------------------------------------------------------------------------------------------------ index
def test_index_is_the_tfrecord2idx_format_and_works_with_the_tfrecord_package(shards, tmp_path):
    from tfrecord.tools.tfrecord2idx import create_index
    from tfrecord.torch.dataset import TFRecordDataset

    rows = shard_index(shards[0])
    index_file = tmp_path / "train-0.tfindex"  # beside the shard, tfrecord2idx's naming
    assert index_candidates(shards[0])[0] == index_file and index_file.is_file()
    create_index(shards[0], str(tmp_path / "theirs.idx"))
    theirs = np.loadtxt(tmp_path / "theirs.idx", dtype=np.int64)
    np.testing.assert_array_equal(rows, theirs)
    np.testing.assert_array_equal(np.loadtxt(index_file, dtype=np.int64), theirs)  # the comment line is skipped
    served = TFRecordDataset(shards[0], str(index_file), {"label": "int"}, shuffle_queue_size=None)
    assert sorted(int(item["label"][0]) for item in served) == [0, 1, 2, 3, 4]


def test_index_is_reused_and_rebuilt_when_the_shard_changes(shards):
    index_file = index_candidates(shards[0])[0]
    first = shard_index(shards[0])
    stamp = index_file.stat().st_mtime_ns
    np.testing.assert_array_equal(shard_index(shards[0]), first)
    assert index_file.stat().st_mtime_ns == stamp  # read, not rebuilt
    # rewrite the shard with other records: the dataset must see the new ones
    write_shard(shards[0], [record(7, seed=70 + i) for i in range(2)])
    assert len(ClickMeRecords([shards[0]], num_classes=20)) == 2
    assert len(shard_index(shards[0])) == 2
    # a touch alone (same bytes, new mtime) also makes the index stale: rebuilt, same rows
    stat = os.stat(shards[0])
    os.utime(shards[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    before = index_file.read_text()
    assert len(shard_index(shards[0])) == 2
    assert index_file.read_text() != before and index_file.read_text().split("\n", 1)[1] == before.split("\n", 1)[1]
    # an index written by tfrecord2idx (no fingerprint line) is rebuilt, not trusted
    index_file.write_text("0 10\n")
    assert len(shard_index(shards[0])) == 2


def test_index_of_a_read_only_folder_goes_to_the_cache(tmp_path, monkeypatch):
    import datamodules.tfrecord_index as tfrecord_index

    folder = tmp_path / "readonly"
    folder.mkdir()
    shard = write_shard(folder / "train-0.tfrecords", [record(i, seed=i) for i in range(3)])
    folder.chmod(0o555)
    mkstemp = tfrecord_index.tempfile.mkstemp

    def refuse_in_folder(*args, dir=None, **kwargs):  # what the OS says to a non-root user (tests may run as root)
        if os.path.samefile(dir, folder):
            raise PermissionError(13, "Permission denied", str(dir))
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tfrecord_index.tempfile, "mkstemp", refuse_in_folder)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    try:
        assert len(shard_index(shard)) == 3
        assert not (folder / "train-0.tfindex").exists()
        (cached,) = (tmp_path / "cache").rglob("*.tfindex")
        assert cached == index_candidates(shard)[1]
        stamp = cached.stat().st_mtime_ns
        assert len(ClickMeRecords([shard], num_classes=5)) == 3
        assert cached.stat().st_mtime_ns == stamp  # found in the cache, not rebuilt
    finally:
        folder.chmod(0o755)
    # an explicit index_dir is used whatever the shard folder
    assert len(ClickMeRecords([shard], num_classes=5, index_dir=str(tmp_path / "mine"))) == 3
    assert len(list((tmp_path / "mine").glob("*.tfindex"))) == 1


# ------------------------------------------------------------------------------------------------ errors
def test_masked_crc_is_tensorflows():
    from tfrecord.writer import TFRecordWriter

    for data in (b"", b"abc", bytes(range(256)) * 3):
        assert masked_crc32c(data).to_bytes(4, "little") == TFRecordWriter.masked_crc(data)
    # written out: crc32c("123456789") = 0xe3069283 (the standard check value), then the mask
    crc = 0xE3069283
    assert masked_crc32c(b"123456789") == ((((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def corrupt(path, position, value: bytes):
    data = bytearray(open(path, "rb").read())
    data[position : position + len(value)] = value
    open(path, "wb").write(bytes(data))


def two_record_shard(tmp_path, name):
    shard = write_shard(tmp_path / name, [record(0), record(1)])
    second = struct.unpack("<Q", open(shard, "rb").read(8))[0] + 16  # offset of record 1
    return shard, second


def test_bad_data_crc_names_shard_and_record(tmp_path):
    shard, second = two_record_shard(tmp_path, "flip.tfrecords")
    data = open(shard, "rb").read()
    corrupt(shard, second + 40, bytes([data[second + 40] ^ 0x01]))  # one bit of record 1's data
    with pytest.raises(CorruptShardError, match=r"flip\.tfrecords: record 1: data checksum mismatch"):
        ClickMeTFRecordDataset([shard], image_size=16, num_classes=5)


def test_bad_length_crc_names_shard_and_record(tmp_path):
    shard, second = two_record_shard(tmp_path, "length.tfrecords")
    corrupt(shard, second + 8, b"\x00\x00\x00\x00")  # record 1's length checksum
    with pytest.raises(CorruptShardError, match=r"length\.tfrecords: record 1: length checksum mismatch"):
        ClickMeTFRecordDataset([shard], image_size=16, num_classes=5)


def test_absurd_length_is_refused_not_allocated(tmp_path):
    shard, second = two_record_shard(tmp_path, "huge.tfrecords")
    length = struct.pack("<Q", 2**62)
    corrupt(shard, second, length + masked_crc32c(length).to_bytes(4, "little"))  # a valid checksum, absurd value
    with pytest.raises(CorruptShardError, match=r"huge\.tfrecords: record 1: record length 4611686018427387904 is "
                                                r"larger than what is left of the file"):
        ClickMeTFRecordDataset([shard], image_size=16, num_classes=5)


def test_truncated_shard_names_shard_and_record(tmp_path):
    shard = write_shard(tmp_path / "cut.tfrecords", [record(0), record(1)])
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) - 100])
    with pytest.raises(CorruptShardError, match=r"cut\.tfrecords: record 1: record length \d+ is larger than what"):
        ClickMeTFRecordDataset([shard], image_size=16, num_classes=5)
    open(shard, "wb").write(data + b"\x01\x02\x03")  # a few stray bytes after the last record
    with pytest.raises(CorruptShardError, match=r"cut\.tfrecords: record 2: truncated header"):
        ClickMeTFRecordDataset([shard], image_size=16, num_classes=5)


def test_empty_shard_is_refused(tmp_path, shards):
    empty = tmp_path / "empty.tfrecords"
    empty.write_bytes(b"")
    with pytest.raises(CorruptShardError, match=r"empty\.tfrecords: empty shard"):
        ClickMeTFRecordDataModule([shards[0], str(empty)], shards, num_workers=0, num_classes=20).prepare_data()


def test_shard_changed_after_indexing_is_caught_at_read_time(tmp_path):
    shard, second = two_record_shard(tmp_path, "changed.tfrecords")
    dataset = ClickMeTFRecordDataset([shard], image_size=16, num_classes=5)
    data = open(shard, "rb").read()
    corrupt(shard, second + 40, bytes([data[second + 40] ^ 0x80]))
    assert int(dataset[0]["label"]) == 0
    with pytest.raises(CorruptShardError, match=r"changed\.tfrecords: record 1: data checksum mismatch"):
        dataset[1]


def test_corrupt_jpeg_names_shard_and_record(tmp_path):
    shard = write_shard(tmp_path / "bad.tfrecords", [record(0), record(1, image=(b"not a jpeg", "byte"))])
    dataset = ClickMeTFRecordDataset([shard], image_size=16, num_classes=5)
    with pytest.raises(ValueError, match=r"bad\.tfrecords: record 1: feature 'image' is not a readable image"):
        list(dataset)


def test_missing_feature_names_shard_and_record(tmp_path):
    shard = write_shard(tmp_path / "nomap.tfrecords", [record(0, heatmap=None)])
    with pytest.raises(ValueError, match=r"nomap\.tfrecords: record 0: missing feature\(s\) \['heatmap'\]"):
        list(ClickMeTFRecordDataset([shard], image_size=16, num_classes=5))


def test_label_out_of_range_names_shard_and_record(tmp_path):
    shard = write_shard(tmp_path / "labels.tfrecords", [record(0), record(1), record(7)])
    with pytest.raises(ValueError, match=r"labels\.tfrecords: record 2: label 7 is out of range \[0, 5\)"):
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
    with pytest.raises(ValueError, match="rounds to 0 annotated items per batch"):
        ClickMeTFRecordDataModule(shards, shards, batch_size=4, annotated_ratio=0.1, unannotated_dir=str(tmp_path))
    dm = ClickMeTFRecordDataModule(shards, shards, num_workers=0, unannotated_dir=str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="unannotated_dir .*absent does not exist"):
        dm.train_dataloader()
