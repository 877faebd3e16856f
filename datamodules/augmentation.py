"""Paired augmentation: an image and its human map get the SAME random crop and flip.

torchvision.transforms.v2 draws a transform's random parameters once per call and applies them to every
``tv_tensors`` object of the sample, so wrapping the image and the map and transforming them together is all it
takes. The map travels as a one-channel ``tv_tensors.Image`` rather than a ``tv_tensors.Mask``: v2 resamples masks
with nearest neighbour only (they are meant for class labels), which turns a smooth importance map into blocks;
as an image it is resampled bilinearly like the picture. Only geometric transforms are used, so nothing else
(colour jitter, normalization) ever touches the map.

Every dataset of this package returns the sample dict of the data contract, which the default collate turns
into the batch dict::

    image        float32 [3, H, W] in [0, 1]   (no normalization: that belongs to the model)
    label        int64   []
    heatmap      float32 [H, W] in [0, 1]      (zeros where there is no human map)
    has_heatmap  bool    []
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2


class PairedTransform:
    """Apply a torchvision v2 transform to ``(image, heatmap)`` with one draw of its random parameters.

    Args:
        transform: a v2 transform built of geometric operations (crop, flip, resize, ...).

    Call: ``image`` uint8 or float [3, H, W] and ``heatmap`` float [H, W] of the same H, W ->
    ``(image float32 [3, h, w] in [0, 1], heatmap float32 [h, w])``; with a ``mask`` bool [H, W] too (e.g. the
    spurious pixels), ``(image, heatmap, mask bool [h, w])``, the mask as a ``tv_tensors.Mask`` (nearest neighbour).
    """

    def __init__(self, transform: v2.Transform) -> None:
        self.transform = v2.Compose([transform, v2.ToDtype(torch.float32, scale=True)])

    def __call__(self, image: Tensor, heatmap: Tensor, mask: Tensor | None = None) -> tuple[Tensor, ...]:
        for name, other in (("heatmap", heatmap), ("mask", mask)):
            if other is not None and image.shape[-2:] != other.shape[-2:]:
                raise ValueError(
                    f"image {tuple(image.shape)} and {name} {tuple(other.shape)} must have the same height and width"
                )
        inputs = [tv_tensors.Image(image), tv_tensors.Image(heatmap.float()[None])]
        if mask is not None:
            inputs.append(tv_tensors.Mask(mask.bool()))
        outputs = self.transform(*inputs)
        image, heatmap = outputs[0].as_subclass(Tensor), outputs[1].as_subclass(Tensor)[0]
        return (image, heatmap) if mask is None else (image, heatmap, outputs[2].as_subclass(Tensor))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform.transforms[0]})"


def train_transform(
    image_size: int,
    crop: Literal["resized", "padded"] = "resized",
    scale: tuple[float, float] = (0.25, 1.0),
    padding: int | None = None,
    flip: bool = True,
) -> PairedTransform:
    """The training augmentation: a random crop, then a horizontal flip with probability 1/2.

    Args:
        image_size: output side length (square output).
        crop: ``"resized"``: ``RandomResizedCrop(image_size, scale)`` (the ImageNet recipe, for photos of any
            size; ``scale`` starts at 0.25 rather than 0.08 because smaller crops often miss the annotated object
            altogether). ``"padded"``: pad by ``padding`` pixels (zeros; default ``image_size // 8``) and take a
            random ``image_size`` crop (the CIFAR recipe, for images already at ``image_size``: no resampling).
        flip: add the random horizontal flip.

    Raises:
        ValueError: ``crop`` neither ``"resized"`` nor ``"padded"``.
    """
    if crop == "resized":
        steps: list[v2.Transform] = [v2.RandomResizedCrop(image_size, scale=scale, antialias=True)]
    elif crop == "padded":
        pad = image_size // 8 if padding is None else padding
        steps = [v2.Resize((image_size, image_size), antialias=True), v2.RandomCrop(image_size, padding=pad)]
    else:
        raise ValueError(f"crop must be 'resized' or 'padded', got {crop!r}")
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return PairedTransform(v2.Compose(steps))


def eval_transform(image_size: int) -> PairedTransform:
    """The evaluation transform: resize to ``image_size x image_size`` (bilinear, antialiased), nothing random.

    Non-square images are squashed to a square (no centre crop), as the ClickMe reference does for 256 -> 224.
    An image already at that size is returned unchanged.
    """
    return PairedTransform(v2.Resize((image_size, image_size), antialias=True))


def pad_crop_flip(images: Tensor, heatmaps: Tensor, padding: int, flip: bool = True) -> tuple[Tensor, Tensor]:
    """``train_transform(crop="padded")`` on a whole batch, with its own random draw for every sample.

    Zero-pad by ``padding``, take a random crop of the original size, flip horizontally with probability 1/2;
    image ``b`` and map ``b`` get the same crop and flip. images [B, C, H, W] (any dtype), heatmaps [B, H, W].
    For tensors already in memory this is ~50x faster than calling the v2 transform once per sample (whose
    dispatch costs about half a millisecond per call on CPU), which matters when the data loop is the bottleneck.
    """
    b, _, h, w = images.shape
    rows = torch.randint(0, 2 * padding + 1, (b, 1)) + torch.arange(h)  # window rows/cols in the padded image
    cols = torch.randint(0, 2 * padding + 1, (b, 1)) + torch.arange(w)
    if flip:
        cols = torch.where(torch.rand(b, 1) < 0.5, cols.flip(1), cols)
    index = (rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]).view(b, 1, h * w)

    def window(x: Tensor) -> Tensor:  # x [B, C, H, W] -> the chosen window of its padded version
        return F.pad(x, [padding] * 4).flatten(-2).gather(-1, index.expand(-1, x.shape[1], -1)).view(x.shape)

    return window(images), window(heatmaps[:, None])[:, 0]


def make_sample(image: Tensor, label: int | Tensor, heatmap: Tensor, has_heatmap: bool | Tensor) -> dict[str, Tensor]:
    """The sample dict of the data contract (see the module docstring)."""
    return {
        "image": image,
        "label": torch.as_tensor(label, dtype=torch.int64),
        "heatmap": heatmap.to(torch.float32),
        "has_heatmap": torch.as_tensor(has_heatmap, dtype=torch.bool),
    }
