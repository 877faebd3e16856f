"""``ClickMeFolderDataModule``: images and human maps listed in CSV files, the format users convert their data to.

Layout (DESIGN section 2)::

    ROOT/train.csv      header ``image,heatmap,label[,spurious]`` (any order; other columns are ignored)
    ROOT/val.csv
    ROOT/test.csv       optional
    ROOT/classes.txt    optional, one class name a line (blank lines skipped)

Paths are relative to ROOT (absolute paths work too). ``image`` is any file Pillow reads (converted to RGB).
``heatmap`` is empty when the image has no human map, else a grayscale image (8-bit scaled by 1/255, 16-bit by
1/65535) or a ``.npy`` float array [H, W] (min-max scaled to [0, 1] per map, since such maps come in arbitrary
units; a constant map becomes zeros). ``label`` is an integer class index. The optional ``spurious`` column
names a mask of the pixels a model right for the right reasons should ignore (a grayscale image or a ``.npy``
array, nonzero = spurious; an empty cell: no such pixel): the batches of that CSV then carry ``spurious_mask``
bool [B, H, W], cropped and flipped with the image. The CSVs may be saved with a UTF-8 byte order mark.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F
from typing_extensions import override

from datamodules.augmentation import PairedTransform, eval_transform, make_sample, train_transform
from datamodules.folds import assign_folds, check_fold
from datamodules.images import MAX_PIXELS, load_heatmap, load_image, load_mask
from datamodules.splits import SplitDataModule
from explain.validation import non_negative_int, positive_int

__all__ = ["ClickMeFolderDataModule", "ClickMeFolderDataset", "Row", "load_image", "read_rows"]

CSV_COLUMNS = ("image", "heatmap", "label")


@dataclass(frozen=True)
class Row:
    """One validated CSV row; ``where`` names it in error messages (``ROOT/train.csv row 3 (line 4)``)."""

    image: Path
    heatmap: Path | None
    label: int
    where: str
    spurious: Path | None = None  # the row's spurious mask (None: no such pixel, or no ``spurious`` column)
    spurious_column: bool = False  # its CSV has the ``spurious`` column: the samples carry ``spurious_mask``


def read_rows(csv_path: Path, root: Path, num_classes: int | None) -> list[Row]:
    """Read and check a CSV eagerly: header, files exist, labels are integers in range. Content is read later.

    A UTF-8 byte order mark is skipped. Rows that repeat an image listed earlier in the same CSV are counted and
    reported by a warning (they pass: a dataset may weigh some images twice on purpose).

    Raises:
        FileNotFoundError: the CSV, or a file a row lists, does not exist.
        ValueError: a bad header, an empty or ragged row, or a label that is not an integer in range.
    """
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path} does not exist: a ClickMe folder needs train.csv and val.csv in {root}")
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        missing = [name for name in CSV_COLUMNS if name not in header]
        if missing:
            raise ValueError(
                f"{csv_path}: the first line must be the header 'image,heatmap,label', got {','.join(header)!r} "
                f"(missing {missing})"
            )
        columns = [header.index(name) for name in CSV_COLUMNS]
        spurious_column = header.index("spurious") if "spurious" in header else None
        rows = []
        for number, cells in enumerate(reader, start=1):
            where = f"{csv_path} row {number} (line {reader.line_num})"
            if not any(cell.strip() for cell in cells):
                raise ValueError(f"{where}: empty row")
            if len(cells) != len(header):
                raise ValueError(f"{where}: {len(cells)} cells for the {len(header)} columns of the header")
            image, heatmap, label = (cells[i].strip() for i in columns)
            row = _check_row(root, image, heatmap, label, num_classes, where)
            if spurious_column is not None:
                mask = _listed_file(root, cells[spurious_column], where, "spurious mask")
                row = dataclasses.replace(row, spurious=mask, spurious_column=True)
            rows.append(row)
    if not rows:
        raise ValueError(f"{csv_path} has a header but no rows")
    _warn_repeats(csv_path, rows)
    return rows


def _listed_file(root: Path, cell: str, where: str, what: str) -> Path | None:
    """``root / cell`` if the cell is not empty (None if it is); the file must exist."""
    cell = cell.strip()
    if not cell:
        return None
    path = root / cell
    if not path.is_file():
        raise FileNotFoundError(f"{where}: {what} file {cell!r} not found ({path})")
    return path


def _check_row(root: Path, image: str, heatmap: str, label: str, num_classes: int | None, where: str) -> Row:
    if not image:
        raise ValueError(f"{where}: the 'image' cell is empty")
    image_path = _listed_file(root, image, where, "image")
    heatmap_path = _listed_file(root, heatmap, where, "heatmap")
    try:
        value = int(label)
    except ValueError:
        raise ValueError(f"{where}: label {label!r} is not an integer class index") from None
    if value < 0 or (num_classes is not None and value >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise ValueError(f"{where}: label {value} is out of range (labels must be in {bound})")
    return Row(image_path, heatmap_path, value, where)


def _image_key(row: Row) -> str:
    """The image's path with ``.``/``..``/double slashes folded (no filesystem call: CSVs may list millions)."""
    return os.path.normpath(row.image)


