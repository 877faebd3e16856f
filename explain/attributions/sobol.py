"""Sobol attribution method (Fel et al. 2021, "Look at the Variance! Efficient Black-box Explanations with
Sobol-based Sensitivity Analysis", NeurIPS).

The image is cut into a ``grid_size`` x ``grid_size`` grid of D cells. A scrambled Sobol design of masks
(:func:`explain.sensitivity.sobol_design`: ``N`` rows ``A``, then ``C_1 .. C_D``, N(D+1) rows of D values in
[0, 1]) is upsampled (nearest) to the image, each mask perturbs the image (:mod:`.perturbations`), and the
model's score ``f(x_M)[y]`` of every perturbed image gives the total Sobol index of every cell
(:func:`explain.sensitivity.total_sobol_indices`, Jansen by default):
``ST_i = sum_j (f(A_j) - f(C_ij))^2 / (2 N Var f(A))``, Var the sample variance (ddof 1) as xplique's. The map is
the index grid resized bicubic to HxW.

Cost: exactly N(D+1) forward rows per image (2080 at the defaults; the reference also evaluates the unused
``B`` block). The perturbed images of all images of a call share forward passes of ``batch_size`` rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explain.attributions.perturbations import PERTURBATIONS, Perturbation, apply_masks, perturbation_terms
from explain.attributions.saliency import check_logits
from explain.base import Explainer
from explain.batching import BatchSize
from explain.registry import register_explainer
from explain.sensitivity import ESTIMATORS, Estimator, sobol_design, total_sobol_indices
from explain.validation import one_of, positive_int


def evaluate_masks(
    model: nn.Module,
    base: Tensor,
    delta: Tensor,
    masks: Tensor,
    targets: Tensor,
    batch_size: int = 256,
) -> Tensor:
    """Scores ``f(base_b + delta_b * up(masks_r))[y_b]`` [B, R] for B images and R masks [R, g, g].

    ``base`` is 0-dim or [B,C,H,W], ``delta`` [B,C,H,W] (:func:`.perturbations.perturbation_terms`). The
    B * R perturbed inputs are written, ``batch_size`` rows at a time, into one reused buffer (a chunk may
    hold rows of several images) and sent through the model under ``torch.inference_mode``.
    """
    nb_images, nb_masks = delta.shape[0], masks.shape[0]
    total = nb_images * nb_masks
    with torch.inference_mode():
        row_targets = targets.repeat_interleave(nb_masks)
        buffer = delta.new_empty((min(batch_size, total), *delta.shape[1:]))
        scores = []
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            inputs = buffer[: stop - start]
            position = start
            while position < stop:  # one segment per image met in this chunk
                image, row = divmod(position, nb_masks)
                end = min(stop, (image + 1) * nb_masks)
                apply_masks(
                    base[image] if base.ndim else base,
                    delta[image],
                    masks[row : row + end - position],
                    out=inputs[position - start : end - start],
                )
                position = end
            logits = model(inputs)
            if start == 0:
                check_logits(logits, targets)
            scores.append(logits.gather(1, row_targets[start:stop, None])[:, 0])
        scores = torch.cat(scores).view(nb_images, nb_masks)
    return scores.clone()  # a normal tensor, usable outside inference mode


def _sobol_arg_validation(
    grid_size: int, nb_design: int, perturbation: str, estimator: str, blur_size: int, batch_size: int
) -> None:
    """The checks shared by :func:`sobol_indices` and :class:`Sobol` (torchmetrics' ``_..._arg_validation``)."""
    positive_int("batch_size", batch_size)
    positive_int("grid_size", grid_size)
    positive_int("nb_design", nb_design)
    if nb_design < 2 or nb_design & (nb_design - 1):
        raise ValueError(f"nb_design must be a power of two >= 2 (the balance of a Sobol sequence), got {nb_design!r}")
    one_of("perturbation", perturbation, PERTURBATIONS)
    one_of("estimator", estimator, ESTIMATORS)
    positive_int("blur_size", blur_size)


def sobol_indices(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    grid_size: int = 8,
    nb_design: int = 32,
    perturbation: Perturbation = "inpainting",
    estimator: Estimator = "jansen",
    baseline: float | Tensor = 0.0,
    batch_size: int = 256,
    seed: int | None = 0,
    blur_size: int = 10,
    amplitude_sigma: float = 1.0,
) -> Tensor:
    """Total Sobol indices [B, grid_size, grid_size] of the cells of each image for its target class.

    ``seed`` scrambles the Sobol sequence (None: a new scrambling each call). See the module docstring; the
    options are those of :class:`Sobol`.

    Raises:
        ValueError: an option out of its domain (``nb_design`` not a power of two, an unknown ``perturbation``
            or ``estimator``, a ``grid_size``, ``blur_size`` or ``batch_size`` that is not a positive int).
    """
    _sobol_arg_validation(grid_size, nb_design, perturbation, estimator, blur_size, batch_size)
    nb_dim = grid_size * grid_size
    design = sobol_design(nb_dim, nb_design, seed=seed).to(device=images.device, dtype=images.dtype)
    base, delta, offset = perturbation_terms(images, perturbation, baseline, blur_size, amplitude_sigma)
    masks = design.view(-1, grid_size, grid_size)
    if offset:
        masks = masks - offset
    scores = evaluate_masks(model, base, delta, masks, targets, batch_size)
    return total_sobol_indices(scores, nb_dim, nb_design, estimator).view(-1, grid_size, grid_size)


def sobol_attribution(model: nn.Module, images: Tensor, targets: Tensor, **options) -> Tensor:
    """Sobol attribution maps [B, H, W]: :func:`sobol_indices` resized bicubic to the image size."""
    indices = sobol_indices(model, images, targets, **options)
    return F.interpolate(indices[:, None], size=images.shape[-2:], mode="bicubic", align_corners=False)[:, 0]


@register_explainer("sobol")
class Sobol(Explainer):
    """Sobol attribution method (Fel et al. 2021): total Sobol index of each grid cell for ``f(x)[y]``.

    ``Sobol(model, grid_size=8, nb_design=32, perturbation="inpainting", estimator="jansen",
    batch_size=256, baseline=0.0, seed=0)(images [B,C,H,W], targets [B]) -> maps [B,H,W]``.

    Args:
        grid_size: the image is cut in ``grid_size`` x ``grid_size`` cells (D = grid_size^2 indices).
        nb_design: N, a power of two; N(D+1) forward rows per image.
        perturbation: ``"inpainting"`` (towards ``baseline``), ``"blur"`` (towards a ``blur_size`` box
            blur of the image) or ``"amplitude"`` (``x (M - 1/2) amplitude_sigma``), as the reference.
        estimator: ``"jansen"`` (reference default), ``"saltelli"``, ``"homma"``, ``"janon"`` or ``"glen"``.
        batch_size: rows per forward pass (rows of several images share a pass).
        baseline: inpainting value, a number or a tensor broadcastable to the images.
        seed: scrambling seed of the Sobol sequence (None: a new one each call).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``nb_design`` not a power of two, an unknown ``perturbation`` or ``estimator``, ``grid_size``,
            ``blur_size`` or ``batch_size`` not a positive int; at the call, a ``grid_size`` larger than the images.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    >>> with torch.no_grad():  # the class-0 score reads the top-left 4x4 cell only
    ...     _ = model[1].weight.zero_()
    ...     _ = model[1].weight.view(2, 3, 8, 8)[0, :, :4, :4].fill_(1.0)
    >>> explainer = Sobol(model, grid_size=2, nb_design=16)
    >>> explainer.nb_forwards  # N (D + 1) forward rows per image
    80
    >>> maps = explainer(torch.rand(1, 3, 8, 8), torch.tensor([0]))
    >>> maps.shape, bool(maps[0, 1, 1] > maps[0, 6, 6])
    (torch.Size([1, 8, 8]), True)
    """

    def __init__(
        self,
        model: nn.Module,
        grid_size: int = 8,
        nb_design: int = 32,
        perturbation: Perturbation = "inpainting",
        estimator: Estimator = "jansen",
        batch_size: BatchSize = 256,
        baseline: float | Tensor = 0.0,
        seed: int | None = 0,
        blur_size: int = 10,
        amplitude_sigma: float = 1.0,
    ) -> None:
        super().__init__(model, batch_size=batch_size, seed=seed)
        _sobol_arg_validation(grid_size, nb_design, perturbation, estimator, blur_size, self.batch_size)
        self.grid_size = grid_size
        self.nb_design = nb_design
        self.perturbation = perturbation
        self.estimator = estimator
        self.baseline = baseline
        self.blur_size = blur_size
        self.amplitude_sigma = amplitude_sigma

    @property
    def nb_forwards(self) -> int:
        """Forward rows per image: N(D+1)."""
        return self.nb_design * (self.grid_size**2 + 1)

    def explain(self, images: Tensor, targets: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        if self.grid_size > min(height, width):
            raise ValueError(
                f"grid_size={self.grid_size} is larger than the images ({height}x{width}): pass a grid_size "
                f"of at most {min(height, width)}"
            )
        return sobol_attribution(
            self.model,
            images,
            targets,
            grid_size=self.grid_size,
            nb_design=self.nb_design,
            perturbation=self.perturbation,
            estimator=self.estimator,
            baseline=self.baseline,
            batch_size=self.batch_size,
            seed=self.seed,
            blur_size=self.blur_size,
            amplitude_sigma=self.amplitude_sigma,
        )

    def __repr__(self) -> str:
        return (
            f"Sobol(model={type(self.model).__name__}, grid_size={self.grid_size}, nb_design={self.nb_design}, "
            f"perturbation={self.perturbation!r}, estimator={self.estimator!r}, batch_size={self.batch_size})"
        )
