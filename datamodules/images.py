"""Reading the files of a dataset: images, human maps and masks, each checked before it is decoded.

Every reader takes ``where`` (the dataset row that listed the file, e.g. ``ROOT/train.csv row 3 (line 4)``) and
names it, with the file, in every error. Every reader also takes ``max_pixels``: a file whose header announces
more pixels is refused before it is decoded (a 30000x30000 PNG is a few kilobytes on disk and gigabytes in memory:
a decompression bomb). This limit replaces Pillow's global ``Image.MAX_IMAGE_PIXELS`` check, so one datamodule
argument decides; ``None`` removes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as F

#: default pixel limit (width x height) of a file: 8192 x 8192, a 0.2 GB RGB image (ClickMe's are 256 x 256)
MAX_PIXELS = 8192 * 8192

# Pillow's errors for unreadable or truncated files
_READ_ERRORS = (OSError, ValueError, SyntaxError)


def _check_pixels(shape: tuple[int, int], path: Path, where: str, max_pixels: int | None, what: str) -> None:
    height, width = shape
    if max_pixels is not None and height * width > max_pixels:
        raise ValueError(
            f"{where}: {what} {path} is {width}x{height} = {height * width} pixels, more than max_pixels="
            f"{max_pixels} (a guard against decompression bombs): shrink the file, or raise the datamodule's "
            "max_pixels (None: no limit)"
        )


@contextlib.contextmanager
def _open(path: Path, where: str, max_pixels: int | None, what: str) -> Iterator[Image.Image]:
    """``Image.open`` (which reads the header only), refused above ``max_pixels`` before any decoding."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our limit below replaces Pillow's global one for this file
    try:
        image = Image.open(path)
    except _READ_ERRORS as error:
        raise ValueError(f"{where}: cannot read {what} {path}: {error}") from error
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    with image:
        _check_pixels((image.height, image.width), path, where, max_pixels, what)
        yield image


def load_image(path: Path, where: str, max_pixels: int | None = MAX_PIXELS) -> Tensor:
    """An image file as uint8 [3, H, W] (converted to RGB).

    Raises:
        ValueError: the file cannot be read, or has more than ``max_pixels`` pixels (naming ``where`` and the file).
    """
    with _open(path, where, max_pixels, "image") as image:
        try:
            return F.pil_to_tensor(image.convert("RGB"))
        except _READ_ERRORS as error:
            raise ValueError(f"{where}: cannot read image {path}: {error}") from error


def _load_npy(path: Path, where: str, max_pixels: int | None, what: str, allow_bool: bool = False) -> np.ndarray:
    """A ``.npy`` array [H, W] (a [1, H, W] or [H, W, 1] one is squeezed), its size checked before it is read."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # the header only, until sliced
    except (OSError, ValueError) as error:
        raise ValueError(f"{where}: cannot read {what} {path}: {error}") from error
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
    numeric = np.issubdtype(array.dtype, np.number) or (allow_bool and array.dtype == np.bool_)
    if array.ndim != 2 or not numeric:
        raise ValueError(f"{where}: {what} {path} must be a numeric array [H, W], got {array.dtype} {array.shape}")
    _check_pixels(array.shape, path, where, max_pixels, what)
    return np.array(array)


def load_heatmap(path: Path, where: str, max_pixels: int | None = MAX_PIXELS) -> Tensor:
    """A human map as float32 [H, W] in [0, 1]: grayscale image (/255 or /65535) or ``.npy`` (min-max).

    Raises:
        ValueError: the file cannot be read, is not grayscale, holds NaN or inf, or has more than ``max_pixels``
            pixels (naming ``where`` and the file).
    """
    if path.suffix.lower() == ".npy":
        heatmap = torch.from_numpy(_load_npy(path, where, max_pixels, "heatmap").astype(np.float32))
        if not torch.isfinite(heatmap).all():
            raise ValueError(f"{where}: heatmap {path} contains NaN or inf")
        low, high = heatmap.min(), heatmap.max()
        return (heatmap - low) / (high - low) if high > low else torch.zeros_like(heatmap)
    with _open(path, where, max_pixels, "heatmap") as image:
        mode = image.mode
        try:
            if mode == "L":
                return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
            if mode in ("I;16", "I;16B", "I"):
                return torch.from_numpy(np.asarray(image, dtype=np.float32) / 65535.0).clamp(0, 1)
        except _READ_ERRORS as error:
            raise ValueError(f"{where}: cannot read heatmap {path}: {error}") from error
    raise ValueError(
        f"{where}: heatmap {path} must be a grayscale image (mode L or I;16) or a .npy array, got mode {mode}; "
        "convert it to grayscale"
    )


def load_mask(path: Path, where: str, max_pixels: int | None = MAX_PIXELS) -> Tensor:
    """A mask as bool [H, W], ``True`` where the file is nonzero: a grayscale (or 1-bit) image or a ``.npy`` array.

    Raises:
        ValueError: the file cannot be read, is not grayscale, holds NaN, or has more than ``max_pixels`` pixels
            (naming ``where`` and the file).
    """
    if path.suffix.lower() == ".npy":
        array = _load_npy(path, where, max_pixels, "mask", allow_bool=True)
        if np.issubdtype(array.dtype, np.floating) and np.isnan(array).any():
            raise ValueError(f"{where}: mask {path} contains NaN")
        return torch.from_numpy(array != 0)
    with _open(path, where, max_pixels, "mask") as image:
        if image.mode not in ("1", "L", "I;16", "I;16B", "I"):
            raise ValueError(
                f"{where}: mask {path} must be a grayscale image (mode 1, L or I;16) or a .npy array, got mode "
                f"{image.mode}; convert it to grayscale"
            )
        try:
            return torch.from_numpy(np.asarray(image) != 0)
        except _READ_ERRORS as error:
            raise ValueError(f"{where}: cannot read mask {path}: {error}") from error
