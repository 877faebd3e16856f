"""``ClickMeFolderDataModule``: images and human maps listed in CSV files, the format users convert their data to.

Layout (DESIGN section 2)::

    ROOT/train.csv      header ``image,heatmap,label`` (any order; other columns are ignored)
    ROOT/val.csv
    ROOT/test.csv       optional
    ROOT/classes.txt    optional, one class name a line (blank lines skipped)

Paths are relative to ROOT (absolute paths work too). ``image`` is any file Pillow reads (converted to RGB).
``heatmap`` is empty when the image has no human map, else a grayscale image (8-bit scaled by 1/255, 16-bit by
1/65535) or a ``.npy`` float array [H, W] (min-max scaled to [0, 1] per map, since such maps come in arbitrary
units; a constant map becomes zeros). ``label`` is an integer class index.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F

from datamodules.augmentation import PairedTransform, eval_transform, make_sample, train_transform
from datamodules.folds import assign_folds, check_fold

CSV_COLUMNS = ("image", "heatmap", "label")


@dataclass(frozen=True)
class Row:
    """One validated CSV row; ``where`` names it in error messages (``ROOT/train.csv row 3 (line 4)``)."""

    image: Path
    heatmap: Path | None
    label: int
    where: str


def read_rows(csv_path: Path, root: Path, num_classes: int | None) -> list[Row]:
    """Read and check a CSV eagerly: header, files exist, labels are integers in range. Content is read later."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path} does not exist: a ClickMe folder needs train.csv and val.csv in {root}")
    with csv_path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        missing = [name for name in CSV_COLUMNS if name not in header]
        if missing:
            raise ValueError(
                f"{csv_path}: the first line must be the header 'image,heatmap,label', got {','.join(header)!r} "
                f"(missing {missing})"
            )
        columns = [header.index(name) for name in CSV_COLUMNS]
        rows = []
        for number, cells in enumerate(reader, start=1):
            where = f"{csv_path} row {number} (line {reader.line_num})"
            if not any(cell.strip() for cell in cells):
                raise ValueError(f"{where}: empty row")
            if len(cells) != len(header):
                raise ValueError(f"{where}: {len(cells)} cells for the {len(header)} columns of the header")
            image, heatmap, label = (cells[i].strip() for i in columns)
            rows.append(_check_row(root, image, heatmap, label, num_classes, where))
    if not rows:
        raise ValueError(f"{csv_path} has a header but no rows")
    return rows


