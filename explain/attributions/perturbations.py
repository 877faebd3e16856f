"""Perturbation operators of the Sobol attribution method (Fel et al. 2021, "Look at the Variance!").

A perturbation turns an image ``x`` [C,H,W] and a mask ``M`` [H,W] with values in [0,1] into a perturbed
image. The three operators of the reference code (deel-ai/xplique, fel-thomas/Sobol-Attribution-Method):

* ``"inpainting"``: ``x M + (1 - M) x0`` with a constant baseline ``x0`` (0 by default);
* ``"blur"``:       ``x M + (1 - M) blur(x)``, ``blur`` a ``blur_size`` x ``blur_size`` box filter
  (``cv2.blur(x, (10, 10))`` in the reference: reflect-101 borders, even kernels anchored at ``k // 2``);
* ``"amplitude"``:  ``x (M - 1/2) sigma`` (the reference's docstrings say ``x + (M - 1/2) sigma`` but its
  code, which produced the published maps, multiplies; we follow the code).

All three are affine in the mask, ``x_M = base + delta (M - offset)``, which is how :func:`apply_masks`
evaluates them: one fused multiply-add per output element, with the mask upsampled by broadcasting
(no upsampled mask tensor is built when the grid divides the image).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from explain.validation import one_of, positive_int

Perturbation = Literal["inpainting", "blur", "amplitude"]
PERTURBATIONS: tuple[str, ...] = ("inpainting", "blur", "amplitude")


def box_blur(images: Tensor, kernel_size: int = 10) -> Tensor:
    """Mean over a ``kernel_size`` x ``kernel_size`` window of images [B,C,H,W], as ``cv2.blur``.

    Borders are reflected without repeating the edge pixel (``cv2.BORDER_REFLECT_101``, torch's ``"reflect"``;
    ``"replicate"`` when the image is too small to reflect); an even window spans ``[i - k//2, i + k - 1 - k//2]``.
    """
    positive_int("kernel_size", kernel_size)
    if kernel_size == 1:
        return images.clone()
    before, after = kernel_size // 2, kernel_size - 1 - kernel_size // 2
    mode = "reflect" if max(before, after) < min(images.shape[-2:]) else "replicate"
    padded = F.pad(images, (before, after, before, after), mode=mode)
    return F.avg_pool2d(padded, kernel_size, stride=1)


def perturbation_terms(
    images: Tensor,
    perturbation: Perturbation = "inpainting",
    baseline: float | Tensor = 0.0,
    blur_size: int = 10,
    amplitude_sigma: float = 1.0,
) -> tuple[Tensor, Tensor, float]:
    """Write ``perturbation`` of images [B,C,H,W] as ``base + delta (M - offset)``: ``(base, delta, offset)``.

    ``base`` is a 0-dim tensor or [B,C,H,W]; ``delta`` is [B,C,H,W]. ``baseline`` (inpainting only) is a
    number or a tensor broadcastable to [B,C,H,W].
    """
    one_of("perturbation", perturbation, PERTURBATIONS)
    if perturbation == "inpainting":
        if isinstance(baseline, Tensor):
            base = baseline.to(images).expand_as(images).contiguous()
        else:
            base = images.new_tensor(float(baseline))
        return base, images - base, 0.0
    if perturbation == "blur":
        blurred = box_blur(images, blur_size)
        return blurred, images - blurred, 0.0
    return images.new_zeros(()), images * amplitude_sigma, 0.5  # "amplitude"


def upsample_nearest(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour upsampling of masks [N, g, g] to [N, H, W] (``"nearest-exact"``: pixel centres).

    When ``g`` divides H and W every cell becomes an exact ``H/g`` x ``W/g`` block (same as ``"nearest"``).
    """
    return F.interpolate(masks[:, None], size=size, mode="nearest-exact")[:, 0]


def apply_masks(base: Tensor, delta: Tensor, masks: Tensor, out: Tensor | None = None) -> Tensor:
    """``base + delta * up(masks)`` for ONE image: base 0-dim or [C,H,W], delta [C,H,W], masks [N,g,g] -> [N,C,H,W].

    ``up`` is :func:`upsample_nearest`. When ``g`` divides H and W the upsampling is a broadcast over a
    [N, C, g, H/g, g, W/g] view, so the only tensor written is the result (into ``out`` when given).
    """
    channels, height, width = delta.shape
    nb, rows, cols = masks.shape
    if out is None:
        out = delta.new_empty((nb, channels, height, width))
    masks = masks.to(delta.dtype)
    if height % rows == 0 and width % cols == 0:
        block = (channels, rows, height // rows, cols, width // cols)
        view = out.view(nb, *block)
        base = base.view(block) if base.ndim else base
        torch.addcmul(base, delta.view(block), masks.view(nb, 1, rows, 1, cols, 1), out=view)
    else:
        torch.addcmul(base, delta, upsample_nearest(masks, (height, width))[:, None], out=out)
    return out


def perturb(
    image: Tensor,
    masks: Tensor,
    perturbation: Perturbation = "inpainting",
    baseline: float | Tensor = 0.0,
    blur_size: int = 10,
    amplitude_sigma: float = 1.0,
) -> Tensor:
    """Perturbed copies [N,C,H,W] of one image [C,H,W] under masks [N,g,g] in [0,1] (module docstring)."""
    base, delta, offset = perturbation_terms(image[None], perturbation, baseline, blur_size, amplitude_sigma)
    return apply_masks(base[0] if base.ndim else base, delta[0], masks - offset)
