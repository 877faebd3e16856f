"""Square crops of images, as CRAFT fits its concepts on them (Fel et al. 2023): ``unfold`` with a stride."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from explain.validation import positive_int

#: reference geometry: 64-pixel crops of 224-pixel images, stride int(0.8 * 64)
REFERENCE_IMAGE_SIZE, REFERENCE_PATCH_SIZE, REFERENCE_STRIDE_RATIO = 224, 64, 0.8


def default_patch_size(image_size: tuple[int, int] | int) -> int:
    """The reference's 64 pixels at 224, scaled with the image: ``round(min(H, W) * 64 / 224)`` (at least 1)."""
    side = min(image_size) if isinstance(image_size, (tuple, list)) else image_size
    return max(1, round(side * REFERENCE_PATCH_SIZE / REFERENCE_IMAGE_SIZE))


def default_stride(patch_size: int) -> int:
    """``int(0.8 * patch_size)`` (at least 1), as the reference."""
    return max(1, int(patch_size * REFERENCE_STRIDE_RATIO))


def extract_crops(images: Tensor, patch_size: int, stride: int) -> Tensor:
    """All ``patch_size`` crops of ``images`` [B, C, H, W] on a ``stride`` grid: [B * L, C, p, p], image-major.

    ``L = ((H - p) // stride + 1) * ((W - p) // stride + 1)`` crops per image (the reference's ``unfold``).

    Raises:
        ValueError: ``images`` not [B, C, H, W], or ``patch_size`` outside ``[1, image side]``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got {tuple(images.shape)}")
    if not 1 <= patch_size <= min(images.shape[-2:]):
        raise ValueError(
            f"patch_size must be between 1 and the image side {min(images.shape[-2:])}, got {patch_size}"
        )
    positive_int("stride", stride)
    channels = images.shape[1]
    patches = F.unfold(images, kernel_size=patch_size, stride=stride)  # [B, C p p, L]
    return patches.transpose(1, 2).reshape(-1, channels, patch_size, patch_size)
