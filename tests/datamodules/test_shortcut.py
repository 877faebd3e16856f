"""ShortcutShapesDataModule: the synthetic shortcut data set."""

import lightning as L
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from datamodules import ShortcutShapesDataModule
from datamodules.augmentation import pad_crop_flip
from datamodules.shapes import SHAPE_NAMES, blur_matrix, blur_radius, blur_sigma, watermark_palette

CONTRACT = {
    "image": torch.float32,
    "label": torch.int64,
    "heatmap": torch.float32,
    "has_heatmap": torch.bool,
    "spurious_mask": torch.bool,  # the contract's optional key: the watermark
}


@pytest.fixture(scope="module")
def data():
    dm = ShortcutShapesDataModule(train_size=2000, val_size=200, test_size=400, batch_size=50, seed=5)
    dm.setup()
    return dm


def images(dm, split):
    return dm.dataset(split).images.float() / 255


def watermark_class_from_pixels(dm, split):
    """Read the watermark's class back from its pixels: nearest palette colour."""
    ds = dm.dataset(split)
    patch = images(dm, split)[:, :, : dm.watermark_size, : dm.watermark_size].mean(dim=(2, 3))
    return torch.cdist(patch, watermark_palette(dm.num_classes)).argmin(dim=1), ds


def test_batches_follow_the_contract(data):
    loaders = {"train": data.train_dataloader(), "val": data.val_dataloader()}
    iid, flipped = data.test_dataloader()
    loaders.update(iid=iid, flipped=flipped)
    assert data.test_split_names == ("iid", "flipped")
    for name, loader in loaders.items():
        batch = next(iter(loader))
        assert set(batch) == set(CONTRACT), name
        for key, dtype in CONTRACT.items():
            assert batch[key].dtype == dtype, (name, key)
        assert batch["image"].shape == (50, 3, 32, 32)
        assert batch["label"].shape == (50,) and batch["has_heatmap"].shape == (50,)
        assert batch["heatmap"].shape == (50, 32, 32)
        assert 0 <= batch["image"].min() and batch["image"].max() <= 1
        assert 0 <= batch["heatmap"].min() and batch["heatmap"].max() <= 1
        assert 0 <= batch["label"].min() and batch["label"].max() < data.num_classes
    assert data.class_names == list(SHAPE_NAMES[:4]) and data.num_classes == 4
    assert len(iid.dataset) == len(flipped.dataset) == 400


def test_watermark_agrees_with_label_at_the_shortcut_rate(data):
    for split in ("train", "val", "iid"):
        shown, ds = watermark_class_from_pixels(data, split)
        torch.testing.assert_close(shown, ds.watermark_labels)  # the pixels show the recorded class
        rate = (shown == ds.labels).float().mean().item()
        n = len(ds)
        tolerance = 5 * (0.9 * 0.1 / n) ** 0.5  # 5 binomial standard deviations
        assert abs(rate - 0.9) < tolerance, (split, rate)
    # when it disagrees, it shows every wrong class
    shown, ds = watermark_class_from_pixels(data, "train")
    wrong = shown != ds.labels
    offsets = torch.unique((shown[wrong] - ds.labels[wrong]) % data.num_classes)
    assert offsets.tolist() == [1, 2, 3]


def test_flipped_watermark_is_always_wrong_and_only_the_watermark_differs(data):
    shown, ds = watermark_class_from_pixels(data, "flipped")
    assert (shown != ds.labels).all()
    # flipped = iid scenes with another watermark: the images differ only inside watermark_mask()
    differs = (images(data, "iid") != images(data, "flipped")).any(dim=1).any(dim=0)
    assert (differs & ~data.watermark_mask()).sum() == 0
    assert differs.any()
    torch.testing.assert_close(data.dataset("iid").labels, ds.labels)


