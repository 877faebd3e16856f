"""Concept importance: total Sobol indices of the concept coefficients (Fel et al. 2023, CRAFT, section 3.2).

For an image with concept coefficients ``U`` ([r], or [h, w, r] per latent location), a random mask
``M`` in [0, 1]^r rescales every concept, ``A(M) = (U * M) W``, and only ``latent_to_logit`` is evaluated:
``f(M) = latent_to_logit(A(M))[class]``. The importance of concept ``k`` is its total Sobol index
``ST_k = E[Var(f | M_~k)] / Var(f)`` (the fraction of the logit's variance that involves concept ``k``),
estimated from the quasi-Monte Carlo design of :func:`explain.sensitivity.sobol_design` (rows ``A`` then
``C_1 .. C_r``). That is ``nb_design * (r + 1)`` forwards of ``latent_to_logit`` per image: the reference
code forwards ``nb_design * (r + 2)`` (it also evaluates the ``B`` rows, which the estimator never uses).
A spatial ``U`` gets one mask value per concept, shared by all locations (as the reference code does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from explain.batching import AutoBatchSize, BatchSize, resolve_batch_size, run_batched
from explain.sensitivity import Estimator, sobol_design, total_sobol_indices


def concept_importance(
    u: Tensor,
    w: Tensor,
    latent_to_logit: Callable[[Tensor], Tensor],
    class_id: int | Tensor,
    *,
    nb_design: int = 32,
    sampler: Literal["sobol", "halton"] = "halton",
    scramble: bool = True,
    estimator: Estimator = "jansen",
    seed: int | None = 0,
    batch_size: BatchSize | AutoBatchSize = 64,
) -> Tensor:
    """Total Sobol indices [B, r] of the concepts of each image (module docstring).

    ``u``: coefficients [B, r] or [B, h, w, r]; ``w``: concept bank [r, c]; ``latent_to_logit`` maps
    activations [N, c] (or [N, c, h, w] for a spatial ``u``) to logits [N, classes]; ``class_id``: an int or
    one per image [B]. Masked activations go through ``latent_to_logit`` ``batch_size`` at a time, mixing
    images; ``"auto"`` (or an :class:`~explain.batching.AutoBatchSize`, which remembers it) takes the largest that
    fits. The design is drawn once, before the chunks, so the indices do not depend on the batch size. Average
    over images for the class-level importance of the paper.

    Raises:
        ValueError: ``u`` neither [B, r] nor [B, h, w, r], ``class_id`` neither an int nor one class per image,
            ``batch_size`` neither a positive int nor ``"auto"``, or ``latent_to_logit`` not returning logits
            [N, classes].
    """
    batch_size = resolve_batch_size("batch_size", batch_size, "concept_importance")
    if u.ndim not in (2, 4) or u.shape[-1] != w.shape[0]:
        raise ValueError(
            f"u must be [B, r] or [B, h, w, r] with r = {w.shape[0]} concepts, got {tuple(u.shape)}"
        )
    n_images, rank = u.shape[0], u.shape[-1]
    classes = torch.as_tensor(class_id, device=u.device).long().reshape(-1)
    if classes.numel() not in (1, n_images):
        raise ValueError(f"class_id must be an int or one class per image ({n_images}), got {classes.numel()} values")
    classes = classes.expand(n_images)
    masks = sobol_design(rank, nb_design, sampler=sampler, scramble=scramble, seed=seed).to(u)
    w = w.to(u)
    n_masks = masks.shape[0]
    latent_shape = (w.shape[1], *u.shape[1:-1])  # [c] or [c, h, w]
    key = ("latent_to_logit", *latent_shape, u.dtype, u.device)
    run = lambda size: _masked_logits(u, w, masks, latent_to_logit, classes, size)  # noqa: E731
    outputs = run_batched(batch_size, key, u.device, run, n_images * n_masks).reshape(n_images, n_masks)
    return total_sobol_indices(outputs, rank, nb_design, estimator)


def _masked_logits(
    u: Tensor, w: Tensor, masks: Tensor, latent_to_logit: Callable[[Tensor], Tensor], classes: Tensor,
    batch_size: int,
) -> Tensor:
    """The class logit of every (image, mask) pair [B * n_masks], ``batch_size`` pairs per forward."""
    n_masks, rank = masks.shape[0], u.shape[-1]
    # every (image, mask) pair, in chunks: the masked activations of a chunk are built on the fly
    pairs = torch.arange(u.shape[0] * n_masks, device=u.device)
    outputs = []
    with torch.no_grad():
        for chunk in pairs.split(batch_size):
            image, mask = chunk // n_masks, chunk % n_masks
            scale = masks[mask].reshape(-1, *([1] * (u.ndim - 2)), rank)
            latent = (u[image] * scale) @ w  # [N, c] or [N, h, w, c]
            if latent.ndim == 4:
                latent = latent.permute(0, 3, 1, 2)
            logits = latent_to_logit(latent)
            if logits.ndim != 2 or logits.shape[0] != chunk.shape[0]:
                raise ValueError(
                    f"latent_to_logit must return logits [N, classes], got {tuple(logits.shape)} for "
                    f"{chunk.shape[0]} inputs"
                )
            outputs.append(logits.gather(1, classes[image].to(logits.device)[:, None])[:, 0].to(u.device))
    return torch.cat(outputs)
