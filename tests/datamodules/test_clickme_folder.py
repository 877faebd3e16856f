"""ClickMeFolderDataModule: the CSV folder format."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules import ClickMeFolderDataModule

CONTRACT = {"image": torch.float32, "label": torch.int64, "heatmap": torch.float32, "has_heatmap": torch.bool}


def ramp_picture(h: int, w: int, seed: int) -> np.ndarray:
    """An asymmetric grayscale picture in [0, 1]: a ramp plus a smooth random blob."""
    g = torch.Generator().manual_seed(seed)
    blob = F.interpolate(torch.rand(1, 1, 4, 4, generator=g), size=(h, w), mode="bicubic", align_corners=False)[0, 0]
    out = blob + torch.linspace(0, 1, w)[None, :]
    return ((out - out.min()) / (out.max() - out.min())).numpy()


def write_png(path, array01, mode="L"):
    data = (array01 * 255).round().astype(np.uint8)
    if mode == "RGB":
        data = np.repeat(data[..., None], 3, axis=2)
    Image.fromarray(data, mode=mode).save(path)


def write_csv(path, rows, header="image,heatmap,label"):
    path.write_text("\n".join([header, *(",".join(map(str, row)) for row in rows)]) + "\n")


@pytest.fixture
def folder(tmp_path):
    """train: 6 rows (PNG map, .npy map, no map, map of another size); val: 3 rows; the picture IS its map."""
    (tmp_path / "img").mkdir()
    rows = {"train": [], "val": []}
    for split, n in (("train", 6), ("val", 3)):
        for i in range(n):
            picture = ramp_picture(20, 28, seed=hash((split, i)) % 1000)
            write_png(tmp_path / f"img/{split}{i}.png", picture, mode="RGB")
            kind = i % 4
            if kind == 0:
                write_png(tmp_path / f"img/{split}{i}_map.png", picture)
                heatmap = f"img/{split}{i}_map.png"
            elif kind == 1:
                np.save(tmp_path / f"img/{split}{i}_map.npy", (picture * 7 - 2).astype(np.float32))  # any units
                heatmap = f"img/{split}{i}_map.npy"
            elif kind == 2:
                heatmap = ""
            else:  # a map at half the resolution
                small = F.interpolate(torch.from_numpy(picture)[None, None], size=(10, 14), mode="bilinear")[0, 0]
                np.save(tmp_path / f"img/{split}{i}_map.npy", small.numpy())
                heatmap = f"img/{split}{i}_map.npy"
            rows[split].append((f"img/{split}{i}.png", heatmap, i % 3))
    write_csv(tmp_path / "train.csv", rows["train"])
    write_csv(tmp_path / "val.csv", rows["val"])
    return tmp_path


def test_batches_follow_the_contract(folder):
    dm = ClickMeFolderDataModule(folder, image_size=16, batch_size=6, num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == 3 and dm.class_names is None  # inferred from the labels
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = next(iter(loader))
        for key, dtype in CONTRACT.items():
            assert batch[key].dtype == dtype, key
        b = batch["label"].shape[0]
        assert batch["image"].shape == (b, 3, 16, 16) and batch["heatmap"].shape == (b, 16, 16)
        assert 0 <= batch["heatmap"].min() and batch["heatmap"].max() <= 1
    # row 3 (index 2) has no map: zeros and has_heatmap False
    sample = dm.val_dataloader().dataset[2]
    assert not sample["has_heatmap"] and (sample["heatmap"] == 0).all()
    assert dm.val_dataloader().dataset[0]["has_heatmap"]


def test_heatmap_formats_and_resize(folder):
    dm = ClickMeFolderDataModule(folder, image_size=28, num_workers=0, augment=False)
    dm.setup("fit")
    val = dm.val_dataloader().dataset
    train = dm.train_dataloader().dataset
    picture = val[0]["image"][0]  # the picture is the map; eval resizes 20x28 -> 28x28 the same way for both
    # PNG map: /255, so it equals the picture up to rounding
    torch.testing.assert_close(val[0]["heatmap"], picture, atol=1 / 255, rtol=0)  # the image is resized as uint8
    # .npy map in arbitrary units: min-max scaled to [0, 1]
    npy = np.load(folder / "img/val1_map.npy")
    expected = torch.from_numpy((npy - npy.min()) / (npy.max() - npy.min()))[None]
    expected = F.interpolate(expected[None], size=(28, 28), mode="bilinear", antialias=True)[0, 0]
    torch.testing.assert_close(val[1]["heatmap"], expected, atol=1e-4, rtol=0)
    # a 10x14 map for a 20x28 image is resized bilinearly to the image's size first
    small = torch.from_numpy(np.load(folder / "img/train3_map.npy"))
    small = (small - small.min()) / (small.max() - small.min())  # .npy maps are min-max scaled
    big = F.interpolate(small[None, None], size=(20, 28), mode="bilinear", align_corners=False, antialias=True)
    expected = F.interpolate(big, size=(28, 28), mode="bilinear", antialias=True)[0, 0]
    torch.testing.assert_close(train[3]["heatmap"], expected.clamp(0, 1), atol=2e-3, rtol=0)


def test_train_augmentation_keeps_image_and_map_aligned(folder):
    dm = ClickMeFolderDataModule(folder, image_size=16, num_workers=0)
    dm.setup("fit")
    dataset = dm.train_dataloader().dataset
    evaluated = dm.val_dataloader().dataset.transform
    changed = False
    for _ in range(5):
        sample = dataset[0]  # PNG map == picture: every crop/flip must keep them equal
        torch.testing.assert_close(sample["image"], sample["heatmap"].expand(3, -1, -1), atol=3 / 255, rtol=0)
        row = dataset.rows[0]
        plain = torch.from_numpy(np.array(Image.open(row.image))).permute(2, 0, 1)
        changed |= not torch.allclose(sample["image"], evaluated(plain, plain[0].float() / 255)[0], atol=0.02)
    assert changed  # the augmentation is really applied


def test_classes_txt(folder):
    (folder / "classes.txt").write_text("cat\ndog\n\nbird\n")
    dm = ClickMeFolderDataModule(folder, num_workers=0)
    assert dm.class_names == ["cat", "dog", "bird"] and dm.num_classes == 3
    with pytest.raises(ValueError, match=r"num_classes=5 but .*classes\.txt lists 3 classes"):
        ClickMeFolderDataModule(folder, num_classes=5)


def test_folds(folder):
    parts = [ClickMeFolderDataModule(folder, num_workers=0, num_folds=3, fold=f, seed=1) for f in range(3)]
    for part in parts:
        part.setup("fit")
    folds = parts[0].fold_of_sample
    assert folds.dtype == torch.int64 and folds.shape == (6,)
    held = []
    for f, part in enumerate(parts):
        train_rows = part.train_dataloader().dataset.rows
        heldout_rows = part.heldout_dataloader().dataset.rows
        assert len(train_rows) + len(heldout_rows) == 6
        assert not {r.image for r in train_rows} & {r.image for r in heldout_rows}
        held += [r.image for r in heldout_rows]
    assert len(held) == len(set(held)) == 6  # every row is held out by exactly one fold


# ----------------------------------------------------------------------------------------------- errors
def test_missing_csv(folder):
    (folder / "val.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"val\.csv does not exist"):
        ClickMeFolderDataModule(folder).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"test\.csv does not exist"):
        ClickMeFolderDataModule(folder).test_dataloader()


def test_missing_test_csv_names_the_right_requirement(folder):
    datamodule = ClickMeFolderDataModule(folder)
    assert not datamodule.has_test_split
    datamodule.setup("fit")  # test.csv is optional for fit
    needs = r"test\.csv does not exist: testing a ClickMe folder needs test\.csv"
    with pytest.raises(FileNotFoundError, match=needs) as error:
        datamodule.setup("test")
    assert "a ClickMe folder needs train.csv and val.csv" not in str(error.value)  # the old, wrong requirement
    (folder / "test.csv").write_text((folder / "val.csv").read_text())
    assert datamodule.has_test_split
    assert len(datamodule.test_dataloader().dataset) == 3


def test_bad_header(folder):
    write_csv(folder / "train.csv", [("img/train0.png", "", 0)], header="path,map,y")
    with pytest.raises(ValueError, match=r"train\.csv: the first line must be the header 'image,heatmap,label'"):
        ClickMeFolderDataModule(folder).setup("fit")


def test_missing_image_names_row(folder):
    write_csv(folder / "train.csv", [("img/train0.png", "", 0), ("img/nope.png", "", 1)])
    with pytest.raises(FileNotFoundError, match=r"train\.csv row 2 \(line 3\): image file 'img/nope\.png' not found"):
        ClickMeFolderDataModule(folder).setup("fit")


def test_missing_heatmap_names_row(folder):
    write_csv(folder / "train.csv", [("img/train0.png", "img/nomap.png", 0)])
    message = r"train\.csv row 1 \(line 2\): heatmap file 'img/nomap\.png' not found"
    with pytest.raises(FileNotFoundError, match=message):
        ClickMeFolderDataModule(folder).setup("fit")


def test_label_out_of_range(folder):
    write_csv(folder / "train.csv", [("img/train0.png", "", 0), ("img/train1.png", "", 2)])
    with pytest.raises(ValueError, match=r"train\.csv row 2 \(line 3\): label 2 is out of range"):
        ClickMeFolderDataModule(folder, num_classes=2).setup("fit")
    (folder / "classes.txt").write_text("a\nb\n")
    message = r"train\.csv row 2 \(line 3\): label 2 is out of range \(labels must be in \[0, 2\)\)"
    with pytest.raises(ValueError, match=message):
        ClickMeFolderDataModule(folder).setup("fit")
    write_csv(folder / "train.csv", [("img/train0.png", "", "-1")])
    with pytest.raises(ValueError, match=r"row 1 \(line 2\): label -1 is out of range"):
        ClickMeFolderDataModule(folder).setup("fit")
    write_csv(folder / "train.csv", [("img/train0.png", "", "cat")])
    with pytest.raises(ValueError, match=r"row 1 \(line 2\): label 'cat' is not an integer"):
        ClickMeFolderDataModule(folder).setup("fit")


def test_unreadable_image_names_file_and_row(folder):
    (folder / "img/broken.png").write_bytes(b"this is not a png")
    write_csv(folder / "train.csv", [("img/train0.png", "", 0), ("img/broken.png", "", 1)])
    dm = ClickMeFolderDataModule(folder, num_workers=0)
    dm.setup("fit")  # content is read lazily
    dataset = dm.train_dataloader().dataset
    with pytest.raises(ValueError, match=r"train\.csv row 2 \(line 3\): cannot read image .*broken\.png"):
        dataset[1]


def test_heatmap_with_nan_or_inf_names_file_and_row(folder):
    for bad in (np.nan, np.inf):
        array = np.zeros((20, 28), dtype=np.float32)
        array[3, 4] = bad
        np.save(folder / "img/bad.npy", array)
        write_csv(folder / "train.csv", [("img/train0.png", "img/bad.npy", 0)])
        dm = ClickMeFolderDataModule(folder, num_workers=0)
        dm.setup("fit")
        with pytest.raises(ValueError, match=r"train\.csv row 1 \(line 2\): heatmap .*bad\.npy contains NaN or inf"):
            dm.train_dataloader().dataset[0]


def test_colour_heatmap_is_refused(folder):
    write_png(folder / "img/rgb_map.png", ramp_picture(20, 28, 0), mode="RGB")
    write_csv(folder / "train.csv", [("img/train0.png", "img/rgb_map.png", 0)])
    dm = ClickMeFolderDataModule(folder, num_workers=0)
    dm.setup("fit")
    with pytest.raises(ValueError, match=re.escape("must be a grayscale image (mode L or I;16)")):
        dm.train_dataloader().dataset[0]


def test_sixteen_bit_heatmap(folder):
    array = (ramp_picture(20, 28, 3) * 65535).round().astype(np.uint16)
    Image.fromarray(array).save(folder / "img/map16.png")
    write_csv(folder / "train.csv", [("img/train0.png", "img/map16.png", 0)])
    dm = ClickMeFolderDataModule(folder, num_workers=0, image_size=20, augment=False)
    dm.setup("fit")
    heatmap = dm.train_dataloader().dataset[0]["heatmap"]
    expected = F.interpolate(torch.from_numpy(array / 65535.0).float()[None, None], size=(20, 20),
                             mode="bilinear", antialias=True)[0, 0]
    torch.testing.assert_close(heatmap, expected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------- data defects
def png_header_only(path, width, height):
    """A PNG whose header announces width x height pixels and holds no pixel data: what a decompression bomb
    looks like to a reader before decoding (a real 30000x30000 bomb is a few kilobytes of zeros)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_from_its_header_naming_file_and_row(folder):
    png_header_only(folder / "img/bomb.png", 30000, 30000)
    rows = [("img/train0.png", "", 0), ("img/bomb.png", "", 1), ("img/train1.png", "img/bomb.png", 1)]
    write_csv(folder / "train.csv", rows)
    dm = ClickMeFolderDataModule(folder, num_workers=0)
    dm.setup("fit")
    dataset = dm.train_dataloader().dataset
    message = r"train\.csv row 2 \(line 3\): image .*bomb\.png is 30000x30000 = 900000000 pixels, more than max_pixels="
    with pytest.raises(ValueError, match=message):
        dataset[1]
    with pytest.raises(ValueError, match=r"row 3 \(line 4\): heatmap .*bomb\.png is 30000x30000"):
        dataset[2]