def _warn_repeats(csv_path: Path, rows: list[Row]) -> None:
    """Warn, with a count and the first example, about rows whose image an earlier row of the CSV lists."""
    first: dict[str, Row] = {}
    repeats = []
    for row in rows:
        key = _image_key(row)
        if key in first:
            repeats.append((row, first[key]))
        else:
            first[key] = row
    if repeats:
        row, earlier = repeats[0]
        rank_zero_warn(
            f"{csv_path}: {len(repeats)} row(s) repeat an image listed earlier in the same file (duplicates are "
            f"seen more often in training and counted twice in the scores), e.g. {row.where} repeats "
            f"{earlier.where}: {row.image}"
        )


def warn_shared_images(reference: tuple[str, list[Row]], other: tuple[str, list[Row]]) -> int:
    """Warn, with a count and an example, when images of ``other`` (e.g. val) are also in ``reference`` (train):
    the scores of ``other`` are then not held out. Returns the count."""
    (reference_name, reference_rows), (other_name, other_rows) = reference, other
    seen = {_image_key(row) for row in reference_rows}
    shared = [row for row in other_rows if _image_key(row) in seen]
    if shared:
        example = f"{shared[0].where}: {shared[0].image}"
        rank_zero_warn(
            f"{len(shared)} image(s) of {other_name} are also in {reference_name} (e.g. {example}): the "
            f"{other_name} scores are not held out"
        )
    return len(shared)


def read_class_names(path: Path) -> list[str]:
    """Class names from ``classes.txt``: one a line, surrounding spaces stripped, blank lines skipped."""
    return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


class ClickMeFolderDataset(Dataset):
    """The rows of one CSV; files are read in ``__getitem__`` (errors name the file and the CSV row)."""

    def __init__(self, rows: list[Row], transform: PairedTransform, max_pixels: int | None = MAX_PIXELS) -> None:
        self.rows, self.transform, self.max_pixels = rows, transform, max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        row = self.rows[index]
        image = load_image(row.image, row.where, self.max_pixels)
        size = image.shape[-2:]
        if row.heatmap is None:
            heatmap = torch.zeros(size)
        else:
            heatmap = load_heatmap(row.heatmap, row.where, self.max_pixels)
            if heatmap.shape != size:  # a map of another size is resized bilinearly to its image's size
                heatmap = F.resize(heatmap[None], list(size), antialias=True)[0].clamp(0, 1)
        if not row.spurious_column:
            image, heatmap = self.transform(image, heatmap)
            return make_sample(image, row.label, heatmap, row.heatmap is not None)
        if row.spurious is None:
            mask = torch.zeros(size, dtype=torch.bool)
        else:
            mask = load_mask(row.spurious, row.where, self.max_pixels)
            if mask.shape != size:  # nearest neighbour, as v2 resamples a Mask
                mask = F.resize(mask[None], list(size), interpolation=F.InterpolationMode.NEAREST)[0]
        image, heatmap, mask = self.transform(image, heatmap, mask)
        return {**make_sample(image, row.label, heatmap, row.heatmap is not None), "spurious_mask": mask}


