"""Harmonization loss of Fel et al. 2022, "Harmonizing the object recognition strategies of deep neural networks
with humans" (NeurIPS), as in the reference code of serre-lab/Harmonization.

The loss pulls the model's input-gradient saliency towards human importance maps (ClickMe):

1. ``g = d(sum_b logit_b[y_b]) / d x`` (double backprop: ``create_graph=True``), reduced over channels;
2. ``standardize_cut(m) = relu((m - mean m) / (std m + 1e-5))`` per image, for ``g`` and the human map ``h``;
3. ``h <- h / (max h + 1e-6) * stopgrad(max g + 1e-6)`` (the human map is rescaled to the model map's peak);
4. a 5x5 binomial pyramid (``[1,4,6,4,1]`` outer itself / 256, stride 2, TensorFlow ``SAME`` zero padding) of
   ``levels`` levels, the first being the full-resolution map;
5. ``loss = mean_levels mean_{b,i,j} (g_l - h_l)^2 * has_heatmap_b`` (the mean runs over the WHOLE batch, images
   without a human map count as zeros, exactly as the reference's "tokens").
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.models.attention import double_backward_attention
from explain.attributions.saliency import REDUCTIONS, reduce_channels
from explain.base import grad_enabled
from explain.validation import positive_int

#: channel reductions for the training saliency: any name of :func:`explain.attributions.saliency.reduce_channels`
#: ("mean": signed mean, the reference; "absmean"; "absmax": the model map of the alignment evaluation; ...),
#: plus two short aliases kept for existing configs
REDUCE_ALIASES = {"abs": "absmean", "max_abs": "absmax"}
Reduce = Literal["mean", "absmean", "absmax", "sum", "abssum", "max", "abs", "max_abs"]


def check_reduce(reduce: str) -> str:
    """The :func:`~explain.attributions.saliency.reduce_channels` name of ``reduce`` (aliases resolved).

    Raises:
        ValueError: neither one of :data:`REDUCTIONS` nor one of their aliases.
    """
    name = REDUCE_ALIASES.get(reduce, reduce)
    if name not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS} or an alias {sorted(REDUCE_ALIASES)}, got {reduce!r}")
    return name


def input_gradient(
    model: nn.Module, images: Tensor, targets: Tensor, create_graph: bool = True
) -> tuple[Tensor, Tensor]:
    """Logits [B,K] and ``d(sum_b logit_b[y_b]) / d images`` [B,C,H,W] from ONE forward pass.

    Unlike :func:`explain.attributions.saliency.input_gradients` (an explainer's: batched, first-order, gradient
    only), training needs the logits of the same forward for the task loss and a differentiable gradient.

    With ``create_graph=True`` the gradient stays differentiable w.r.t. the parameters (double backprop), and the
    logits can feed the task loss too. Safe to call under ``torch.no_grad``/``inference_mode`` (the images are
    cloned into a normal tensor and grad is re-enabled locally); the caller's tensors are never modified.
    With ``create_graph=True``, ``scaled_dot_product_attention`` (e.g. in timm's ViTs) keeps its fused forward
    with a backward written in differentiable operations (:func:`align.models.attention.double_backward_attention`):
    the fused kernels themselves have no double backward.

    Raises:
        ValueError: ``images`` not [B, C, H, W], targets without one entry per image, or a model that does not
            return logits [B, K].
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if targets.reshape(-1).shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {targets.numel()} targets")
    attention = double_backward_attention() if create_graph else nullcontext()
    with grad_enabled(), attention:
        if images.is_inference():
            images = images.clone()
        targets = targets.reshape(-1).long()
        if targets.is_inference():
            targets = targets.clone()
        if not images.requires_grad:
            images = images.detach().requires_grad_(True)
        logits = model(images)
        if logits.ndim != 2:
            raise ValueError(f"the model must return logits [B, K], got shape {tuple(logits.shape)}")
        score = logits.gather(1, targets.to(logits.device)[:, None]).sum()
        (gradient,) = torch.autograd.grad(score, images, create_graph=create_graph)
    return logits, gradient


def input_saliency(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    reduce: Reduce = "mean",
    create_graph: bool = True,
) -> tuple[Tensor, Tensor]:
    """Step 1: logits [B,K] and the saliency map [B,H,W] = channel reduction of ``d logit_y / d x``
    (``reduce``: see :func:`check_reduce`; ``"mean"``, the signed mean, is the reference's)."""
    name = check_reduce(reduce)
    logits, gradient = input_gradient(model, images, targets, create_graph=create_graph)
    return logits, reduce_channels(gradient, name)


def standardize_cut(maps: Tensor, eps: float = 1e-5) -> Tensor:
    """Step 2: ``relu((m - mean) / (std + eps))`` per map over H,W (population std), maps [B,H,W]."""
    mean = maps.mean(dim=(-2, -1), keepdim=True)
    std = maps.std(dim=(-2, -1), keepdim=True, correction=0)
    return torch.relu((maps - mean) / (std + eps))


def binomial_kernel(dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
    """The 5x5 binomial kernel ``outer([1,4,6,4,1], [1,4,6,4,1]) / 256`` as a conv weight [1,1,5,5]."""
    row = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=dtype, device=device)
    return (torch.outer(row, row) / 256.0)[None, None]


def same_padding(size: int, kernel_size: int = 5, stride: int = 2) -> tuple[int, int]:
    """Zero padding (before, after) of TensorFlow's ``padding="SAME"`` along one axis of length ``size``.

    The output has ``ceil(size / stride)`` entries; the total padding ``max((out - 1) * stride + kernel_size - size,
    0)`` is split with the smaller half before: for the 5-tap, stride-2 pyramid, 1 before and 2 after on an even
    size, 2 and 2 on an odd one."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


def binomial_pyramid(maps: Tensor, levels: int = 5) -> list[Tensor]:
    """Step 4: ``levels`` maps [B,H_l,W_l]; level 0 is ``maps``, level l+1 is level l blurred by the binomial
    kernel with stride 2 and TensorFlow ``SAME`` zero padding (:func:`same_padding`; H_{l+1} = ceil(H_l / 2)), as
    the reference's ``tf.nn.conv2d(..., strides=2, padding="SAME")`` (``harmonization/training/pyramid.py``)."""
    positive_int("levels", levels)
    kernel = binomial_kernel(maps.dtype, maps.device)
    pyramid = [maps]
    current = maps[:, None]
    for _ in range(levels - 1):
        top, bottom = same_padding(current.shape[-2])
        left, right = same_padding(current.shape[-1])
        current = F.conv2d(F.pad(current, (left, right, top, bottom)), kernel, stride=2)
        pyramid.append(current[:, 0])
    return pyramid


def harmonization_loss(
    saliency: Tensor, human: Tensor, has_heatmap: Tensor | None = None, levels: int = 5
) -> Tensor:
    """Steps 2-5: pyramidal MSE between the standardized-cut model and human maps (scalar).

    Args:
        saliency: model maps [B,H,W] (already reduced over channels; differentiable).
        human: human maps [B,H,W] (zeros where an image has none).
        has_heatmap: bool [B], False for images without a human map; None means all have one.
        levels: number of pyramid levels (5 in the reference: 224 -> 14).

    ``mean_l mean_{b,i,j} (P_l(g) - P_l(h))^2 * has_heatmap_b``: the mean runs over the whole batch, so images
    without a map dilute the loss exactly as the reference's tokens do. Constant maps and batches without any map
    give finite values (0 for the latter).

    Raises:
        ValueError: saliency and human maps not both [B, H, W] of the same shape, or ``has_heatmap`` without one
            entry per map.
    """
    if saliency.ndim != 3 or saliency.shape != human.shape:
        raise ValueError(
            f"saliency and human maps must both be [B, H, W] of the same shape, got {tuple(saliency.shape)} and "
            f"{tuple(human.shape)}"
        )
    g = standardize_cut(saliency)
    h = standardize_cut(human.to(device=g.device, dtype=g.dtype))
    peak = g.detach().amax(dim=(-2, -1), keepdim=True) + 1e-6
    h = h / (h.amax(dim=(-2, -1), keepdim=True) + 1e-6) * peak
    difference = g - h
    if has_heatmap is not None:
        weight = has_heatmap.reshape(-1).to(device=g.device, dtype=g.dtype)
        if weight.shape[0] != g.shape[0]:
            raise ValueError(f"has_heatmap has {weight.shape[0]} entries for {g.shape[0]} maps")
        # weights are 0/1, so (d * w)^2 = d^2 * w, and the pyramid is linear: P(g) - P(h) = P(g - h) and
        # P(d * w) = P(d) * w. One pyramid of the masked difference instead of two.
        difference = difference * weight[:, None, None]
    per_level = [level.square().mean() for level in binomial_pyramid(difference, levels)]
    return torch.stack(per_level).mean()


class HarmonizationLoss(nn.Module):
    """``HarmonizationLoss(levels=5)(saliency, human, has_heatmap)``: module form of :func:`harmonization_loss`."""

    def __init__(self, levels: int = 5) -> None:
        super().__init__()
        self.levels = positive_int("levels", levels)

    def forward(self, saliency: Tensor, human: Tensor, has_heatmap: Tensor | None = None) -> Tensor:
        return harmonization_loss(saliency, human, has_heatmap, self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"
