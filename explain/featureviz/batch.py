"""Several MACO images at once (Fel et al. 2023), one per independent objective, e.g. every concept of a class.

Image ``j`` is optimised exactly as :func:`~explain.featureviz.maco` optimises it alone with ``seed=seeds[j]``: it
has its own random generator, which draws its initial phase and then, at each step, its crops and noise in the
same order as ``maco`` does, and its own phase in one NAdam (elementwise, so one optimiser over the list of phases
is the per-image optimisers side by side). Only the network pass is shared: at each step the crops of all the
images go through the model in one batch and one backward pass gives every phase its gradient, since

    d/d phase_j  sum_i mean_crops score_i(crops_i)  =  d/d phase_j  mean_crops score_j(crops_j)

when score ``i`` reads only the crops of image ``i`` (a model in eval mode treats the samples of a batch
independently). So ``maco_batch`` returns what ``count`` calls of ``maco`` return, up to the floating-point
rounding of a larger batch, with ``count`` times fewer, ``count`` times larger passes: the same arithmetic, but a
batch large enough to keep a GPU busy (32 crops of ResNet-50 do not).

"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from explain.base import eval_mode, grad_enabled
from explain.featureviz.maco import (
    _prepare_magnitude,
    box_size_schedule,
    check_optimisation,
    objective_model_and_device,
    random_crops,
)
from explain.featureviz.objectives import SIMILARITIES, direction_similarity
from explain.featureviz.parameterization import maco_image
from explain.featureviz.spectrum import _pair
from explain.validation import one_of, positive_int

__all__ = ["BatchObjective", "concept_directions", "maco_batch"]


class BatchObjective:
    """``objective(crops [m, N, 3, h, w], images [m]) -> scores [m, N]``: the scores of the crops of images
    ``images`` (indices into the batch of ``maco_batch``); ``model``: the module it runs (or None)."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], model: nn.Module | None = None,
                 name: str = "batch objective") -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable (crops [m,N,3,h,w], images [m] -> scores [m,N]), got "
                            f"{type(fn).__name__}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        self.fn, self.model, self.name = fn, model, name

    def __call__(self, crops: Tensor, images: Tensor) -> Tensor:
        return self.fn(crops, images)

    def __repr__(self) -> str:
        return f"BatchObjective({self.name})"


def concept_directions(
    feature_fn: Callable[[Tensor], Tensor], directions: Tensor, similarity: str = "dot_cossim",
    cossim_pow: float = 2.0,
) -> BatchObjective:
    """Image ``j`` maximises direction ``directions[j]`` [C] of ``feature_fn``'s channels, as
    ``concept_direction(feature_fn, directions[j])`` (spatial mean, then :func:`direction_similarity`), with the
    crops of all the images in one ``feature_fn`` call.

    Raises:
        TypeError: ``feature_fn`` not callable.
        ValueError: ``directions`` not a finite matrix [count, C] of nonzero rows.
    """
    if not callable(feature_fn):
        raise TypeError(f"feature_fn must be callable (crops -> activations), got {type(feature_fn).__name__}")
    directions = torch.as_tensor(directions).detach().float()
    if directions.ndim != 2 or directions.numel() == 0:
        raise ValueError(f"directions must be a matrix [count, C], got shape {tuple(directions.shape)}")
    if not torch.isfinite(directions).all() or bool((directions.norm(dim=1) == 0).any()):
        raise ValueError("directions must be finite with no zero row")
    one_of("similarity", similarity, SIMILARITIES)

    def score(crops: Tensor, images: Tensor) -> Tensor:
        count, per_image = crops.shape[:2]
        activations = feature_fn(crops.flatten(0, 1))
        if activations.ndim == 4:  # [m N, C, h, w]
            pooled = activations.mean((2, 3))
        elif activations.ndim == 3:  # [m N, T, C]
            pooled = activations.mean(1)
        elif activations.ndim == 2:
            pooled = activations
        else:
            raise ValueError(
                f"feature_fn returned shape {tuple(activations.shape)}; expected [N,C,h,w], [N,T,C] or [N,C]"
            )
        if pooled.shape[1] != directions.shape[1]:
            raise ValueError(f"directions have {directions.shape[1]} entries but feature_fn gives "
                             f"{pooled.shape[1]} channels")
        pooled = pooled.unflatten(0, (count, per_image))
        return torch.stack([direction_similarity(pooled[i], directions[j], similarity, cossim_pow)
                            for i, j in enumerate(images.tolist())])

    model = feature_fn if isinstance(feature_fn, nn.Module) else None
    return BatchObjective(score, model, f"directions_{similarity}")


