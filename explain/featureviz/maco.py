"""MACO feature visualization (Fel et al. 2023, "Unlocking Feature Visualization for Deeper Networks with
MAgnitude Constrained Optimization").

The image keeps a fixed Fourier magnitude (the mean spectrum of natural images) and only its phase is optimised
(:mod:`explain.featureviz.parameterization`). Each step: random crops of the image (centres ``0.5 + N(0, 0.15)``,
side ``N(size_t, 0.05)`` clipped to [0.05, 1] of the image side, ``size_t`` shrinking linearly from 0.5 to 0.05
as in Xplique, the authors' reference implementation), resized to the model's input, plus Gaussian noise of std
``noise`` and uniform noise on ``[-noise/2, noise/2]``; NAdam (lr 1.0) ascends the objective averaged over the
crops. The transparency map is the accumulated ``|d objective / d image|``: where the model looked.

``batch_size`` bounds the crops sent through the objective at once: a step's crops and noise are drawn first, the
gradient of the mean score with respect to the crops is summed chunk by chunk, then taken back to the phase, so
the step is the un-chunked one (up to float round-off). ``"auto"`` takes the largest chunk that fits
(:mod:`explain.batching`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from explain.base import eval_mode, grad_enabled, model_device
from explain.batching import AutoBatchSize, BatchSize, resolve_batch_size, run_batched
from explain.featureviz.parameterization import maco_image, symmetrize_magnitude
from explain.featureviz.spectrum import (
    _check_spectrum,
    _pair,
    load_spectrum,
    magnitude_spectrum,
    power_law_spectrum,
    resize_spectrum,
)
from explain.validation import in_interval, positive_int

__all__ = ["maco", "magnitude_spectrum", "random_crops", "box_size_schedule"]

BOX_JITTER = 0.05  # std of the crop side around its scheduled mean (fraction of the image side)
MIN_BOX = 0.05


def box_size_schedule(box_size: float | tuple[float, float], steps: int) -> Tensor:
    """Mean crop side per step, as a fraction of the image side: linear from ``box_size[0]`` to ``box_size[1]``
    (a float: constant).

    Raises:
        ValueError: ``box_size`` neither a fraction of the side in (0, 1] nor a pair ``(start, end)`` of them.
    """
    start, end = (box_size, box_size) if isinstance(box_size, (int, float)) else tuple(box_size)
    for value in (start, end):
        if not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(
                f"box_size must be a fraction of the image side in (0, 1] or a pair (start, end) of them, "
                f"got {box_size!r}"
            )
    return torch.linspace(float(start), float(end), steps, dtype=torch.float64)


def random_crops(
    image: Tensor,
    count: int,
    box_size: float,
    input_size: tuple[int, int],
    noise: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``count`` random crops [count, 3, *input_size] of ``image`` [3, H, W] with noise (see module docstring).

    A crop's side is the same fraction ``N(box_size, 0.05)`` (clipped to [0.05, 1]) of the image's height and
    width (a square on a square image); its centre is ``0.5 + N(0, 0.15)`` in relative coordinates.

    Crops are bilinear (``roi_align``, ``aligned=True``) with adaptive sampling: when a crop is larger than the
    model's input, each output pixel averages the crop pixels it covers (anti-aliased). Outside the image: 0.
    """
    device = image.device
    height, width = image.shape[-2:]
    centre = 0.5 + 0.15 * torch.randn(count, 2, generator=generator, device=device)
    side = (box_size + BOX_JITTER * torch.randn(count, generator=generator, device=device)).clamp(MIN_BOX, 1.0)
    scale = torch.tensor([width, height, width, height], device=device, dtype=image.dtype)
    corners = torch.cat([centre - side[:, None] / 2, centre + side[:, None] / 2], dim=1)  # x0, y0, x1, y1
    boxes = torch.cat([torch.zeros(count, 1, device=device, dtype=image.dtype), corners * scale], dim=1)
    crops = roi_align(image[None], boxes, output_size=input_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    if noise > 0:
        shape = crops.shape
        crops = crops + noise * torch.randn(shape, generator=generator, device=device, dtype=crops.dtype)
        crops = crops + noise * (torch.rand(shape, generator=generator, device=device, dtype=crops.dtype) - 0.5)
    return crops


def _prepare_magnitude(
    magnitude: Tensor | str | os.PathLike | None, size: tuple[int, int], device: torch.device
) -> Tensor:
    if magnitude is None:
        warnings.warn(
            "maco: no magnitude given, using the 1/f power_law_spectrum FALLBACK, not MACO's data spectrum; "
            "pass magnitude=magnitude_spectrum(your_images) (or a file saved by save_spectrum)",
            UserWarning,
            stacklevel=3,
        )
        magnitude = power_law_spectrum(size)
    elif isinstance(magnitude, (str, os.PathLike)):
        magnitude = load_spectrum(magnitude)
    _check_spectrum(magnitude, "magnitude")
    magnitude = resize_spectrum(magnitude.detach().float().to(device), size)
    return symmetrize_magnitude(magnitude, size[1])


def _scores(objective: Callable[[Tensor], Tensor], crops: Tensor) -> Tensor:
    return _mean_score(objective(crops), crops)


def _mean_score(scores: Tensor, crops: Tensor) -> Tensor:
    if not isinstance(scores, Tensor) or scores.shape not in ((), (crops.shape[0],)):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(
            f"the objective must return one score per crop [{crops.shape[0]}] or a scalar, got {shape}"
        )
    if not scores.requires_grad:
        raise RuntimeError(
            "the objective's scores do not depend on the crops (no gradient): does it run under torch.no_grad() "
            "or detach its output?"
        )
    return scores.mean()


def _crops_gradient(objective: Callable[[Tensor], Tensor], crops: Tensor, batch_size: int) -> Tensor:
    """``d mean(objective(crops)) / d crops``, ``batch_size`` crops per pass (the chunks' gradients are exact
    pieces of it: each crop's score depends on that crop only)."""
    gradients = []
    for chunk in crops.split(batch_size):
        chunk = chunk.detach().requires_grad_(True)
        scores = objective(chunk)
        if isinstance(scores, Tensor) and scores.shape == () and chunk.shape[0] < crops.shape[0]:
            raise ValueError(
                "the objective returns a scalar, which cannot be split into chunks of crops: return one score per "
                "crop [N], or leave batch_size=None"
            )
        score = _mean_score(scores, chunk) * (chunk.shape[0] / crops.shape[0])
        gradients.append(torch.autograd.grad(score, chunk)[0])
    return torch.cat(gradients)


def check_optimisation(
    steps: int, crops_per_step: int, lr: float, value_range: tuple[float, float], noise: float
) -> None:
    """The checks of the optimisation arguments :func:`maco` and :func:`~explain.featureviz.maco_batch` share.

    Raises:
        ValueError: ``steps`` or ``crops_per_step`` not a positive int, ``lr`` not positive, a bad
            ``value_range``, ``noise`` negative.
    """
    positive_int("steps", steps)
    positive_int("crops_per_step", crops_per_step)
    in_interval("lr", lr, 0, low_open=True)
    if len(value_range) != 2 or not value_range[0] < value_range[1]:
        raise ValueError(f"value_range must be a pair (low, high) with low < high, got {value_range!r}")
    in_interval("noise", noise, 0)


def objective_model_and_device(
    objective: Callable, device: torch.device | str | None
) -> tuple[nn.Module, torch.device]:
    """The objective's ``model`` attribute (run in eval mode; ``nn.Identity`` if none) and the device of the
    optimisation: ``device``, or the model's."""
    model = getattr(objective, "model", None)
    model = model if isinstance(model, nn.Module) else nn.Identity()
    return model, torch.device(device) if device is not None else model_device(model)


def maco(
    objective: Callable[[Tensor], Tensor],
    image_size: int | tuple[int, int],
    steps: int = 256,
    magnitude: Tensor | str | os.PathLike | None = None,
    crops_per_step: int = 32,
    lr: float = 1.0,
    value_range: tuple[float, float] = (0.0, 1.0),
    noise: float = 0.05,
    seed: int | None = 0,
    device: torch.device | str | None = None,
    box_size: float | tuple[float, float] = (0.5, 0.05),
    input_size: int | tuple[int, int] | None = None,
    batch_size: BatchSize | AutoBatchSize | None = None,
) -> tuple[Tensor, Tensor]:
    """Optimise the phase of an image of fixed Fourier magnitude to maximise ``objective``.

    Args:
        objective: ``crops [N,3,h,w] -> scores [N]`` (or a scalar), e.g. ``logit(model, class_id)``. When it
            has a ``model`` attribute (the builders of :mod:`explain.featureviz.objectives` do), that module
            runs in eval mode on its device and gets its train/eval flags back afterwards. Its parameters and
            their ``.grad`` are never touched: gradients are taken w.r.t. the phase only.
        image_size: size of the optimised image, int or (height, width).
        steps: optimisation steps (default 256, as Xplique).
        magnitude: the Fourier magnitude [3, H, W//2+1] (see :func:`magnitude_spectrum`), or a path to one saved
            by ``save_spectrum``; resampled if computed at another size; None uses the 1/f fallback with a warning.
        crops_per_step: random crops per step (default 32, as Xplique).
        lr: NAdam learning rate.
        value_range: range of the model's inputs; the image is ``sigmoid(...)`` mapped onto it.
        noise: std of the Gaussian noise added to the crops, plus uniform noise on [-noise/2, noise/2].
        seed: seeds the initial phase, the crops and the noise (None: global RNG).
        device: default: the objective model's device, else the CPU.
        box_size: mean crop side as a fraction of the image side, a pair (start, end) changed linearly over the
            steps, or a float; each crop's side is that mean plus N(0, 0.05), clipped to [0.05, 1].
        input_size: size the crops are resized to (the model's input); default ``image_size``. The crops
            shrink to 5% of the image by default, so optimise a larger image than the input, as Xplique
            (``image_size=512, input_size=224``).
        batch_size: crops sent through the objective at once (module docstring); None: all of a step's crops
            in one pass; ``"auto"``: the largest that fits (or an :class:`~explain.batching.AutoBatchSize`, which
            remembers it from call to call: :class:`~explain.callbacks.FeatureVizMonitor` keeps one). Chunks
            need one score per crop from the objective.

    Returns:
        ``(image [3,H,W] in value_range, alpha [H,W])``: alpha sums ``|d objective / d image|`` over the steps
        (mean over the colour channels); see :func:`~explain.featureviz.plot_maco`.

    Raises:
        TypeError: ``objective`` is not callable.
        ValueError: ``steps`` or ``crops_per_step`` not a positive int, ``batch_size`` neither None, a positive int
            nor ``"auto"``, ``lr`` not positive, ``noise`` negative,
            a bad ``value_range``, ``image_size`` or ``input_size``, or a magnitude of the wrong shape.

    >>> import torch
    >>> from torch import nn
    >>> from explain.featureviz import logit, power_law_spectrum
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    >>> image, alpha = maco(logit(model, 1), image_size=16, steps=4, crops_per_step=2,
    ...                     magnitude=power_law_spectrum(16))
    >>> image.shape, alpha.shape, bool(0 <= image.min() and image.max() <= 1)
    (torch.Size([3, 16, 16]), torch.Size([16, 16]), True)
    """
    if not callable(objective):
        raise TypeError(f"objective must be callable (crops [N,3,h,w] -> scores [N]), got {type(objective).__name__}")
    size = _pair(image_size, "image_size")
    crop_size = size if input_size is None else _pair(input_size, "input_size")
    check_optimisation(steps, crops_per_step, lr, value_range, noise)
    box_sizes = box_size_schedule(box_size, steps).tolist()
    batch = None if batch_size is None else resolve_batch_size("batch_size", batch_size, "maco")

    model, device = objective_model_and_device(objective, device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    with grad_enabled(), eval_mode(model):
        mag = _prepare_magnitude(magnitude, size, device)
        phase = torch.randn(mag.shape, generator=generator, device=device).requires_grad_(True)
        optimizer = torch.optim.NAdam([phase], lr=lr, maximize=True)
        alpha = torch.zeros(3, *size, device=device)
        for step in range(steps):
            image = maco_image(mag, phase, value_range, width=size[1])
            crops = random_crops(image, crops_per_step, box_sizes[step], crop_size, noise, generator)
            if batch is None:
                score = _scores(objective, crops)
                phase.grad, image_grad = torch.autograd.grad(score, [phase, image])
            else:  # the crops are drawn: only the objective's passes are chunked
                key = ("objective", *crops.shape[1:], crops.dtype, device)
                run = lambda size: _crops_gradient(objective, crops, size)  # noqa: E731
                crops_grad = run_batched(batch, key, device, run, crops_per_step)
                phase.grad, image_grad = torch.autograd.grad(crops, [phase, image], crops_grad)
            alpha += image_grad.abs()
            optimizer.step()
        with torch.no_grad():
            image = maco_image(mag, phase, value_range, width=size[1])
    return image.detach(), alpha.mean(0)
