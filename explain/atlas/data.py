"""The images an atlas is built from: a folder of image files, or the dataset of any LightningDataModule.

Every sample is a dict ``{"image": float [3, H, W] (the model's input), "index": int, "ok": bool}``: ``index``
is the sample's position in the dataset (how later stages find it again, and how ranks' shards merge), ``ok`` is
False for an image file that cannot be read. Unreadable files are skipped with a count and their names
(``atlas.json``'s ``unreadable``, and a warning): one bad JPEG in a million must not stop a day-long run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def preprocessing(
    image_size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bilinear",
    crop_pct: float = 0.875,
) -> v2.Compose:
    """PIL image -> model input: resize the short side to ``image_size / crop_pct``, centre crop, normalise."""
    mode = v2.InterpolationMode(interpolation)
    return v2.Compose([
        v2.ToImage(), v2.Resize(round(image_size / crop_pct), interpolation=mode, antialias=True),
        v2.CenterCrop(image_size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)),
    ])


class ImageFiles(Dataset):
    """Every image file under ``root`` (recursively, sorted by relative path; labels are not needed: an atlas
    groups images by the class the model predicts).

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: it holds no image file.
    """

    def __init__(self, root: str | Path, transform: v2.Compose) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder {self.root}: no such folder")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise ValueError(f"data folder {self.root}: no image file ({', '.join(IMAGE_SUFFIXES)}) in it")
        self.transform = transform
        self.image_size = transform.transforms[2].size[0]

    def __len__(self) -> int:
        return len(self.files)

    def source(self, index: int) -> str:
        """The file's path relative to the root (its id in the atlas)."""
        return self.files[index].relative_to(self.root).as_posix()

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            with Image.open(self.files[index]) as image:
                tensor = self.transform(image.convert("RGB"))
            ok = True
        except (OSError, UnidentifiedImageError, ValueError):
            tensor, ok = torch.zeros(3, self.image_size, self.image_size), False
        return {"image": tensor, "index": index, "ok": ok}


class IndexedDataset(Dataset):
    """A datamodule's dataset whose samples (dicts with ``image``, or ``(image, label)`` pairs) get their index."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def source(self, index: int) -> str:
        return f"sample {index}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        image = sample["image"] if isinstance(sample, dict) else sample[0]
        if not isinstance(image, Tensor) or image.ndim != 3:
            raise ValueError(f"sample {index} of {type(self.dataset).__name__}: image is not a tensor [3, H, W]")
        return {"image": image, "index": index, "ok": True}


def datamodule_dataset(datamodule: Any, split: str = "predict") -> IndexedDataset:
    """The dataset behind ``datamodule``'s ``<split>_dataloader()`` (``predict``, ``val``, ``test`` or ``train``).

    Raises:
        ValueError: the datamodule has no such dataloader.
    """
    datamodule.prepare_data()
    datamodule.setup("predict" if split == "predict" else ("validate" if split == "val" else split))
    loader = getattr(datamodule, f"{split}_dataloader", None)
    try:
        dataloader = loader() if loader is not None else None
    except (NotImplementedError, AttributeError, TypeError):
        dataloader = None
    if isinstance(dataloader, (list, tuple)):
        dataloader = dataloader[0]
    if dataloader is None or not hasattr(dataloader, "dataset"):
        raise ValueError(f"{type(datamodule).__name__} has no {split}_dataloader(): pick data_split among "
                         "predict, val, test, train")
    return IndexedDataset(dataloader.dataset)