def maco_batch(
    objective: BatchObjective | Callable[[Tensor, Tensor], Tensor],
    count: int,
    image_size: int | tuple[int, int],
    steps: int = 256,
    magnitude: Tensor | str | os.PathLike | None = None,
    crops_per_step: int = 32,
    lr: float = 1.0,
    value_range: tuple[float, float] = (0.0, 1.0),
    noise: float = 0.05,
    seeds: Sequence[int] | int = 0,
    device: torch.device | str | None = None,
    box_size: float | tuple[float, float] = (0.5, 0.05),
    input_size: int | tuple[int, int] | None = None,
    images_per_pass: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``count`` MACO images, image ``j`` maximising score ``j`` of ``objective`` (module docstring).

    Args:
        objective: ``(crops [m, N, 3, h, w], images [m]) -> scores [m, N]``, score ``i`` reading only
            ``crops[i]`` (e.g. :func:`concept_directions`). Its ``model`` attribute, if any, runs in eval mode.
        count: the number of images.
        seeds: one seed per image, or one int for all (each image then starts as ``maco(..., seed=seeds)``).
        images_per_pass: images whose crops share a network pass (None: all ``count``); fewer bound the memory,
            the result is the same.
        The other arguments are :func:`~explain.featureviz.maco`'s, shared by every image.

    Returns:
        ``(images [count, 3, H, W] in value_range, alphas [count, H, W])``: ``maco``'s pair for each image.

    Raises:
        TypeError: ``objective`` not callable.
        ValueError: ``count``, ``steps``, ``crops_per_step`` or ``images_per_pass`` not a positive int, not one
            seed per image, scores not [m, N], and ``maco``'s errors for the shared arguments.
    """
    if not callable(objective):
        raise TypeError(f"objective must be callable (crops, images -> scores), got {type(objective).__name__}")
    positive_int("count", count)
    check_optimisation(steps, crops_per_step, lr, value_range, noise)
    per_pass = count if images_per_pass is None else positive_int("images_per_pass", images_per_pass)
    seeds = [seeds] * count if isinstance(seeds, int) else list(seeds)
    if len(seeds) != count:
        raise ValueError(f"seeds must be one int or one per image ({count}), got {len(seeds)}")
    size = _pair(image_size, "image_size")
    crop_size = size if input_size is None else _pair(input_size, "input_size")
    box_sizes = box_size_schedule(box_size, steps).tolist()

    model, device = objective_model_and_device(objective, device)
    generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
    chunks = [list(range(start, min(start + per_pass, count))) for start in range(0, count, per_pass)]

    with grad_enabled(), eval_mode(model):
        mag = _prepare_magnitude(magnitude, size, device)
        phases = [torch.randn(mag.shape, generator=g, device=device).requires_grad_(True) for g in generators]
        optimizer = torch.optim.NAdam(phases, lr=lr, maximize=True)
        alphas = torch.zeros(count, 3, *size, device=device)
        for step in range(steps):
            for chunk in chunks:
                images = [maco_image(mag, phases[j], value_range, width=size[1]) for j in chunk]
                crops = torch.stack([random_crops(image, crops_per_step, box_sizes[step], crop_size, noise,
                                                  generators[j]) for image, j in zip(images, chunk)])
                scores = objective(crops, torch.tensor(chunk, device=device))
                _check_scores(scores, len(chunk), crops_per_step)
                grads = torch.autograd.grad(scores.mean(1).sum(), [phases[j] for j in chunk] + images)
                for position, j in enumerate(chunk):
                    phases[j].grad = grads[position]
                    alphas[j] += grads[len(chunk) + position].abs()
            optimizer.step()
        with torch.no_grad():
            images = torch.stack([maco_image(mag, phase, value_range, width=size[1]) for phase in phases])
    return images.detach(), alphas.mean(1)


def _check_scores(scores: object, count: int, per_image: int) -> None:
    if not isinstance(scores, Tensor) or tuple(scores.shape) != (count, per_image):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"the objective must return scores [images, crops] = [{count}, {per_image}], got {shape}")
    if not scores.requires_grad:
        raise RuntimeError(
            "the objective's scores do not depend on the crops (no gradient): does it run under torch.no_grad() "
            "or detach its output?"
        )