def test_watermark_mask(data):
    mask = data.watermark_mask()
    assert mask.dtype == torch.bool and mask.shape == (32, 32)
    assert mask[:4, :4].all() and mask.sum() == 16
    assert data.watermark_mask(64).sum() == 64 and data.watermark_mask(64)[:8, :8].all()


def test_human_map_covers_the_object_and_never_the_watermark(data):
    for split in ("train", "val", "iid", "flipped"):
        ds = data.dataset(split)
        assert (ds.heatmaps[:, data.watermark_mask()] == 0).all(), split
        assert torch.allclose(ds.heatmaps.amax(dim=(1, 2)), torch.ones(len(ds)))  # every image carries a map
    # the map's support is where the image differs from its background (object pixels), nothing else
    ds = data.dataset("val")
    pictures = images(data, "val")
    background = (ds.heatmaps == 0) & ~data.watermark_mask()
    for i in range(len(ds)):
        pixels = pictures[i].flatten(1).T  # [H*W, 3]
        grey = pixels[background[i].flatten()].median(dim=0).values
        distance = (pixels - grey).norm(dim=1).view(32, 32)
        assert (distance[ds.heatmaps[i] >= 0.99] > 0.15).float().mean() > 0.95, i
        assert (distance[background[i]] < 0.25).float().mean() > 0.95, i


@pytest.mark.parametrize("image_size, num_classes", [(16, 8), (24, 3), (64, 4)])
def test_other_sizes_keep_the_guarantees(image_size, num_classes):
    dm = ShortcutShapesDataModule(num_classes, image_size, train_size=64, val_size=8, test_size=8, batch_size=8)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, image_size, image_size) and batch["heatmap"].shape[1:] == (image_size,) * 2
    for split in ("train", "iid", "flipped"):
        ds = dm.dataset(split)
        assert (ds.heatmaps[:, dm.watermark_mask()] == 0).all()
        assert (ds.heatmaps.amax(dim=(1, 2)) == 1).all()  # every image shows an object
    assert set(dm.dataset("train").labels.tolist()) == set(range(num_classes))


def test_colour_does_not_encode_the_class(data):
    ds = data.dataset("train")
    pictures = images(data, "train")
    core = ds.heatmaps >= 0.99
    colour = torch.stack([pictures[i][:, core[i]].mean(dim=1) for i in range(len(ds))])
    means = torch.stack([colour[ds.labels == k].mean(dim=0) for k in range(data.num_classes)])
    assert (means - colour.mean(dim=0)).abs().max() < 0.06


def test_same_seed_same_data_other_seed_other_data():
    a = ShortcutShapesDataModule(train_size=100, val_size=20, test_size=20, seed=1)
    b = ShortcutShapesDataModule(train_size=100, val_size=20, test_size=20, seed=1)
    c = ShortcutShapesDataModule(train_size=100, val_size=20, test_size=20, seed=2)
    for split in ("train", "val", "iid", "flipped"):
        da, db, dc = a.dataset(split), b.dataset(split), c.dataset(split)
        assert torch.equal(da.images, db.images) and torch.equal(da.heatmaps, db.heatmaps)
        assert torch.equal(da.labels, db.labels) and torch.equal(da.has_heatmap, db.has_heatmap)
        assert not torch.equal(da.images, dc.images)


def test_folds_partition_the_training_set():
    full = ShortcutShapesDataModule(train_size=300, val_size=10, test_size=10, seed=4)
    k = 3
    parts = [
        ShortcutShapesDataModule(train_size=300, val_size=10, test_size=10, seed=4, num_folds=k, fold=f)
        for f in range(k)
    ]
    folds = parts[0].fold_of_sample
    assert folds.dtype == torch.int64 and folds.shape == (300,)
    for part in parts:
        torch.testing.assert_close(part.fold_of_sample, folds)  # the same assignment whatever the fold
    everything = full.dataset("train").images
    seen = torch.zeros(300, dtype=torch.long)
    for f, part in enumerate(parts):
        assert torch.equal(part.dataset("train").images, everything[folds != f])
        assert torch.equal(part.dataset("heldout").images, everything[folds == f])
        seen += (folds == f).long()
        batch = next(iter(part.heldout_dataloader()))
        assert set(batch) == set(CONTRACT)
    assert (seen == 1).all()  # each sample is held out by exactly one model
    with pytest.raises(ValueError, match="num_folds > 1"):
        full.heldout_dataloader()


