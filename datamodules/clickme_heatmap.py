"""The ClickMe human-map preprocessing of the reference code (serre-lab/Harmonization, ``clickme_dataset.py``).

The raw ClickMe map (uint8, 256x256) is resized to 64x64 (bilinear), blurred with a 10x10 Gaussian of sigma 10,
resized to the model's input size (bilinear), then min-max scaled to [0, 1] (the last step is this project's:
the reference keeps the raw scale, which the harmonization loss ignores anyway).

Two details of the reference are reproduced on purpose (they come from TensorFlow):

* the kernel size is even, so its grid is not centred: columns run over x = -5..4 and rows over y = 4..-5, i.e.
  the row profile peaks at tap 4 and the column profile at tap 5;
* ``conv2d(..., padding='SAME')`` pads with zeros, and for an even kernel puts the extra row/column at the
  bottom/right: 4 before, 5 after. TensorFlow's convolution is a cross-correlation, like PyTorch's.

Net effect: the blur is centred vertically but shifted one pixel to the right (at 64x64). Bilinear resizing
follows TensorFlow 2's ``tf.image.resize`` (half-pixel centres, no antialiasing), which is
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BLUR_SIZE = 64  #: side of the map when it is blurred
KERNEL_SIZE = 10
KERNEL_SIGMA = 10.0


def clickme_kernel(size: int = KERNEL_SIZE, sigma: float = KERNEL_SIGMA) -> Tensor:
    """The reference's Gaussian kernel: float [size, size], sums to 1.

    ``k[i, j] ~ exp(-(x_j^2 + y_i^2) / (2 sigma^2))`` with ``x = -((size-1)//2 + 1) .. (size-1)//2`` ascending
    and ``y`` the same values descending, written with Python's floor division like the reference.
    """
    low, high = -(size - 1) // 2, (size - 1) // 2  # -(9)//2 = -5 and 4 for size 10
    xs = torch.arange(low, high + 1, dtype=torch.float64)
    ys = torch.arange(high, low - 1, -1, dtype=torch.float64)
    kernel = torch.exp(-(xs[None, :] ** 2 + ys[:, None] ** 2) / (2 * sigma**2))
    return (kernel / kernel.sum()).float()


def blur_same(maps: Tensor, kernel: Tensor) -> Tensor:
    """``tf.nn.conv2d(maps, kernel, strides=1, padding='SAME')`` for maps [..., H, W] and a 2-D kernel."""
    kh, kw = kernel.shape
    top, left = (kh - 1) // 2, (kw - 1) // 2
    shape = maps.shape
    padded = F.pad(maps.reshape(-1, 1, *shape[-2:]), (left, kw - 1 - left, top, kh - 1 - top))
    return F.conv2d(padded, kernel.to(maps)[None, None]).reshape(shape)


def resize_bilinear(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``tf.image.resize(..., method='bilinear')`` (TF2: half-pixel centres, no antialias) for maps [..., H, W]."""
    shape = maps.shape
    if tuple(shape[-2:]) == tuple(size):
        return maps
    out = F.interpolate(maps.reshape(-1, 1, *shape[-2:]), size=tuple(size), mode="bilinear", align_corners=False)
    return out.reshape(*shape[:-2], *size)


def min_max(maps: Tensor) -> Tensor:
    """Scale each map [..., H, W] to [0, 1]; a constant map becomes zeros."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


def clickme_heatmap(heatmap: Tensor, size: tuple[int, int]) -> Tensor:
    """Raw ClickMe maps [..., H, W] (uint8 or float, any H, W; 256x256 in the shards) -> float32 [..., *size] in
    [0, 1]: resize to 64x64, reference blur, resize to ``size``, min-max (module docstring)."""
    maps = resize_bilinear(heatmap.float(), (BLUR_SIZE, BLUR_SIZE))
    maps = blur_same(maps, clickme_kernel())
    return min_max(resize_bilinear(maps, size))