class ClickMeFolderDataModule(SplitDataModule):
    """Annotated images listed in ``ROOT/{train,val,test}.csv`` (format in the module docstring).

    Each CSV is checked when it is first needed (``setup``): the header, that every listed file exists and that
    every label is an integer in range; a bad row raises an error that names the CSV, the row and the line.
    Rows that repeat an image of the same CSV, and val/test images that are also in train.csv, pass with a
    warning that counts them. File contents are read lazily; an unreadable image, a heatmap with NaN/inf or a
    file of more than ``max_pixels`` pixels raises an error that names the file and the row. A heatmap of another
    size than its image is resized (bilinear, antialiased) to the image's size before augmentation, a spurious
    mask by nearest neighbour. Images without a map get ``heatmap`` zeros and ``has_heatmap`` False.

    Args:
        root: the folder holding the CSVs.
        image_size: side of the square output images.
        num_classes: checked against the labels; if None, taken from ``classes.txt`` if present, else the
            largest label of the CSVs read by the first ``setup`` + 1 (train and val for ``fit``).
        augment: training augmentation: ``RandomResizedCrop(image_size, scale=(0.25, 1))`` and a horizontal
            flip, applied to image, map and mask alike. Evaluation resizes to ``image_size x image_size``.
        num_folds, fold: with ``num_folds > 1`` the train CSV rows are split into folds (``fold_of_sample``);
            training uses every fold but ``fold`` and :meth:`heldout_dataloader` serves fold ``fold``.
        seed: seed of the fold assignment.
        max_pixels: the most pixels (width x height) a listed file may have; a larger one is refused from its
            header, before it is decoded (decompression bombs). Default 8192 x 8192; None: no limit.

    Raises:
        ValueError: an argument out of its domain, or ``num_classes`` that disagrees with ``classes.txt``.
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
        max_pixels: int | None = MAX_PIXELS,
    ) -> None:
        super().__init__()
        check_fold(num_folds, fold)
        self.save_hyperparameters()
        self.root = Path(root)
        self.image_size = positive_int("image_size", image_size)
        self.batch_size = positive_int("batch_size", batch_size)
        self.num_workers = non_negative_int("num_workers", num_workers)
        self.max_pixels = positive_int("max_pixels", max_pixels, allow_none=True)
        positive_int("num_classes", num_classes, allow_none=True)
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
            others = [other for other in self._rows if other != "train"] if split == "train" else [split]
            if "train" in self._rows:  # once per pair: the rows of a split are read once
                for other in others:
                    warn_shared_images(("train.csv", self._rows["train"]), (f"{other}.csv", self._rows[other]))
        return self._rows[split]

    @override
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.fold_of_sample = assign_folds(len(self._read("train")), self.num_folds, self.seed)
        if stage in (None, "fit", "validate"):
            self._read("val")
        if stage == "test":
            self._read("test")
        if self.num_classes is None and self._rows:  # no classes.txt nor num_classes: the largest label + 1
            self.num_classes = max(row.label for rows in self._rows.values() for row in rows) + 1

    def _train_rows(self, held_out: bool) -> list[Row]:
        self.setup("fit")
        rows = self._read("train")
        if self.num_folds == 1:
            return rows
        return [row for row, fold in zip(rows, self.fold_of_sample.tolist()) if (fold == self.fold) == held_out]

    def dataset(self, split: str) -> ClickMeFolderDataset:
        """The dataset of ``split``: ``train`` (every fold but ``fold``, augmented), ``heldout`` (fold ``fold``),
        ``val`` or ``test``."""
        if split == "train":
            transform = train_transform(self.image_size) if self.augment else eval_transform(self.image_size)
            return ClickMeFolderDataset(self._train_rows(held_out=False), transform, self.max_pixels)
        rows = self._train_rows(held_out=True) if split == "heldout" else self._read(split)
        return ClickMeFolderDataset(rows, eval_transform(self.image_size), self.max_pixels)
