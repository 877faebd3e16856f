"""The Fourier magnitude MACO keeps fixed: the mean ``|rfft2|`` of the user's images, computed once and cached.

Nothing is downloaded: compute it from your data (a tensor, any iterable of tensors, or a dataloader of batch dicts
with an ``image`` key or of tuples whose first element is the image) once, and keep it::

    loader = datamodule.train_dataloader()
    magnitude = magnitude_spectrum(loader, image_size=224, max_batches=50, cache="spectrum.pt")  # later: read back
    image, alpha = maco(objective, 224, magnitude=magnitude)     # or magnitude="spectrum.pt"

(``save_spectrum`` / ``load_spectrum`` do the same by hand.)

The spectrum is taken in MACO's decorrelated colour space (the space where the phase is optimised, before the
colour recorrelation), as the reference's ``spectrum_decorrelated.npy``; images are expected in [0, 1].
Without data, :func:`power_law_spectrum` is a FALLBACK, not MACO's spectrum: a ``1/f^decay`` magnitude, the
average shape of natural-image spectra, equal in the three decorrelated channels (as Lucid's Fourier images).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from itertools import islice

import torch
import torch.nn.functional as F
from torch import Tensor

from explain.featureviz.parameterization import decorrelate_colors
from explain.validation import in_interval, positive_int


def _pair(size: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    try:
        if len(pair) != 2:
            raise ValueError
        return positive_int(name, pair[0]), positive_int(name, pair[1])
    except ValueError:
        raise ValueError(
            f"{name} must be a positive int or a pair (height, width) of positive ints, got {size!r}"
        ) from None


def _images_of(item: object, index: int) -> Tensor:
    """The image tensor of one element of the data: a tensor, a batch dict with ``image``, or a tuple/list."""
    if isinstance(item, dict):
        if "image" not in item:
            raise KeyError(f"batch {index} is a dict without an 'image' key (keys: {sorted(map(str, item))})")
        item = item["image"]
    elif isinstance(item, (tuple, list)):
        if not item:
            raise ValueError(f"batch {index} is an empty {type(item).__name__}")
        item = item[0]
    if not isinstance(item, Tensor):
        raise TypeError(f"batch {index}: expected an image tensor, got {type(item).__name__}")
    images = item.unsqueeze(0) if item.ndim == 3 else item
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"batch {index}: images must be [B, 3, H, W] (or [3, H, W]), got {tuple(item.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"batch {index}: images must be floating point in [0, 1], got dtype {images.dtype}")
    return images


@torch.no_grad()
def magnitude_spectrum(
    images: Tensor | Iterable,
    image_size: int | tuple[int, int] | None = None,
    max_batches: int | None = None,
    decorrelate: bool = True,
    cache: str | os.PathLike | None = None,
) -> Tensor:
    """Mean magnitude ``mean_n |rfft2(x_n)|`` [3, H, W//2+1] over images in [0, 1].

    Args:
        images: a tensor [N,3,H,W] (or [3,H,W]), or an iterable (a dataloader) of such tensors, of batch dicts
            with an ``image`` key, or of tuples/lists whose first element is the images.
        image_size: resize every image to this size first (bilinear, antialiased); default: keep the size,
            which must then be the same for all batches. Use the size you will optimise at.
        max_batches: stop after this many batches of an iterable.
        decorrelate: take the spectrum of the decorrelated colours (MACO's optimisation space; default) rather
            than of the RGB channels.
        cache: a file: when it holds a spectrum (of ``image_size`` if given), that spectrum is returned without
            reading the data; otherwise the spectrum is computed and saved there. Delete it when the data changes.

    Returns:
        float32 tensor on the CPU.
    """
    positive_int("max_batches", max_batches, allow_none=True)
    size = None if image_size is None else _pair(image_size, "image_size")
    if cache is not None and os.path.isfile(cache):
        cached = load_spectrum(cache)
        if size is None or cached.shape[-2:] == (size[0], size[1] // 2 + 1):
            return cached
    magnitude = _mean_magnitude(images, size, max_batches, decorrelate)
    if cache is not None:
        save_spectrum(magnitude, cache)
    return magnitude


def _mean_magnitude(
    images: Tensor | Iterable, size: tuple[int, int] | None, max_batches: int | None, decorrelate: bool
) -> Tensor:
    batches = [images] if isinstance(images, Tensor) else images
    if not isinstance(batches, Iterable):
        raise TypeError(
            f"images must be a tensor [N, 3, H, W] or an iterable/dataloader of batches, got {type(images).__name__}"
        )
    total, count, first_size = None, 0, None
    for index, item in enumerate(islice(batches, max_batches)):
        batch = _images_of(item, index)
        if size is not None and tuple(batch.shape[-2:]) != size:
            batch = F.interpolate(batch.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        first_size = first_size or tuple(batch.shape[-2:])
        if tuple(batch.shape[-2:]) != first_size:
            raise ValueError(
                f"batch {index} has images of size {tuple(batch.shape[-2:])}, but the first batch had {first_size}; "
                "pass image_size=... to resize them all to one size"
            )
        batch = batch.double()
        if decorrelate:
            batch = decorrelate_colors(batch)
        magnitude = torch.fft.rfft2(batch).abs().sum(0)
        total = magnitude if total is None else total + magnitude.to(total.device)
        count += batch.shape[0]
    if count == 0:
        raise ValueError("no images: the tensor or dataloader given to magnitude_spectrum is empty")
    return (total / count).float().cpu()


def power_law_spectrum(image_size: int | tuple[int, int], decay: float = 1.0) -> Tensor:
    """FALLBACK magnitude [3, H, W//2+1] when no data is at hand: ``1 / max(f, 1/max(H, W))^decay``.

    ``f`` is the radial frequency in cycles per pixel; natural images have amplitude spectra close to ``1/f``
    (decay 1, also Lucid's default). This is not the data spectrum MACO prescribes: prefer
    :func:`magnitude_spectrum` of your images.
    """
    height, width = _pair(image_size, "image_size")
    in_interval("decay", decay, 0)
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(width, dtype=torch.float64)[None, :]
    frequency = (fx**2 + fy**2).sqrt().clamp_min(1.0 / max(height, width))
    return frequency.pow(-decay).float().expand(3, -1, -1).clone()


def resize_spectrum(magnitude: Tensor, image_size: int | tuple[int, int]) -> Tensor:
    """Resample a magnitude [C, h, w//2+1] to the half spectrum of an image of ``image_size``.

    Coefficients are matched by RELATIVE frequency (cycles per image side, scaled): a spectrum computed at 224
    serves an image at 512 as the spectrum of the same images shown at 512. Bilinear in frequency; computing the
    spectrum at the right size (``magnitude_spectrum(..., image_size=...)``) avoids the approximation.

    Raises:
        ValueError: ``magnitude`` not [C, H, W//2+1].
    """
    height, width = _pair(image_size, "image_size")
    if magnitude.ndim != 3:
        raise ValueError(f"magnitude must be [C, H, W//2+1], got {tuple(magnitude.shape)}")
    if magnitude.shape[-2:] == (height, width // 2 + 1):
        return magnitude
    h, half = magnitude.shape[-2:]
    # rows in signed-frequency order (-h/2 ... h/2), so that neighbouring frequencies are neighbouring rows
    shifted = torch.fft.fftshift(magnitude, dim=-2)
    row = torch.fft.fftfreq(height, dtype=torch.float64) * h + h // 2  # position in the shifted input
    column = torch.arange(width // 2 + 1, dtype=torch.float64) * ((half - 1) / max(width // 2, 1))
    grid = torch.stack(torch.meshgrid(column, row, indexing="xy"), dim=-1)  # [H, W//2+1, (x, y)]
    grid = grid / torch.tensor([max(half - 1, 1), max(h - 1, 1)], dtype=torch.float64) * 2 - 1
    resized = F.grid_sample(
        shifted[None].float(),
        grid[None].to(device=magnitude.device, dtype=torch.float32),
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )[0]
    return resized.to(magnitude.dtype).clamp_min(0)


def save_spectrum(magnitude: Tensor, path: str | os.PathLike) -> None:
    """Save a magnitude spectrum (``torch.save``; reload with :func:`load_spectrum`)."""
    _check_spectrum(magnitude, f"the magnitude to save to {os.fspath(path)!r}")
    torch.save({"magnitude": magnitude.detach().cpu()}, path)


def load_spectrum(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Tensor:
    """Load a magnitude spectrum saved by :func:`save_spectrum` (a ``.npy`` array [3, H, W//2+1] works too).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file was not saved by :func:`save_spectrum`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no spectrum file at {path!r}; compute one with magnitude_spectrum(your_images)")
    if path.endswith(".npy"):
        import numpy as np

        magnitude = torch.from_numpy(np.load(path)).float().to(map_location)
    else:
        content = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(content, dict) or "magnitude" not in content:
            raise ValueError(f"{path!r} is not a spectrum saved by save_spectrum (no 'magnitude' entry)")
        magnitude = content["magnitude"]
    _check_spectrum(magnitude, path)
    return magnitude


def _check_spectrum(magnitude: object, where: str) -> None:
    if not isinstance(magnitude, Tensor) or magnitude.ndim != 3 or magnitude.shape[0] != 3:
        shape = tuple(magnitude.shape) if isinstance(magnitude, Tensor) else type(magnitude).__name__
        raise ValueError(f"{where}: a magnitude spectrum is a tensor [3, H, W//2+1], got {shape}")
    if magnitude.is_complex() or not magnitude.is_floating_point() or (magnitude < 0).any():
        raise ValueError(f"{where}: a magnitude spectrum holds real values >= 0")