def test_annotated_fraction_applies_to_train_only():
    dm = ShortcutShapesDataModule(train_size=200, val_size=30, test_size=30, annotated_fraction=0.25)
    train = dm.dataset("train")
    assert train.has_heatmap.sum() == 50
    assert (train.heatmaps[~train.has_heatmap] == 0).all()
    assert (train.heatmaps[train.has_heatmap].amax(dim=(1, 2)) == 1).all()
    for split in ("val", "iid", "flipped"):
        assert dm.dataset(split).has_heatmap.all()


def test_blur_matrix_matches_torchvision():
    for size in (8, 32, 48):
        maps = torch.rand(4, size, size)
        blur = blur_matrix(size)
        radius = blur_radius(size)
        expected = TF.gaussian_blur(maps[:, None], [2 * radius + 1] * 2, [blur_sigma(size)] * 2)[:, 0]
        torch.testing.assert_close(blur @ maps @ blur.T, expected, atol=1e-5, rtol=0)


def test_augmentation_keeps_map_on_object():
    # train batches are augmented: a data set whose pictures ARE their maps must stay so after crop and flip
    dm = ShortcutShapesDataModule(train_size=64, val_size=10, test_size=10, batch_size=64)
    train = dm.dataset("train")
    train.images = (train.heatmaps * 255).round().to(torch.uint8)[:, None].expand(-1, 3, -1, -1).contiguous()
    batch = next(iter(dm.train_dataloader()))
    torch.testing.assert_close(batch["image"], batch["heatmap"][:, None].expand(-1, 3, -1, -1), atol=0.5 / 255, rtol=0)
    # ... and it really is augmented: some maps moved (shift or flip) relative to the stored ones
    moved = sum(not any(torch.equal(h, s) for s in train.heatmaps) for h in batch["heatmap"])
    assert moved > 32


def test_spurious_mask_is_the_watermark_and_follows_the_augmentation():
    dm = ShortcutShapesDataModule(train_size=64, val_size=16, test_size=16, batch_size=64)
    for loader in (dm.val_dataloader(), *dm.test_dataloader()):  # not augmented: exactly the watermark's pixels
        masks = next(iter(loader))["spurious_mask"]
        assert masks.shape == (16, 32, 32) and (masks == dm.watermark_mask()).all()
    # train: pictures that ARE the watermark mask must still coincide with the mask after crop and flip
    train = dm.dataset("train")
    train.images = (dm.watermark_mask() * 255).to(torch.uint8).expand(len(train), 3, -1, -1).contiguous()
    batch = next(iter(dm.train_dataloader()))
    assert torch.equal(batch["image"][:, 0] > 0.5, batch["spurious_mask"])
    moved = sum(not torch.equal(mask, dm.watermark_mask()) for mask in batch["spurious_mask"])
    assert moved > 32  # shifted or flipped with the image
    flipped = batch["spurious_mask"][:, :, 16:].flatten(1).any(1)  # in the right half: a horizontal flip
    assert 0 < int(flipped.sum()) < 64


