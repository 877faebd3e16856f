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


def _resize_matrix(n_in: int, n_out: int) -> Tensor:
    """The 1-D bilinear resize of :func:`resize_bilinear` as a matrix [n_out, n_in] (it is separable and linear)."""
    if n_in == n_out:
        return torch.eye(n_in, dtype=torch.float64)
    rows = F.interpolate(torch.eye(n_in, dtype=torch.float64)[:, None], size=n_out, mode="linear", align_corners=False)
    return rows[:, 0].T


def _blur_matrix(n: int, taps: Tensor) -> Tensor:
    """``x -> correlate(zero-pad(x, (k-1)//2 before, the rest after), taps)`` as a matrix [n, n]."""
    k = len(taps)
    before = (k - 1) // 2
    matrix = torch.zeros(n, n, dtype=torch.float64)
    for t in range(k):  # out[i] += taps[t] * x[i + t - before]
        matrix += torch.diag(torch.full((n - abs(t - before),), float(taps[t]), dtype=torch.float64), t - before)
    return matrix


def _taps(axis: int) -> Tensor:
    """The 1-D factor of the reference kernel along ``axis`` (0: rows, 1: columns), float64, sums to 1."""
    return clickme_kernel().double().sum(dim=1 - axis)


@lru_cache(maxsize=32)
def _blur_operator(axis: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The 64x64 blur matrix of ``axis`` (:func:`_blur_matrix`), in ``dtype`` on ``device``."""
    return _blur_matrix(BLUR_SIZE, _taps(axis)).to(device=device, dtype=dtype)


def _block_downsample(maps: Tensor, k_y: int, k_x: int) -> Tensor:
    """Bilinear resize (half-pixel centres) by whole factors ``k``: output pixel ``i`` samples input position
    ``k i + (k - 1) / 2``, which is pixel ``k i + (k - 1) / 2`` for an odd ``k`` and the mean of pixels
    ``k i + k / 2 - 1`` and ``k i + k / 2`` for an even one. Equal to :func:`resize_bilinear` up to rounding."""

    def offsets(k: int) -> list[int]:
        return [k // 2] if k % 2 else [k // 2 - 1, k // 2]

    picks = [maps[..., r::k_y, c::k_x] for r in offsets(k_y) for c in offsets(k_x)]
    return torch.stack(picks).sum(dim=0).mul_(1 / len(picks)) if len(picks) > 1 else picks[0]


@lru_cache(maxsize=32)
def _down_operator(n_in: int, axis: int) -> Tensor:
    """``blur @ resize n_in -> 64`` [64, n_in], float64, for the rows (``axis=0``) or the columns (``axis=1``).

    The reference kernel is separable: ``exp(-(x^2 + y^2) / 2s^2) / S = (exp(-y^2 / 2s^2) / S_y) (exp(-x^2 / 2s^2) /
    S_x)``; the rows (y, descending) and the columns (x, ascending) hold the same taps in opposite orders."""
    return _blur_matrix(BLUR_SIZE, _taps(axis)) @ _resize_matrix(n_in, BLUR_SIZE)


@lru_cache(maxsize=32)
def _up_operator(n_out: int) -> Tensor:
    """``resize 64 -> n_out`` [n_out, 64], float64."""
    return _resize_matrix(BLUR_SIZE, n_out)


def _operator(matrix: Tensor, like: Tensor) -> Tensor:
    return matrix.to(device=like.device, dtype=like.dtype)


def blurred_heatmap(heatmap: Tensor) -> Tensor:
    """First half of :func:`clickme_heatmap`: raw maps [..., H, W] -> float32 [..., 64, 64], resized to 64x64 and
    blurred (``(K_y D_y) M (K_x D_x)^T``), not yet brought to the output size nor scaled.

    The loader's workers ship this small map (16 KB instead of 200 KB at 224 px) when batches are compact;
    :func:`expand_heatmap` finishes it on the batch's device. Maps whose sides are whole multiples of 64 (ClickMe's
    256) are resized by picking pixels (:func:`_block_downsample`, 3x faster), then blurred ``K_y M K_x^T``."""
    maps = heatmap.float()
    (h, w), dtype, device = maps.shape[-2:], maps.dtype, maps.device
    if h % BLUR_SIZE == 0 and w % BLUR_SIZE == 0:
        small = _block_downsample(maps, h // BLUR_SIZE, w // BLUR_SIZE)
        return _blur_operator(0, dtype, device) @ small @ _blur_operator(1, dtype, device).T
    rows = _operator(_down_operator(heatmap.shape[-2], 0), maps)
    cols = _operator(_down_operator(heatmap.shape[-1], 1), maps)
    return rows @ maps @ cols.T


def expand_heatmap(blurred: Tensor, size: tuple[int, int], out: Tensor | None = None) -> Tensor:
    """Second half of :func:`clickme_heatmap`: blurred 64x64 maps [..., 64, 64] -> float32 [..., *size] in [0, 1]
    (bilinear resize ``U_y B U_x^T``, then min-max). Batched maps give the same values as one by one.
    ``out``: a tensor [..., *size] to write the maps into (e.g. a reused batch buffer)."""
    up_y, up_x = _operator(_up_operator(size[0]), blurred), _operator(_up_operator(size[1]), blurred)
    return _min_max_(torch.matmul(up_y @ blurred, up_x.T, out=out))


def clickme_heatmap(heatmap: Tensor, size: tuple[int, int]) -> Tensor:
    """Raw ClickMe maps [..., H, W] (uint8 or float, any H, W; 256x256 in the shards) -> float32 [..., *size] in
    [0, 1]: resize to 64x64, reference blur, resize to ``size``, min-max (module docstring).

    Every step but the min-max is linear and separable, so the map is computed as ``U_y (K_y D_y) M (K_x D_x)^T
    U_x^T`` with the resize (D, U) and blur (K) matrices of each axis: four small matrix products, the same values
    as :func:`resize_bilinear` / :func:`blur_same` / :func:`resize_bilinear` up to float rounding, several times
    faster on a CPU. It is :func:`expand_heatmap` of :func:`blurred_heatmap`."""
    return expand_heatmap(blurred_heatmap(heatmap), size)
