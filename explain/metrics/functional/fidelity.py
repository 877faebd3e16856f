"""Fidelity of explanation maps: does the model's score follow what the map calls important?

* **Deletion / Insertion** (Petsiuk et al. 2018, "RISE"; xplique ``CausalFidelity``): rank the pixels by the map;
  at stage ``k`` of ``steps`` the top ``floor(k N / steps)`` pixels (all channels) are set to the baseline
  (deletion) or copied from the image onto the baseline (insertion); the curve is the score ``f(x)[y]`` at each
  of the ``steps + 1`` stages and the metric is its area, by the trapezoid mean. A low deletion area and a high
  insertion area mean a faithful map.
* **MuFidelity** (Bhatt et al. 2020, "Evaluating and aggregating feature-based model explanations", def. 3;
  xplique ``MuFidelity``): remove random subsets ``S`` of grid cells (each cell independently with probability
  ``subset_percent``), and correlate, over ``nb_samples`` subsets, the score drop ``f(x)[y] - f(x_S)[y]`` with
  the attribution of the removed pixels ``sum_{p in S} phi_p``: Spearman rho per image (xplique uses
  ``scipy.stats.spearmanr`` too).

The score is the model's raw output for the target class (xplique's default ``activation=None``: logits for a
classifier); to score probabilities, pass ``nn.Sequential(model, nn.Softmax(-1))``.

Every perturbed input of every image goes through the model in chunks of ``batch_size`` (no per-image Python
loop), under ``no_grad`` with the model in eval mode (its train/eval flags are restored), on the model's device.
Calls from inside ``torch.inference_mode()`` are fine. Results are returned on the device of ``images``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explain.base import batched, check_images_targets, eval_mode, model_device
from explain.metrics.functional.alignment import rowwise_spearman
from explain.validation import in_interval, int_at_least, one_of, positive_int

Baseline = float | Tensor | Callable[[Tensor], Tensor]


def _check_inputs(
    model: nn.Module, images: Tensor, targets: Tensor | int, maps: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    images, targets = check_images_targets(images, targets)
    if not isinstance(maps, Tensor) or maps.shape != (images.shape[0], *images.shape[-2:]):
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(
            f"maps must be [B, H, W] = {(images.shape[0], *images.shape[-2:])} to match images "
            f"{tuple(images.shape)}, got {shape} (reduce the channels of a [B, C, H, W] explanation first)"
        )
    device = model_device(model, default=images.device)
    return images.to(device), targets.to(device), maps.to(device)


def _baseline_like(images: Tensor, baseline: Baseline) -> Tensor:
    """The baseline image of each image: a constant, a tensor broadcastable to ``images``, or ``fn(images)``."""
    if callable(baseline) and not isinstance(baseline, Tensor):
        baseline = baseline(images)
    if isinstance(baseline, Tensor):
        try:
            return torch.broadcast_to(baseline.to(images.device, images.dtype), images.shape)
        except RuntimeError:
            raise ValueError(
                f"baseline of shape {tuple(baseline.shape)} does not broadcast to images {tuple(images.shape)}"
            ) from None
    return torch.full_like(images, float(baseline))


def _target_scores(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """``model(inputs)[i, targets[i]]`` as float [n]."""
    out = model(inputs)
    if out.ndim != 2:
        raise ValueError(f"the model must return scores [B, num_classes], got shape {tuple(out.shape)}")
    return out.gather(1, targets[:, None]).squeeze(1).float()


def _causal_fidelity_arg_validation(steps: int, batch_size: int) -> None:
    """The checks shared by the deletion/insertion functions and the ``Deletion``/``Insertion`` metrics."""
    positive_int("steps", steps)
    positive_int("batch_size", batch_size)


def _cell_masks_arg_validation(grid_size: int, subset_percent: float, nb_samples: int) -> None:
    positive_int("grid_size", grid_size)
    in_interval("subset_percent", subset_percent, 0, 1, low_open=True, high_open=True)
    int_at_least("nb_samples", nb_samples, 2, why="a correlation needs several subsets")


def _mufidelity_arg_validation(grid_size: int, subset_percent: float, nb_samples: int, batch_size: int) -> None:
    """The checks shared by :func:`mufidelity` and the ``MuFidelity`` metric."""
    _cell_masks_arg_validation(grid_size, subset_percent, nb_samples)
    positive_int("batch_size", batch_size)


def stage_sizes(nb_pixels: int, steps: int) -> Tensor:
    """Number of pixels perturbed at each of the ``steps + 1`` stages: ``floor(k * nb_pixels / steps)``."""
    positive_int("steps", steps)
    return torch.arange(steps + 1) * nb_pixels // steps


def causal_curve(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | int,
    maps: Tensor,
    *,
    mode: Literal["deletion", "insertion"],
    steps: int = 10,
    baseline: Baseline = 0.0,
    batch_size: int = 64,
) -> Tensor:
    """Score ``f(x_k)[y]`` [B, steps+1] as the top ``floor(k N / steps)`` pixels of the map are switched, at stage
    ``k`` of ``steps``: to the baseline (``mode="deletion"``: stage 0 is the image, the last stage the baseline), or
    from the baseline to the image (``mode="insertion"``: stage 0 is the baseline, the last stage the image).

    ``baseline``: a value, a tensor broadcastable to ``images`` (e.g. per-channel means ``[C,1,1]``, a blurred
    copy ``[B,C,H,W]``), or a function ``images -> baselines``. Pixels with equal map values are taken in
    pixel-index order. :data:`deletion_curve` and :data:`insertion_curve` are this function with ``mode`` set. The
    options are keyword-only, as those of :func:`mufidelity`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``steps`` or ``batch_size`` not a positive int, an unknown ``mode``, a ``baseline`` that does
            not broadcast to the images, or images, targets and maps that do not match.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 1, bias=False))
    >>> _ = torch.nn.init.ones_(model[1].weight)  # the score is the sum of the pixels
    >>> curve = deletion_curve(model, torch.ones(1, 3, 4, 4), 0, torch.rand(1, 4, 4), steps=2)
    >>> curve  # 48 pixel values, then half of them set to the black baseline, then all
    tensor([[48., 24.,  0.]])
    """
    _causal_fidelity_arg_validation(steps, batch_size)
    one_of("mode", mode, ("deletion", "insertion"))
    out_device = images.device
    images, targets, maps = _check_inputs(model, images, targets, maps)
    b, _, h, w = images.shape
    base = _baseline_like(images, baseline)
    start, end = (base, images) if mode == "insertion" else (images, base)
    # rank[i, p] = position of pixel p in the descending order of map i (ties broken by pixel index)
    order = maps.flatten(1).float().argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(h * w, device=order.device).expand(b, -1))
    sizes = stage_sizes(h * w, steps).to(images.device)
    nb_stages = steps + 1

    def scores(flat_index: Tensor) -> Tensor:
        image, stage = flat_index // nb_stages, flat_index % nb_stages
        switched = (rank[image] < sizes[stage, None]).view(-1, 1, h, w)
        inputs = torch.where(switched, end[image], start[image])
        return _target_scores(model, inputs, targets[image])

    with torch.no_grad(), eval_mode(model):
        curves = batched(scores, torch.arange(b * nb_stages, device=images.device), batch_size)
    return curves.view(b, nb_stages).to(out_device)


#: Deletion curve (Petsiuk et al. 2018): ``causal_curve(..., mode="deletion")``, the top pixels of the map go to
#: the baseline: ``deletion_curve(model, images, targets, maps, *, steps=10, baseline=0.0, batch_size=64)``.
deletion_curve = functools.partial(causal_curve, mode="deletion")
#: Insertion curve (Petsiuk et al. 2018): ``causal_curve(..., mode="insertion")``, the top pixels of the map are
#: copied onto the baseline: ``insertion_curve(model, images, targets, maps, *, steps=10, ...)``.
insertion_curve = functools.partial(causal_curve, mode="insertion")


def auc(curve: Tensor) -> Tensor:
    """Area [B] under curves [B, S] sampled at equally spaced stages, by the trapezoid mean
    ``mean_k (c_k + c_{k+1}) / 2`` (xplique), i.e. the area with the x-axis scaled to [0, 1].

    Raises:
        ValueError: ``curve`` not [B, S] with S >= 2.
    """
    if curve.ndim != 2 or curve.shape[1] < 2:
        raise ValueError(f"curve must be [B, S] with S >= 2 stages, got {tuple(curve.shape)}")
    return ((curve[:, :-1] + curve[:, 1:]) / 2).mean(1)


def random_cell_masks(
    nb_samples: int,
    grid_size: int,
    size: tuple[int, int],
    subset_percent: float = 0.2,
    seed: int | None = 0,
) -> Tensor:
    """Keep-masks [nb_samples, H, W] (1 = kept, 0 = removed) of random subsets of a ``grid_size`` x ``grid_size``
    grid: each cell is removed independently with probability ``subset_percent`` (xplique's ``U(0,1) > p``),
    cells upsampled to ``size`` by nearest neighbour. Drawn on the CPU from ``torch.Generator().manual_seed(seed)``
    (the global RNG when ``seed`` is None), so the masks are the same on every device."""
    _cell_masks_arg_validation(grid_size, subset_percent, nb_samples)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    keep = (torch.rand(nb_samples, 1, grid_size, grid_size, generator=generator) > subset_percent).float()
    return F.interpolate(keep, size=tuple(size), mode="nearest-exact")[:, 0]


def mufidelity(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | int,
    maps: Tensor,
    *,
    grid_size: int = 9,
    subset_percent: float = 0.2,
    nb_samples: int = 200,
    baseline: Baseline = 0.0,
    batch_size: int = 64,
    seed: int | None = 0,
) -> Tensor:
    """MuFidelity [B]: Spearman rho over ``nb_samples`` random cell subsets ``S`` between
    ``f(x)[y] - f(x_S)[y]`` and ``sum_{p in S} phi_p``, with ``x_S = x * M + (1 - M) * baseline``.

    Defaults are xplique's (grid 9, 20%, 200 subsets); the same masks (:func:`random_cell_masks`) serve every
    image. A constant score drop or attribution (no ranking) gives 0, as in xplique.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an option out of its domain (``grid_size``, ``batch_size`` not positive ints,
            ``subset_percent`` outside (0, 1), ``nb_samples < 2``), or images, targets and maps that do not match.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    >>> images = torch.rand(2, 3, 4, 4)
    >>> mufidelity(model, images, torch.tensor([0, 1]), torch.rand(2, 4, 4), grid_size=2, nb_samples=8).shape
    torch.Size([2])
    """
    _mufidelity_arg_validation(grid_size, subset_percent, nb_samples, batch_size)
    out_device = images.device
    images, targets, maps = _check_inputs(model, images, targets, maps)
    b, _, h, w = images.shape
    keep = random_cell_masks(nb_samples, grid_size, (h, w), subset_percent, seed).to(images.device, images.dtype)
    base = _baseline_like(images, baseline)
    # attribution of the removed pixels: [B, nb_samples]
    removed_attribution = maps.flatten(1).float() @ (1.0 - keep.flatten(1).float()).T

    def scores(flat_index: Tensor) -> Tensor:
        image, sample = flat_index // nb_samples, flat_index % nb_samples
        mask = keep[sample, None]
        inputs = images[image] * mask + (1.0 - mask) * base[image]
        return _target_scores(model, inputs, targets[image])

    with torch.no_grad(), eval_mode(model):
        index = torch.arange(b, device=images.device)
        clean = batched(lambda i: _target_scores(model, images[i], targets[i]), index, batch_size)
        perturbed = batched(scores, torch.arange(b * nb_samples, device=images.device), batch_size)
    drop = clean[:, None] - perturbed.view(b, nb_samples)
    return rowwise_spearman(drop, removed_attribution).to(out_device)
