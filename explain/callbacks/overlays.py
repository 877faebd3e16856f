"""Pictures of explanations: an explanation map over its image, with the human map beside it.

Everything returns ``uint8`` RGB arrays [H, W, 3], which every sink (W&B, TensorBoard, PNG) takes.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import colormaps
from torch import Tensor


def _unit(x: Tensor) -> Tensor:
    """Min-max to [0, 1] (a constant tensor gives zeros)."""
    x = x.float()
    low, high = x.min(), x.max()
    return (x - low) / (high - low) if high > low else torch.zeros_like(x)


def display_image(image: Tensor) -> Tensor:
    """An image [C,H,W] as RGB float [3,H,W] in [0,1]: grey repeated, extra channels dropped, values outside
    [0, 1] (normalized inputs) min-max rescaled."""
    image = image.detach().float().cpu()
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    image = image[:3]
    return image if image.min() >= 0 and image.max() <= 1 else _unit(image)


def colorize(heatmap: Tensor, cmap: str = "jet") -> Tensor:
    """A map [H,W] min-max scaled and coloured: RGB float [3,H,W]."""
    rgb = colormaps[cmap](_unit(heatmap.detach().cpu()).numpy())[..., :3]
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()


def overlay(image: Tensor, heatmap: Tensor, alpha: float = 0.5, cmap: str = "jet") -> Tensor:
    """``(1 - alpha) image + alpha colour(map)``: RGB float [3,H,W]."""
    return (1 - alpha) * display_image(image) + alpha * colorize(heatmap, cmap)


#: colour of the outline drawn around the spurious region (white: jet overlays never reach it)
OUTLINE_COLOUR = (1.0, 1.0, 1.0)


def outline_of(mask: Tensor) -> Tensor:
    """The pixels just outside a bool region [H,W] (its 8-neighbourhood minus itself): bool [H,W]. Drawn there,
    the outline leaves the region's own pixels (e.g. a watermark) visible."""
    grown = torch.nn.functional.max_pool2d(mask[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
    return grown & ~mask.bool()


def draw_outline(tile: Tensor, mask: Tensor, colour: tuple[float, float, float] = OUTLINE_COLOUR) -> Tensor:
    """``tile`` RGB [3,H,W] with :func:`outline_of` ``mask`` painted in ``colour`` (a new tensor)."""
    ring = outline_of(mask.cpu())
    return torch.where(ring, torch.tensor(colour)[:, None, None], tile)


def explanation_panel(
    image: Tensor,
    heatmap: Tensor,
    human: Tensor | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    min_size: int = 128,
    spurious: Tensor | None = None,
) -> np.ndarray:
    """``[image | map over image | human map over image]`` side by side (the last one when ``human`` is given),
    with the ``spurious`` region (bool [H,W], e.g. a watermark) outlined in every tile when given, upscaled
    (nearest, whole pixels) so the short side is at least ``min_size`` pixels: uint8 [H', W', 3]."""
    tiles = [display_image(image), overlay(image, heatmap, alpha, cmap)]
    if human is not None:
        tiles.append(overlay(image, human, alpha, cmap))
    if spurious is not None:
        tiles = [draw_outline(tile, spurious) for tile in tiles]
    return upscale(to_uint8(torch.cat(tiles, dim=2)), min_size)


def to_uint8(image: Tensor) -> np.ndarray:
    """RGB float [3,H,W] in [0,1] -> uint8 [H,W,3]."""
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def upscale(picture: np.ndarray, min_size: int) -> np.ndarray:
    """Repeat every pixel so the short side of ``picture`` [H,W,3] is at least ``min_size``."""
    scale = max(1, -(-min_size // min(picture.shape[:2])))
    return picture if scale == 1 else picture.repeat(scale, axis=0).repeat(scale, axis=1)


def grid(images: list[np.ndarray], nrow: int = 4, padding: int = 4) -> np.ndarray:
    """Several uint8 [H,W,3] pictures in a grid of ``nrow`` columns with white ``padding`` (as
    ``torchvision.utils.make_grid``); smaller pictures are padded to the largest."""
    height = max(image.shape[0] for image in images) + padding
    width = max(image.shape[1] for image in images) + padding
    rows = -(-len(images) // nrow)
    columns = min(nrow, len(images))
    out = np.full((rows * height + padding, columns * width + padding, 3), 255, dtype=np.uint8)
    for k, image in enumerate(images):
        top, left = (k // nrow) * height + padding, (k % nrow) * width + padding
        out[top : top + image.shape[0], left : left + image.shape[1]] = image
    return out


def figure_to_array(figure) -> np.ndarray:
    """Render a matplotlib figure to uint8 RGB [H,W,3] (Agg, no display needed) and close it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    array = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    import matplotlib.pyplot as plt

    plt.close(figure)
    return array
