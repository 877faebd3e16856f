"""Attention with a fused forward and a double backward, against PyTorch's math kernel."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from align import HarmonizedClassifier
from align.models.attention import (
    attention_vjp,
    attention_vjp_backward,
    double_backward_attention,
    scaled_dot_product_attention,
)

MASKS = ["none", "bool", "float", "causal"]


def inputs(dtype=torch.float32, batch=2, heads=3, length=7, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, dim, generator=generator, dtype=dtype).requires_grad_(True)
            for _ in range(3)]


def mask_options(kind, length=7, dtype=torch.float32):
    generator = torch.Generator().manual_seed(5)
    if kind == "bool":
        mask = torch.rand(length, length, generator=generator) > 0.4
        mask.fill_diagonal_(True)  # no row without a key
        return {"attn_mask": mask}
    if kind == "float":  # per head, broadcast over the batch
        return {"attn_mask": torch.randn(3, length, length, generator=generator, dtype=dtype)}
    if kind == "causal":
        return {"is_causal": True}
    return {}


def first_and_second_order(attention, q, k, v, **options):
    """Output, its gradient w.r.t. q, k, v, and the gradient of a function of that gradient (double backward)."""
    out = attention(q, k, v, **options)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v), create_graph=True)
    second = torch.autograd.grad(sum(grad.square().sum() for grad in grads), (q, k, v))
    return out, grads, second


def math_kernel(q, k, v, **options):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **options)


@pytest.mark.parametrize("kind", MASKS)
def test_values_and_first_and_second_order_gradients_match_the_math_kernel(kind):
    q, k, v = inputs()
    options = mask_options(kind)
    ours = first_and_second_order(scaled_dot_product_attention, q, k, v, **options)
    theirs = first_and_second_order(math_kernel, q, k, v, **options)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[1] + ours[2], theirs[1] + theirs[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", MASKS)
def test_gradcheck_and_gradgradcheck_in_float64(kind):
    q, k, v = inputs(torch.float64, batch=1, heads=3, length=4, dim=3)
    options = mask_options(kind, length=4, dtype=torch.float64)
    function = lambda q, k, v: scaled_dot_product_attention(q, k, v, **options)  # noqa: E731
    assert torch.autograd.gradcheck(function, (q, k, v))
    assert torch.autograd.gradgradcheck(function, (q, k, v))


def test_the_mode_swaps_the_function_only_inside_the_block():
    q, k, v = inputs()
    with double_backward_attention():
        inside = F.scaled_dot_product_attention(q, k, v)
    outside = F.scaled_dot_product_attention(q, k, v)
    assert type(inside.grad_fn).__name__ == "DoubleBackwardAttentionBackward"
    assert type(outside.grad_fn).__name__ != "DoubleBackwardAttentionBackward"
    torch.testing.assert_close(inside, outside)


def test_dropout_falls_back_to_the_written_out_attention():
    q, k, v = inputs(torch.float64)
    torch.manual_seed(3)
    out = scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert type(out.grad_fn).__name__ != "DoubleBackwardAttentionBackward"
    grads = torch.autograd.grad(out.sum(), (q, k, v), create_graph=True)
    torch.autograd.grad(sum(g.square().sum() for g in grads), (q, k, v))  # differentiable twice


@pytest.mark.parametrize("masked", [False, True])
def test_timm_attention_fused_with_the_mode_equals_its_own_math_path(masked):
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import Attention

    torch.manual_seed(0)
    layer = Attention(16, num_heads=2, qkv_bias=True).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(5, 5) > 0.3).fill_diagonal_(True) if masked else None

    def run(fused):
        layer.fused_attn = fused
        with double_backward_attention():
            out = layer(x, attn_mask=mask)
            (grad,) = torch.autograd.grad(out.sin().sum(), x, create_graph=True)
        return out, grad, torch.autograd.grad(grad.square().sum(), list(layer.parameters()))

    ours, theirs = run(True), run(False)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-10, atol=1e-12)
    for a, b in zip(ours[2], theirs[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_harmonized_vit_step_with_fused_attention_equals_the_math_path():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, num_classes=4, depth=2)
    model = HarmonizedClassifier(backbone, levels=3).double()
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(5, 3, 16, 16, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (5,), generator=generator)
    human = torch.rand(5, 16, 16, generator=generator, dtype=torch.float64)
    has_heatmap = torch.tensor([True, False, True, False, False])

    def loss_and_gradients(fused):
        for block in backbone.blocks:
            block.attn.fused_attn = fused
        logits, harmonization = model.harmonized_forward(images, labels, human, has_heatmap)
        loss = model.task_loss(logits, labels) + harmonization
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    (loss, grads), (math_loss, math_grads) = loss_and_gradients(True), loss_and_gradients(False)
    torch.testing.assert_close(loss, math_loss, rtol=1e-12, atol=1e-14)
    for a, b in zip(grads, math_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_rrr_input_gradient_of_a_fused_vit_is_differentiable_and_equals_the_math_path():
    """The RRR term's input gradient also takes the double backward (the fused kernels alone have none)."""
    timm = pytest.importorskip("timm")
    from align.losses.rrr import log_probability_gradient

    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, num_classes=3, depth=1).double()
    images = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def parameter_gradient(fused):
        backbone.blocks[0].attn.fused_attn = fused
        _, gradient = log_probability_gradient(backbone, images)
        return torch.autograd.grad(gradient.square().sum(), list(backbone.parameters()), allow_unused=True,
                                   materialize_grads=True)

    for a, b in zip(parameter_gradient(True), parameter_gradient(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", MASKS)
def test_closed_form_double_backward_equals_autograd_through_the_written_out_backward(kind):
    """attention_vjp_backward (closed form) against autograd differentiating attention_vjp (the backward written
    out in differentiable operations), w.r.t. q, k, v and the incoming gradient, for random upstream gradients."""
    q, k, v = inputs(torch.float64, length=6, dim=5)
    options = mask_options(kind, length=6, dtype=torch.float64)
    generator = torch.Generator().manual_seed(11)
    grad = torch.randn(q.shape, generator=generator, dtype=torch.float64, requires_grad=True)
    upstream = [torch.randn(q.shape, generator=generator, dtype=torch.float64) for _ in range(3)]
    mask, causal = options.get("attn_mask"), options.get("is_causal", False)
    outputs = attention_vjp(q, k, v, grad, mask, causal, 0.3)
    expected = torch.autograd.grad(outputs, (q, k, v, grad), upstream)
    ours = attention_vjp_backward(q, k, v, grad, *upstream, mask, causal, 0.3)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
