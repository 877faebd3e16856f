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

from functools import lru_cache

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
    """Scale each map [..., H, W] to [0, 1]; a constant map becomes zeros (its numerator is 0)."""
    return _min_max_(maps.clone())


def _min_max_(maps: Tensor) -> Tensor:
    """:func:`min_max` in place (no new tensor: at 224 px a batch of maps is 13 MB of fresh memory)."""
    flat = maps.flatten(-2)  # amin and amax, not aminmax: 20x faster on a CPU (torch 2.15)
    low, high = flat.amin(dim=-1), flat.amax(dim=-1)
    span = (high - low).clamp_min(torch.finfo(maps.dtype).tiny)
    return maps.sub_(low[..., None, None]).div_(span[..., None, None])


def _blur_matrix(n: int, taps: Tensor) -> Tensor:
    """``x -> correlate(zero-pad(x, (k-1)//2 before, the rest after), taps)`` as a matrix [n, n]."""
    k = len(taps)
    before = (k - 1) // 2
    matrix = torch.zeros(n, n, dtype=torch.float64)
    for t in range(k):  # out[i] += taps[t] * x[i + t - before]
        matrix += torch.diag(torch.full((n - abs(t - before),), float(taps[t]), dtype=torch.float64), t - before)
    return matrix


@lru_cache(maxsize=32)
def _blur_operator(axis: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The 64x64 blur matrix of ``axis`` (0: rows, 1: columns), in ``dtype`` on ``device``.

    The reference kernel is separable: ``exp(-(x^2 + y^2) / 2s^2) / S = (exp(-y^2 / 2s^2) / S_y) (exp(-x^2 / 2s^2) /
    S_x)``; the rows (y, descending) and the columns (x, ascending) hold the same taps in opposite orders."""
    taps = clickme_kernel().double().sum(dim=1 - axis)  # the 1-D factor of this axis (sums to 1)
    return _blur_matrix(BLUR_SIZE, taps).to(device=device, dtype=dtype)


def blurred_heatmap(heatmap: Tensor) -> Tensor:
    """First half of :func:`clickme_heatmap`: raw maps [..., H, W] -> float32 [..., 64, 64], resized to 64x64
    (:func:`resize_bilinear`) and blurred as ``K_y M K_x^T`` (the 2-D correlation with zero padding of
    :func:`blur_same`, written with the blur matrix of each axis: the same values up to float rounding, 3x faster on
    a CPU), not yet brought to the output size nor scaled.

    The loader's workers ship this small map (16 KB instead of 200 KB at 224 px) when batches are compact;
    :func:`expand_heatmap` finishes it on the batch's device."""
    maps = resize_bilinear(heatmap.float(), (BLUR_SIZE, BLUR_SIZE))
    return _blur_operator(0, maps.dtype, maps.device) @ maps @ _blur_operator(1, maps.dtype, maps.device).T


def expand_heatmap(blurred: Tensor, size: tuple[int, int]) -> Tensor:
    """Second half of :func:`clickme_heatmap`: blurred 64x64 maps [..., 64, 64] -> float32 [..., *size] in [0, 1]
    (:func:`resize_bilinear`, then min-max). Batched maps give the same values as one by one.

    The resize is ``interpolate``'s, not the matrix product ``U_y B U_x^T``: it reads 4 pixels per output pixel
    where the product spends 64 + 64 multiply-adds (a batch of 64 maps at 224 px: 5.5 ms instead of 8 ms)."""
    maps = resize_bilinear(blurred, size)
    return _min_max_(maps if maps is not blurred else maps.clone())


def clickme_heatmap(heatmap: Tensor, size: tuple[int, int]) -> Tensor:
    """Raw ClickMe maps [..., H, W] (uint8 or float, any H, W; 256x256 in the shards) -> float32 [..., *size] in
    [0, 1]: resize to 64x64, reference blur, resize to ``size``, min-max (module docstring).

    It is :func:`expand_heatmap` of :func:`blurred_heatmap` (the blur as two products with 64x64 matrices)."""
    return expand_heatmap(blurred_heatmap(heatmap), size)