def test_pad_crop_flip_matches_padded_crop_semantics():
    # every output is a window of the zero-padded input, possibly mirrored, the same for image and map
    images = torch.arange(6 * 3 * 8 * 8, dtype=torch.float32).view(6, 3, 8, 8)
    heatmaps = images[:, 0] * 10
    out_images, out_maps = pad_crop_flip(images, heatmaps, padding=2)
    assert out_images.shape == images.shape and out_maps.shape == heatmaps.shape
    torch.testing.assert_close(out_maps, out_images[:, 0] * 10)
    padded = torch.nn.functional.pad(images, [2] * 4)
    for n in range(6):
        windows = [padded[n, :, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        windows += [w.flip(-1) for w in windows]
        assert any(torch.equal(out_images[n], w) for w in windows)
    # the uint8 path gives the same as the float path for the same draw
    torch.manual_seed(1)
    a = pad_crop_flip(images.to(torch.uint8), heatmaps, 2)[0]
    torch.manual_seed(1)
    b = pad_crop_flip(images.to(torch.uint8).float(), heatmaps, 2)[0]
    torch.testing.assert_close(a.float(), b)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        ShortcutShapesDataModule(num_classes=9)
    with pytest.raises(ValueError, match="shortcut_prob"):
        ShortcutShapesDataModule(shortcut_prob=1.5)
    with pytest.raises(ValueError, match="watermark_size"):
        ShortcutShapesDataModule(watermark_size=16)
    with pytest.raises(ValueError, match="fold"):
        ShortcutShapesDataModule(num_folds=2, fold=2)
    with pytest.raises(ValueError, match="object_size"):
        ShortcutShapesDataModule(object_size=(0.3, 0.2))
    with pytest.raises(ValueError, match="noise_std"):
        ShortcutShapesDataModule(noise_std=-0.1)
    with pytest.raises(KeyError, match="unknown split"):
        ShortcutShapesDataModule(train_size=10, val_size=10, test_size=10).dataset("nope")


def test_object_size_and_noise_knobs():
    def first_batch(**options):
        dm = ShortcutShapesDataModule(train_size=8, val_size=64, test_size=8, batch_size=64, **options)
        dm.setup("fit")
        return next(iter(dm.val_dataloader()))

    small, large = first_batch(object_size=(0.1, 0.12)), first_batch(object_size=(0.3, 0.32))
    # the human map is the (blurred) object: its area grows with the shape's half-width
    assert (small["heatmap"] > 0.5).float().mean() < 0.5 * (large["heatmap"] > 0.5).float().mean()
    # without noise an image holds three flat colours (background, shape, watermark); with the default noise, many
    for image in first_batch(noise_std=0.0)["image"][:8]:
        assert image.flatten(1).unique(dim=1).shape[1] <= 3
    for image in first_batch()["image"][:8]:
        assert image.flatten(1).unique(dim=1).shape[1] > 100


class _TinyClassifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        accuracy = (self.net(batch["image"]).argmax(1) == batch["label"]).float().mean()
        self.log("acc", accuracy)


def test_trainer_tests_both_splits(tmp_path):
    dm = ShortcutShapesDataModule(train_size=20, val_size=10, test_size=16, batch_size=8)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    results = trainer.test(_TinyClassifier(), datamodule=dm, verbose=False)
    assert len(results) == 2 and "acc/dataloader_idx_0" in results[0] and "acc/dataloader_idx_1" in results[1]


@pytest.mark.slow
def test_plain_cnn_learns_the_shortcut():
    """A small CNN trained briefly: accurate on iid, far less on flipped (the point of the data set)."""
    torch.manual_seed(0)
    dm = ShortcutShapesDataModule(seed=0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 4),
    )
    optimizer = torch.optim.Adam(net.parameters(), 2e-3)
    for _ in range(3):
        for batch in dm.train_dataloader():
            loss = torch.nn.functional.cross_entropy(net((batch["image"] - 0.5) * 4), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    accuracy = []
    with torch.no_grad():
        for loader in dm.test_dataloader():
            hits = [(net((b["image"] - 0.5) * 4).argmax(1) == b["label"]).float() for b in loader]
            accuracy.append(torch.cat(hits).mean().item())
    iid, flipped = accuracy
    assert iid > 0.8 and flipped < iid - 0.3, (iid, flipped)