def test_max_pixels_is_the_limit_and_can_be_changed(folder, monkeypatch):
    # the 20x28 = 560-pixel pictures of the fixture pass a limit of 560 and fail one of 559 (image and map alike)
    np.save(folder / "img/big_map.npy", np.ones((30, 30), dtype=np.float32))  # 900 pixels
    rows = [("img/train0.png", "img/train0_map.png", 0), ("img/train1.png", "img/big_map.npy", 1)]
    write_csv(folder / "train.csv", rows)
    at_limit = ClickMeFolderDataModule(folder, num_workers=0, max_pixels=560)
    at_limit.setup("fit")
    assert at_limit.train_dataloader().dataset[0]["image"].shape[0] == 3
    with pytest.raises(ValueError, match=r"row 2 \(line 3\): heatmap .*big_map\.npy is 30x30 = 900 pixels, more than "
                                         r"max_pixels=560"):
        at_limit.train_dataloader().dataset[1]
    below = ClickMeFolderDataModule(folder, num_workers=0, max_pixels=559)
    below.setup("fit")
    with pytest.raises(ValueError, match=r"row 1 \(line 2\): image .*train0\.png is 28x20 = 560 pixels"):
        below.train_dataloader().dataset[0]
    # the datamodule's limit replaces Pillow's global one (which would refuse these pictures) and restores it
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)
    unlimited = ClickMeFolderDataModule(folder, num_workers=0, max_pixels=None)
    unlimited.setup("fit")
    assert unlimited.train_dataloader().dataset[1]["heatmap"].shape == (224, 224)
    assert PILImage.MAX_IMAGE_PIXELS == 100
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="max_pixels must be a positive int or None"):
            ClickMeFolderDataModule(folder, max_pixels=bad)


