""""Right for the Right Reasons" (Ross, Hughes and Doshi-Velez 2017, IJCAI): penalise the input gradient of the
log-probabilities where the model should NOT look.

The paper's objective (eq. 1) is::

    L = sum_n sum_k -y_nk log p_nk                                  (right answers)
        + lambda_1 sum_n sum_d (A_nd * d/dx_nd sum_k log p_nk)^2       (right reasons)
        + lambda_2 sum_i theta_i^2

with ``p = softmax(f(x))``, ``A`` the annotation (1 = an input dimension that should be irrelevant) and double
backprop through the gradient. Here the right-reasons term is averaged over the batch instead of summed, like the
task loss it is added to (the ratio of the two terms is the paper's), and summed over the channels and pixels
``d`` of each image: the mask [B,H,W] marks pixels, every channel of a marked pixel is penalised.

Where the model should not look (:func:`rrr_mask`): the data contract's ``spurious_mask`` when the batch carries
one; else, on images with a human map, the pixels where the human map is below ``threshold`` (the human did not
find them important); images with neither are not penalised.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.models.attention import double_backward_attention
from explain.base import grad_enabled
from explain.validation import in_interval


def log_probability_gradient(model: nn.Module, images: Tensor, create_graph: bool = True) -> tuple[Tensor, Tensor]:
    """Logits [B,K] and ``d(sum_b sum_k log softmax(f(x_b))_k) / d images`` [B,C,H,W] from one forward pass.

    Each image's gradient is that of its own ``sum_k log p_k`` (the images do not interact, except through
    BatchNorm in train mode). With ``create_graph=True`` the gradient stays differentiable w.r.t. the parameters
    (double backprop). Safe under ``torch.no_grad``/``inference_mode``; the caller's tensors are not modified.

    Raises:
        ValueError: ``images`` not [B, C, H, W], or a model that does not return logits [B, K].
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    attention = double_backward_attention() if create_graph else nullcontext()  # fused attention, twice differentiable
    with grad_enabled(), attention:
        images = images.clone() if images.is_inference() else images
        if not images.requires_grad:
            images = images.detach().requires_grad_(True)
        logits = model(images)
        if logits.ndim != 2:
            raise ValueError(f"the model must return logits [B, K], got shape {tuple(logits.shape)}")
        (gradient,) = torch.autograd.grad(F.log_softmax(logits, dim=1).sum(), images, create_graph=create_graph)
    return logits, gradient


def rrr_mask(
    human: Tensor | None,
    has_heatmap: Tensor | None,
    spurious_mask: Tensor | None = None,
    threshold: float = 0.1,
) -> Tensor | None:
    """Where the model should NOT look, bool [B,H,W]: ``spurious_mask`` when given; else ``human < threshold``
    on the images that have a human map (``has_heatmap``) and nothing on the others. None when there is neither."""
    if spurious_mask is not None:
        return spurious_mask.bool()
    if human is None:
        return None
    has = torch.ones(human.shape[0], dtype=torch.bool, device=human.device) if has_heatmap is None else has_heatmap
    return (human < threshold) & has.bool().to(human.device)[:, None, None]


def rrr_penalty(gradient: Tensor, mask: Tensor) -> Tensor:
    """``mean_b sum_{c,h,w} (mask_bhw * gradient_bchw)^2``: the right-reasons term of Ross et al. (2017) per image.

    Args:
        gradient: ``d(sum_k log p_k) / dx`` [B,C,H,W] (:func:`log_probability_gradient`).
        mask: bool [B,H,W], True where the model should not look (every channel of the pixel).

    Raises:
        ValueError: ``mask`` not [B, H, W] with the gradient's B, H, W.
    """
    if gradient.ndim != 4 or mask.shape != (gradient.shape[0], *gradient.shape[-2:]):
        raise ValueError(
            f"the mask must be [B, H, W] = {(gradient.shape[0], *gradient.shape[-2:])} for a gradient "
            f"{tuple(gradient.shape)}, got {tuple(mask.shape)}"
        )
    masked = gradient * mask[:, None].to(gradient.dtype)
    return masked.square().flatten(1).sum(1).mean()


class RRRLoss(nn.Module):
    """The right-reasons term as a module: ``RRRLoss(threshold)(model, images, human, has_heatmap, spurious_mask)
    -> (logits, penalty or None)``; None when the batch marks no pixel to ignore (no double backprop then)."""

    def __init__(self, threshold: float = 0.1) -> None:
        super().__init__()
        self.threshold = in_interval("rrr threshold", threshold, 0, 1, low_open=True)

    def forward(
        self,
        model: nn.Module,
        images: Tensor,
        human: Tensor | None = None,
        has_heatmap: Tensor | None = None,
        spurious_mask: Tensor | None = None,
        create_graph: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        mask = rrr_mask(human, has_heatmap, spurious_mask, self.threshold)
        if mask is None or not bool(mask.any()):
            return model(images), None
        logits, gradient = log_probability_gradient(model, images, create_graph=create_graph)
        return logits, rrr_penalty(gradient, mask.to(gradient.device))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"