def _check_row(root: Path, image: str, heatmap: str, label: str, num_classes: int | None, where: str) -> Row:
    if not image:
        raise ValueError(f"{where}: the 'image' cell is empty")
    image_path = root / image
    if not image_path.is_file():
        raise FileNotFoundError(f"{where}: image file {image!r} not found ({image_path})")
    heatmap_path = root / heatmap if heatmap else None
    if heatmap_path is not None and not heatmap_path.is_file():
        raise FileNotFoundError(f"{where}: heatmap file {heatmap!r} not found ({heatmap_path})")
    try:
        value = int(label)
    except ValueError:
        raise ValueError(f"{where}: label {label!r} is not an integer class index") from None
    if value < 0 or (num_classes is not None and value >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise ValueError(f"{where}: label {value} is out of range (labels must be in {bound})")
    return Row(image_path, heatmap_path, value, where)


def read_class_names(path: Path) -> list[str]:
    """Class names from ``classes.txt``: one a line, surrounding spaces stripped, blank lines skipped."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_image(path: Path, where: str) -> Tensor:
    """An image file as uint8 [3, H, W] (converted to RGB)."""
    try:
        with Image.open(path) as image:
            return F.pil_to_tensor(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as error:  # Pillow's errors for unreadable or truncated files
        raise ValueError(f"{where}: cannot read image {path}: {error}") from error


def load_heatmap(path: Path, where: str) -> Tensor:
    """A human map as float32 [H, W] in [0, 1]: grayscale image (/255 or /65535) or ``.npy`` (min-max)."""
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"{where}: cannot read heatmap {path}: {error}") from error
        if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
            array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"{where}: heatmap {path} must be a numeric array [H, W], got {array.dtype} {array.shape}")
        heatmap = torch.from_numpy(array.astype(np.float32))
        if not torch.isfinite(heatmap).all():
            raise ValueError(f"{where}: heatmap {path} contains NaN or inf")
        low, high = heatmap.min(), heatmap.max()
        return (heatmap - low) / (high - low) if high > low else torch.zeros_like(heatmap)
    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode == "L":
                return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
            if mode in ("I;16", "I;16B", "I"):
                return torch.from_numpy(np.asarray(image, dtype=np.float32) / 65535.0).clamp(0, 1)
    except (OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"{where}: cannot read heatmap {path}: {error}") from error
    raise ValueError(
        f"{where}: heatmap {path} must be a grayscale image (mode L or I;16) or a .npy array, got mode {mode}; "
        "convert it to grayscale"
    )


class ClickMeFolderDataset(Dataset):
    """The rows of one CSV; files are read in ``__getitem__`` (errors name the file and the CSV row)."""

    def __init__(self, rows: list[Row], transform: PairedTransform) -> None:
        self.rows, self.transform = rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        row = self.rows[index]
        image = load_image(row.image, row.where)
        size = image.shape[-2:]
        if row.heatmap is None:
            heatmap = torch.zeros(size)
        else:
            heatmap = load_heatmap(row.heatmap, row.where)
            if heatmap.shape != size:  # a map of another size is resized bilinearly to its image's size
                heatmap = F.resize(heatmap[None], list(size), antialias=True)[0].clamp(0, 1)
        image, heatmap = self.transform(image, heatmap)
        return make_sample(image, row.label, heatmap, row.heatmap is not None)


class ClickMeFolderDataModule(L.LightningDataModule):
    """Annotated images listed in ``ROOT/{train,val,test}.csv`` (format in the module docstring).

    Each CSV is checked when it is first needed (``setup``): the header, that every listed file exists and that
    every label is an integer in range; a bad row raises an error that names the CSV, the row and the line.
    File contents are read lazily; an unreadable image or a heatmap with NaN/inf raises an error that names the
    file and the row. A heatmap of another size than its image is resized (bilinear, antialiased) to the image's
    size before augmentation. Images without a map get ``heatmap`` zeros and ``has_heatmap`` False.

    Args:
        root: the folder holding the CSVs.
        image_size: side of the square output images.
        num_classes: checked against the labels; if None, taken from ``classes.txt`` if present, else the
            largest label of the CSVs read by the first ``setup`` + 1 (train and val for ``fit``).
        augment: training augmentation: ``RandomResizedCrop(image_size, scale=(0.25, 1))`` and a horizontal
            flip, applied to image and map alike. Evaluation resizes to ``image_size x image_size``.
        num_folds, fold: with ``num_folds > 1`` the train CSV rows are split into folds (``fold_of_sample``);
            training uses every fold but ``fold`` and :meth:`heldout_dataloader` serves fold ``fold``.
        seed: seed of the fold assignment.
    """

    test_split_names: tuple[str, ...] = ("test",)

    def __init__(
        self,
        root: str | Path,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 4,
        num_classes: int | None = None,
        augment: bool = True,
        num_folds: int = 1,
        fold: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_fold(num_folds, fold)
        self.save_hyperparameters()
        self.root = Path(root)
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.augment, self.num_folds, self.fold, self.seed = augment, num_folds, fold, seed
        self.class_names: list[str] | None = None
        classes_file = self.root / "classes.txt"
        if classes_file.is_file():
            self.class_names = read_class_names(classes_file)
            if num_classes is not None and num_classes != len(self.class_names):
                raise ValueError(f"num_classes={num_classes} but {classes_file} lists {len(self.class_names)} classes")
            num_classes = len(self.class_names)
        self.num_classes = num_classes
        self.fold_of_sample: Tensor | None = None  # int64 [len(train.csv)], set by setup("fit")
        self._rows: dict[str, list[Row]] = {}

    @property
    def has_test_split(self) -> bool:
        """Whether ``ROOT/test.csv`` exists (``run.test_after_fit`` skips the test when it does not)."""
        return (self.root / "test.csv").is_file()

    def _read(self, split: str) -> list[Row]:
        if split not in self._rows:
            if not self.root.is_dir():
                raise FileNotFoundError(f"ClickMe folder {self.root} does not exist")
            if split == "test" and not self.has_test_split:
                raise FileNotFoundError(
                    f"{self.root / 'test.csv'} does not exist: testing a ClickMe folder needs test.csv (optional for "
                    "fit, which needs train.csv and val.csv); add it, or validate on val.csv"
                )
            self._rows[split] = read_rows(self.root / f"{split}.csv", self.root, self.num_classes)
        return self._rows[split]

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.fold_of_sample = assign_folds(len(self._read("train")), self.num_folds, self.seed)
        if stage in (None, "fit", "validate"):
            self._read("val")
        if stage == "test":
            self._read("test")
        if self.num_classes is None and self._rows:  # no classes.txt nor num_classes: the largest label + 1
            self.num_classes = max(row.label for rows in self._rows.values() for row in rows) + 1

    def _loader(self, rows: list[Row], transform: PairedTransform, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            ClickMeFolderDataset(rows, transform),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _train_rows(self, held_out: bool) -> list[Row]:
        self.setup("fit")
        rows = self._read("train")
        if self.num_folds == 1:
            return rows
        return [row for row, fold in zip(rows, self.fold_of_sample.tolist()) if (fold == self.fold) == held_out]

    def train_dataloader(self) -> DataLoader:
        transform = train_transform(self.image_size) if self.augment else eval_transform(self.image_size)
        return self._loader(self._train_rows(held_out=False), transform, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._read("val"), eval_transform(self.image_size))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._read("test"), eval_transform(self.image_size))

    def heldout_dataloader(self) -> DataLoader:
        """The train CSV rows of fold ``fold`` (no augmentation): what model ``fold`` did not train on."""
        if self.num_folds == 1:
            raise ValueError("heldout_dataloader() needs num_folds > 1: with num_folds=1 every row is trained on")
        return self._loader(self._train_rows(held_out=True), eval_transform(self.image_size))
