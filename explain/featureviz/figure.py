"""Show a MACO image with its transparency map: ``image * alpha + background * (1 - alpha)``, as Horama's
``plot_maco`` (the image's extreme percentiles clipped and rescaled to [0, 1]; alpha averaged over channels,
clipped at a high percentile and divided by its maximum, so the most attended regions are fully opaque)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from explain.validation import in_interval


def _clip_percentiles(x: Tensor, low: float, high: float) -> Tensor:
    flat = x.flatten().float()
    bounds = torch.quantile(flat, torch.tensor([low / 100, high / 100], dtype=flat.dtype, device=flat.device))
    return x.clamp(bounds[0].item(), bounds[1].item())


def _rescale(x: Tensor) -> Tensor:
    x = x - x.min()
    return x / x.max().clamp_min(1e-12)


def maco_overlay(
    image: Tensor,
    alpha: Tensor,
    percentile_image: float = 1.0,
    percentile_alpha: float = 80.0,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> Tensor:
    """RGB composite [3, H, W] in [0, 1] of an ``image`` [3,H,W] and its transparency ``alpha`` [H,W] (or [3,H,W]).

    The image is clipped to its ``[p, 100 - p]`` percentiles (``p = percentile_image``) and rescaled to [0, 1];
    alpha is clipped above at its ``percentile_alpha`` percentile and divided by its maximum.

    Raises:
        ValueError: ``image`` not [3, H, W], ``alpha`` not [H, W] or [3, H, W] of the image's size, or a
            percentile out of range (``percentile_image`` in [0, 50), ``percentile_alpha`` in (0, 100]).
        TypeError: ``alpha`` is not a tensor.

    >>> import torch
    >>> image, alpha = torch.rand(3, 8, 8), torch.zeros(8, 8)
    >>> alpha[:4] = 1.0  # the top half opaque, the bottom half shows the white background
    >>> overlay = maco_overlay(image, alpha)
    >>> overlay.shape, bool((overlay[:, 4:] == 1.0).all())
    (torch.Size([3, 8, 8]), True)
    """
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a tensor [3, H, W], got {getattr(image, 'shape', type(image).__name__)}")
    if not isinstance(alpha, Tensor):
        raise TypeError(f"alpha must be a tensor [H, W], got {type(alpha).__name__}")
    alpha = alpha.detach().float().to(image.device)
    alpha = alpha.mean(0) if alpha.ndim == 3 else alpha
    if alpha.shape != image.shape[-2:]:
        raise ValueError(f"alpha must be [H, W] = {tuple(image.shape[-2:])}, got {tuple(alpha.shape)}")
    in_interval("percentile_image", percentile_image, 0, 50, high_open=True)
    in_interval("percentile_alpha", percentile_alpha, 0, 100, low_open=True)
    image = _rescale(_clip_percentiles(image.detach().float(), percentile_image, 100 - percentile_image))
    alpha = _clip_percentiles(alpha, 0.0, percentile_alpha)
    alpha = (alpha / alpha.max().clamp_min(1e-12)).clamp(0, 1)
    back = torch.tensor(background, dtype=image.dtype, device=image.device)[:, None, None]
    return image * alpha + back * (1 - alpha)


def plot_maco(image: Tensor, alpha: Tensor, *, title: str | None = None, ax=None, **overlay_options: Any):
    """A matplotlib Figure of ``maco_overlay(image, alpha, **overlay_options)`` (``percentile_image``,
    ``percentile_alpha``, ``background``: see :func:`maco_overlay`), drawn into ``ax`` when given, else into a
    new figure.

    Raises:
        ValueError, TypeError: as :func:`maco_overlay` (an unknown option is a ``TypeError``).
    """
    import matplotlib.pyplot as plt

    overlay = maco_overlay(image, alpha, **overlay_options)
    if ax is None:
        figure, ax = plt.subplots(figsize=(4, 4))
    else:
        figure = ax.figure
    ax.imshow(overlay.permute(1, 2, 0).cpu().numpy())
    ax.axis("off")
    if title is not None:
        ax.set_title(title)
    return figure