def test_csv_with_a_utf8_byte_order_mark(folder):
    text = (folder / "train.csv").read_text()
    (folder / "train.csv").write_bytes(text.encode("utf-8-sig"))  # what Excel writes
    assert (folder / "train.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    dm = ClickMeFolderDataModule(folder, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_dataloader().dataset) == 6


def test_repeated_rows_and_train_val_overlap_are_counted_in_warnings(folder, recwarn):
    clean = ClickMeFolderDataModule(folder, num_workers=0)
    clean.setup("fit")
    assert not [w for w in recwarn if "repeat" in str(w.message) or "also in" in str(w.message)]
    rows = [("img/train0.png", "", 0), ("img/train1.png", "", 1), ("img/train0.png", "", 0), ("img/train0.png", "", 2)]
    write_csv(folder / "train.csv", rows)
    write_csv(folder / "val.csv", [("img/val0.png", "", 0), ("img/train1.png", "", 1), ("img/./train0.png", "", 0)])
    with pytest.warns(UserWarning, match=r"train\.csv: 2 row\(s\) repeat an image listed earlier in the same file.*"
                                         r"row 3 \(line 4\) repeats .*row 1 \(line 2\)"):
        with pytest.warns(UserWarning, match=r"2 image\(s\) of val\.csv are also in train\.csv .*the val\.csv scores "
                                             r"are not held out"):
            dm = ClickMeFolderDataModule(folder, num_workers=0)
            dm.setup("fit")
    assert len(dm.train_dataloader().dataset) == 4  # they still pass


def spurious_folder(folder, size=(20, 28)):
    """train/val rows whose image is black with a white block, and whose spurious mask is that block."""
    h, w = size
    rows = []
    for i, (top, left) in enumerate([(2, 3), (10, 15), (4, 18)]):
        block = np.zeros((h, w))
        block[top : top + 6, left : left + 8] = 1.0
        write_png(folder / f"img/block{i}.png", block, mode="RGB")
        if i == 0:
            write_png(folder / f"img/block{i}_mask.png", block)  # grayscale PNG mask
            mask = f"img/block{i}_mask.png"
        elif i == 1:  # a .npy mask at half the resolution: resized by nearest neighbour
            np.save(folder / f"img/block{i}_mask.npy", block[::2, ::2] * 3.5)
            mask = f"img/block{i}_mask.npy"
        else:
            mask = ""  # no spurious pixel known
        rows.append((f"img/block{i}.png", "", i % 3, mask))
    for split in ("train", "val"):
        write_csv(folder / f"{split}.csv", rows, header="image,heatmap,label,spurious")
    return folder


@pytest.mark.filterwarnings("ignore:.*also in train.csv")  # val repeats train here on purpose
def test_spurious_column_gives_a_mask_with_the_image_crop_and_flip(folder):
    spurious_folder(folder)
    dm = ClickMeFolderDataModule(folder, image_size=16, batch_size=3, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["spurious_mask"].dtype == torch.bool and batch["spurious_mask"].shape == (3, 16, 16)
    assert not batch["spurious_mask"][2].any()  # empty cell: no spurious pixel
    for i in (0, 1):  # eval: the mask is the block, resized by nearest neighbour (torchvision's for a Mask)
        block = torch.zeros(20, 28, dtype=torch.bool)
        top, left = [(2, 3), (10, 15)][i]
        block[top : top + 6, left : left + 8] = True
        expected = F.interpolate(block[None, None].float(), size=(16, 16), mode="nearest")[0, 0].bool()
        if i == 1:  # the half-resolution mask goes to 20x28 by nearest, then to 16x16
            half = F.interpolate(block[None, None, ::2, ::2].float(), size=(20, 28), mode="nearest")
            expected = F.interpolate(half, size=(16, 16), mode="nearest")[0, 0].bool()
        assert torch.equal(batch["spurious_mask"][i], expected), i
    train = dm.train_dataloader().dataset
    torch.manual_seed(0)
    flipped = False
    for _ in range(30):  # random crops and flips: the mask stays on the white block (up to its resampled edge)
        sample = train[0]
        mask, white = sample["spurious_mask"], sample["image"].mean(0) > 0.5
        assert (mask != white).float().mean() < 0.1
        flipped |= bool(mask[:, 8:].sum() > 2 * mask[:, :8].sum())  # the block is on the left of the picture
    assert flipped
    write_csv(folder / "val.csv", [("img/block0.png", "", 0)])  # no spurious column: no mask in the batch
    plain = ClickMeFolderDataModule(folder, image_size=16, num_workers=0)
    plain.setup("validate")
    assert "spurious_mask" not in next(iter(plain.val_dataloader()))


@pytest.mark.filterwarnings("ignore:.*also in train.csv")  # val repeats train here on purpose
def test_unreadable_or_missing_mask_names_file_and_row(folder):
    spurious_folder(folder)
    write_png(folder / "img/rgb_mask.png", ramp_picture(20, 28, 0), mode="RGB")
    header = "image,heatmap,label,spurious"
    write_csv(folder / "val.csv", [("img/block0.png", "", 0, "img/rgb_mask.png")], header=header)
    dm = ClickMeFolderDataModule(folder, num_workers=0)
    dm.setup("validate")
    message = r"val\.csv row 1 \(line 2\): mask .*rgb_mask\.png must be a grayscale image"
    with pytest.raises(ValueError, match=message):
        dm.val_dataloader().dataset[0]
    write_csv(folder / "val.csv", [("img/block0.png", "", 0, "img/none.png")], header=header)
    message = r"val\.csv row 1 \(line 2\): spurious mask file 'img/none\.png' not found"
    with pytest.raises(FileNotFoundError, match=message):
        ClickMeFolderDataModule(folder, num_workers=0).setup("validate")
