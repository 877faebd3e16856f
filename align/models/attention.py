"""Scaled dot-product attention that keeps the fused forward and has a double backward.

The fused kernels of ``F.scaled_dot_product_attention`` (flash, memory-efficient, the CPU flash kernel) have no
double backward, so the harmonization loss (a gradient of an input gradient) used to run attention on the math
kernel, which keeps every ``[L, S]`` attention matrix of the forward. :class:`DoubleBackwardAttention` runs the
forward on whichever kernel PyTorch picks and saves only ``q, k, v``; its backward recomputes the softmax and is
written in differentiable operations (:class:`AttentionBackward`, whose own backward, the double backward of
attention, recomputes it in turn and is written out in closed form, :func:`attention_vjp_backward`; so the
double-backprop graph keeps no attention matrix either):

``s = q k^T * scale + mask``, ``p = softmax(s)``, ``out = p v``;
``dv = p^T g``, ``dp = g v^T``, ``ds = p * (dp - rowsum(dp * p))``, ``dq = ds k * scale``, ``dk = ds^T q * scale``.

:func:`double_backward_attention` swaps it in for every ``F.scaled_dot_product_attention`` call made inside the
block (timm's ``Attention``, ``nn.MultiheadAttention``), through a ``TorchFunctionMode``; the harmonized step
enters it only around the pass that needs the double backward (:func:`align.losses.harmonization.input_gradient`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode


def attention_bias(
    query: Tensor, key: Tensor, attn_mask: Tensor | None, is_causal: bool
) -> Tensor | None:
    """The additive bias ``F.scaled_dot_product_attention`` applies to ``q k^T * scale``: a float mask as it is, a
    bool mask (True: takes part) and ``is_causal`` (top-left aligned lower triangle) as 0 / -inf; None if neither."""
    bias = None
    if is_causal:
        length, source = query.shape[-2], key.shape[-2]
        keep = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        bias = torch.zeros(length, source, dtype=query.dtype, device=query.device).masked_fill(~keep, -math.inf)
    if attn_mask is not None:
        mask = attn_mask
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, -math.inf)
        bias = mask if bias is None else bias + mask
    return bias


def attention_probabilities(
    query: Tensor, key: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float
) -> Tensor:
    """``softmax(q k^T * scale + bias)`` [..., L, S] in differentiable operations."""
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    bias = attention_bias(query, key, attn_mask, is_causal)
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores, dim=-1)


def _scores_gradient(
    query: Tensor, key: Tensor, value: Tensor, grad: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``p``, the incoming gradient in ``v``'s dtype, ``dp - r`` and ``ds = p * (dp - r)`` (``dp = g v^T``,
    ``r = rowsum(p * dp)``): what the backward and the double backward of attention share."""
    p = attention_probabilities(query, key, attn_mask, is_causal, scale)
    grad = grad.to(value.dtype)
    grad_p = torch.matmul(grad, value.transpose(-2, -1))
    centred_grad_p = grad_p - (grad_p * p).sum(dim=-1, keepdim=True)
    return p, grad, centred_grad_p, p * centred_grad_p


