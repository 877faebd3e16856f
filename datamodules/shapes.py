"""Synthetic shortcut scenes: a coloured shape on a noisy background, plus a class-coded watermark.

The class is the shape. Its colour, size and position are drawn independently of the class, so only the shape
tells the class. The watermark is a solid patch of a saturated palette colour (one per class) in the top-left
corner: a cue that is easier to learn than the shape and that agrees with the label only most of the time.
The human map is the object's mask blurred with a small Gaussian, and objects are kept away from the watermark
by more than the blur radius, so the map is exactly zero on the watermark.

Everything is vectorized over the batch of scenes and drawn from a ``torch.Generator``, so a split of thousands
of images takes a fraction of a second and is a pure function of the seed.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable

import torch
from torch import Tensor

# Mask of each shape in box coordinates (u, v) in [-1, 1]^2, v pointing down. Pairs that are rotations of each
# other (square / diamond, cross / x) are both listed on purpose: the shapes are never rotated.
_SHAPES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "square": lambda u, v: torch.maximum(u.abs(), v.abs()) <= 0.8,
    "disk": lambda u, v: u**2 + v**2 <= 0.9**2,
    "triangle": lambda u, v: (v <= 0.9) & (u.abs() <= (v + 1.0) / 1.9),
    "cross": lambda u, v: ((u.abs() <= 0.3) & (v.abs() <= 0.95)) | ((v.abs() <= 0.3) & (u.abs() <= 0.95)),
    "ring": lambda u, v: ((u**2 + v**2) >= 0.5**2) & ((u**2 + v**2) <= 0.95**2),
    "diamond": lambda u, v: u.abs() + v.abs() <= 1.0,
    "frame": lambda u, v: (torch.maximum(u.abs(), v.abs()) <= 0.9) & (torch.maximum(u.abs(), v.abs()) >= 0.5),
    "x": lambda u, v: (((u - v).abs() <= 0.4) | ((u + v).abs() <= 0.4)) & (torch.maximum(u.abs(), v.abs()) <= 0.9),
}
SHAPE_NAMES: tuple[str, ...] = tuple(_SHAPES)


def blur_sigma(image_size: int) -> float:
    """Standard deviation of the Gaussian that blurs the object mask into the human map: 1 px per 32 px."""
    return image_size / 32


def blur_radius(image_size: int) -> int:
    """Half-width of the (truncated) blur kernel: 2 sigma, so the map is exactly zero beyond it."""
    return math.ceil(2 * blur_sigma(image_size))


def blur_matrix(image_size: int) -> Tensor:
    """The truncated Gaussian blur along one axis as a matrix: float [S, S], reflect padding at the borders.

    ``B @ m @ B.T`` equals ``torchvision.transforms.v2.functional.gaussian_blur`` with kernel size
    ``2 * blur_radius + 1`` and sigma ``blur_sigma``, but as two batched matmuls it is ~30x faster on CPU than a
    one-channel ``conv2d`` over thousands of small images.
    """
    radius, sigma = blur_radius(image_size), blur_sigma(image_size)
    taps = torch.arange(-radius, radius + 1)
    weights = torch.exp(-(taps.float() ** 2) / (2 * sigma**2))
    source = (torch.arange(image_size)[:, None] + taps).abs()  # reflect at 0 (edge not repeated) ...
    source = torch.where(source > image_size - 1, 2 * (image_size - 1) - source, source)  # ... and at S - 1
    matrix = torch.zeros(image_size, image_size).scatter_add_(1, source, weights.expand(image_size, -1))
    return matrix / weights.sum()


def watermark_mask(image_size: int, watermark_size: int) -> Tensor:
    """Pixels of the watermark: bool [image_size, image_size], a ``watermark_size`` square in the top-left corner."""
    mask = torch.zeros(image_size, image_size, dtype=torch.bool)
    mask[:watermark_size, :watermark_size] = True
    return mask


def watermark_palette(num_classes: int) -> Tensor:
    """One saturated colour per class, evenly spaced hues: float [num_classes, 3] in [0, 1]."""
    return torch.tensor([colorsys.hsv_to_rgb(k / num_classes, 1.0, 1.0) for k in range(num_classes)])


def watermark_classes(labels: Tensor, num_classes: int, agree_prob: float, generator: torch.Generator) -> Tensor:
    """The class each watermark shows: ``labels[i]`` with probability ``agree_prob``, else a uniformly drawn
    WRONG class (``agree_prob = 0`` always shows a wrong class, as in the flipped test split)."""
    agree = torch.rand(labels.shape, generator=generator) < agree_prob
    wrong = (labels + torch.randint(1, num_classes, labels.shape, generator=generator)) % num_classes
    return torch.where(agree, labels, wrong)


def stamp_watermark(images: Tensor, classes: Tensor, num_classes: int, watermark_size: int) -> Tensor:
    """Paint the class-coded patch into the top-left corner of float images [N, 3, S, S] (a new tensor)."""
    images = images.clone()
    images[:, :, :watermark_size, :watermark_size] = watermark_palette(num_classes)[classes][:, :, None, None]
    return images


def render_scenes(
    num_samples: int,
    num_classes: int,
    image_size: int,
    watermark_size: int,
    generator: torch.Generator,
    size_range: tuple[float, float] = (0.22, 0.34),
    noise_std: float = 0.05,
    min_contrast: float = 0.3,
) -> dict[str, Tensor]:
    """Draw ``num_samples`` scenes without watermark.

    Args:
        size_range: the shape's half-width as a fraction of ``image_size``, drawn uniformly (capped on small
            images so that the shape fits beside the watermark).
        noise_std: std of the Gaussian pixel noise added to the whole image.
        min_contrast: least Euclidean RGB distance between the object's colour and the background's grey.

    Returns:
        ``images`` float [N, 3, S, S] in [0, 1], ``labels`` int64 [N] (index into ``SHAPE_NAMES``),
        ``heatmaps`` float [N, S, S] in [0, 1] with max 1 (the blurred object mask).

    Raises:
        ValueError: ``num_classes`` outside ``[2, len(SHAPE_NAMES)]``, or an image too small for a shape beside
            the watermark.
    """
    if not 2 <= num_classes <= len(SHAPE_NAMES):
        raise ValueError(f"num_classes must be in [2, {len(SHAPE_NAMES)}] (shapes: {SHAPE_NAMES}), got {num_classes}")
    n, s = num_samples, image_size
    labels = torch.randint(num_classes, (n,), generator=generator)

    # half-width r and centre (cx, cy) in pixels; the object's box must stay clear of the watermark plus blur
    r = s * (size_range[0] + (size_range[1] - size_range[0]) * torch.rand(n, generator=generator))
    keep_out = watermark_size + blur_radius(s) + 1
    largest = (s - 2 - keep_out) / 2  # beyond this half-width, no position clears the watermark (small images)
    if largest < 2:
        raise ValueError(
            f"image_size={s} leaves no room for a shape beside a watermark of {watermark_size} px; "
            "use a smaller watermark_size or a larger image_size"
        )
    r = r.clamp(max=largest)
    cx, cy = torch.empty(n), torch.empty(n)
    todo = torch.ones(n, dtype=torch.bool)
    for _ in range(32):  # rejection sampling, vectorized; each round keeps well over half of the draws
        k = int(todo.sum())
        if k == 0:
            break
        span = s - 2 * r[todo] - 2
        cx[todo] = r[todo] + 1 + span * torch.rand(k, generator=generator)
        cy[todo] = r[todo] + 1 + span * torch.rand(k, generator=generator)
        todo = (cx - r < keep_out) & (cy - r < keep_out)
    cy[todo] = s - 1 - r[todo]  # the few left: move them to the bottom edge, far from the watermark

    grid = torch.arange(s, dtype=torch.float32) + 0.5  # pixel centres
    u = (grid[None, None, :] - cx[:, None, None]) / r[:, None, None]
    v = (grid[None, :, None] - cy[:, None, None]) / r[:, None, None]
    masks = torch.zeros(n, s, s, dtype=torch.bool)
    for k, draw in enumerate(list(_SHAPES.values())[:num_classes]):
        idx = (labels == k).nonzero().squeeze(1)
        masks[idx] = draw(u[idx].expand(-1, s, s), v[idx].expand(-1, s, s))

    # grey background, object colour at least `min_contrast` away from it, noise on everything
    grey = 0.2 + 0.6 * torch.rand(n, 1, generator=generator)
    colour = torch.rand(n, 3, generator=generator)
    for _ in range(32):
        low = (colour - grey).norm(dim=1) < min_contrast
        if not low.any():
            break
        colour[low] = torch.rand(int(low.sum()), 3, generator=generator)
    colour[low] = torch.where(grey[low] < 0.5, 1.0, 0.0).expand(-1, 3)  # fallback: white on dark, black on light
    images = torch.where(masks[:, None], colour[:, :, None, None], grey[:, :, None, None].expand(-1, 3, 1, 1))
    images = (images + noise_std * torch.randn(n, 3, s, s, generator=generator)).clamp(0, 1)

    blur = blur_matrix(s)
    heatmaps = blur @ masks.float() @ blur.T
    heatmaps = heatmaps / heatmaps.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return {"images": images, "labels": labels, "heatmaps": heatmaps}