def attention_vjp(
    query: Tensor, key: Tensor, value: Tensor, grad: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of ``<grad, attention(q, k, v)>`` w.r.t. ``q, k, v``, softmax recomputed, in differentiable
    operations (see the module docstring)."""
    p, grad, _, grad_scores = _scores_gradient(query, key, value, grad, attn_mask, is_causal, scale)
    grad_value = torch.matmul(p.transpose(-2, -1), grad)
    grad_query = torch.matmul(grad_scores, key) * scale
    grad_key = torch.matmul(grad_scores.transpose(-2, -1), query) * scale
    return grad_query, grad_key, grad_value


class DoubleBackwardAttention(torch.autograd.Function):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=..., scale=...)`` (no dropout): the fused
    forward, saving ``q, k, v`` only; the backward is :class:`AttentionBackward`, itself differentiable. The mask
    is a constant (no gradient)."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, is_causal: bool,
                scale: float) -> Tensor:
        ctx.save_for_backward(query, key, value, attn_mask)
        ctx.is_causal, ctx.scale = is_causal, scale
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        query, key, value, attn_mask = ctx.saved_tensors
        grads = AttentionBackward.apply(query, key, value, grad, attn_mask, ctx.is_causal, ctx.scale)
        return *grads, None, None, None


class AttentionBackward(torch.autograd.Function):
    """:func:`attention_vjp` as a function of ``q, k, v`` and the incoming gradient, saving only those: its own
    backward (the double backward of attention, :func:`attention_vjp_backward`) recomputes the softmax one layer at
    a time, so the graph of the double backprop holds no ``[L, S]`` matrix. Differentiable twice in all (enough
    for a loss on an input gradient)."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, grad: Tensor, attn_mask: Tensor | None,
                is_causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        ctx.save_for_backward(query, key, value, grad, attn_mask)
        ctx.is_causal, ctx.scale = is_causal, scale
        return attention_vjp(query, key, value, grad, attn_mask, is_causal, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_dq: Tensor, grad_dk: Tensor, grad_dv: Tensor) -> tuple[Tensor | None, ...]:
        query, key, value, grad, attn_mask = ctx.saved_tensors
        grads = attention_vjp_backward(query, key, value, grad, grad_dq, grad_dk, grad_dv, attn_mask, ctx.is_causal,
                                       ctx.scale)
        return *grads, None, None, None


def attention_vjp_backward(
    query: Tensor, key: Tensor, value: Tensor, grad: Tensor, grad_dq: Tensor, grad_dk: Tensor, grad_dv: Tensor,
    attn_mask: Tensor | None, is_causal: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The double backward of attention, in closed form: the gradients of
    ``phi = <u_q, dq> + <u_k, dk> + <u_v, dv>`` (``dq, dk, dv`` from :func:`attention_vjp`, ``u = grad_d*``) w.r.t.
    ``q, k, v`` and the incoming gradient ``g``, with the softmax recomputed (11 batched products, against ~15 to
    differentiate :func:`attention_vjp` under autograd). With ``dp = g v^T``, ``r = rowsum(p * dp)``,
    ``ds = p * (dp - r)``, ``w = scale (u_q k^T + q u_k^T)`` (what ``phi`` pairs with ``ds``) and
    ``c = rowsum(p * w)``:

    ``d phi / d dp = p * (w - c)`` (``= a``), ``d phi / d p = (dp - r) * (w - c) + g u_v^T`` up to a constant per row,
    which the softmax's backward removes, giving ``d phi / d s = p * (b - rowsum(p * b))`` (``= t``) for that ``b``;
    ``d/dq = scale (ds u_k + t k)``, ``d/dk = scale (ds^T u_q + t^T q)``, ``d/dv = a^T g``, ``d/dg = p u_v + a v``.
    """
    p, grad, centred_grad_p, grad_scores = _scores_gradient(query, key, value, grad, attn_mask, is_causal, scale)
    paired = (torch.matmul(grad_dq, key.transpose(-2, -1)) + torch.matmul(query, grad_dk.transpose(-2, -1))) * scale
    centred_paired = paired - (p * paired).sum(dim=-1, keepdim=True)
    through_grad_p = p * centred_paired
    through_p = centred_grad_p * centred_paired + torch.matmul(grad, grad_dv.transpose(-2, -1))
    through_scores = p * (through_p - (p * through_p).sum(dim=-1, keepdim=True))
    query_grad = (torch.matmul(grad_scores, grad_dk) + torch.matmul(through_scores, key)) * scale
    key_grad = (torch.matmul(grad_scores.transpose(-2, -1), grad_dq)
                + torch.matmul(through_scores.transpose(-2, -1), query)) * scale
    value_grad = torch.matmul(through_grad_p.transpose(-2, -1), grad)
    grad_grad = torch.matmul(p, grad_dv) + torch.matmul(through_grad_p, value)
    return query_grad, key_grad, value_grad, grad_grad


def math_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
    is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention`` written out in differentiable operations (any order of derivative):
    for the cases :class:`DoubleBackwardAttention` does not cover (dropout, grouped-query attention)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if enable_gqa:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
    p = attention_probabilities(query, key, attn_mask, is_causal, scale)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p, value)


def scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
    is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention`` with a double backward: :class:`DoubleBackwardAttention` (fused forward)
    when nothing needs a gradient of the mask and there is no dropout or grouped-query attention; otherwise
    :func:`math_attention`."""
    same_batch = query.shape[:-2] == key.shape[:-2] == value.shape[:-2]
    mask_is_constant = attn_mask is None or not attn_mask.requires_grad
    if dropout_p > 0 or enable_gqa or not same_batch or not mask_is_constant:
        return math_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return DoubleBackwardAttention.apply(query, key, value, attn_mask, is_causal, scale)


class _DoubleBackwardAttentionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return scaled_dot_product_attention(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def double_backward_attention() -> Iterator[None]:
    """Within the block, every ``F.scaled_dot_product_attention`` call runs :func:`scaled_dot_product_attention`:
    the same values, the fused forward, and a backward that autograd can differentiate again."""
    with _DoubleBackwardAttentionMode():
        yield
