"""The harmonized step takes the double backprop on the annotated images only: the same loss and gradients as the
full-batch computation (the reference's) where the images do not interact, the full batch where BatchNorm couples
them; and it works under bf16 autocast and with channels_last."""

import warnings

import lightning as L
import pytest
import torch
from torch import nn

import align.losses.harmonization
import align.module
from align import HarmonizedClassifier
from align.losses import harmonization_loss, input_saliency
from align.models import lip_vgg, resnet18
from align.module import batch_coupled


def mixed_batch(size=10, image=16, annotated=(0, 3, 4), classes=4, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    has_heatmap = torch.zeros(size, dtype=torch.bool)
    has_heatmap[list(annotated)] = True
    heatmap = torch.rand(size, image, image, generator=generator, dtype=dtype) * has_heatmap[:, None, None]
    return {
        "image": torch.rand(size, 3, image, image, generator=generator, dtype=dtype),
        "label": torch.randint(0, classes, (size,), generator=generator),
        "heatmap": heatmap,
        "has_heatmap": has_heatmap,
    }


def step(model, data):
    with warnings.catch_warnings():  # self.log without a trainer only warns
        warnings.simplefilter("ignore")
        return model.training_step(data, 0)


def reference_loss(model, data):
    """The reference's full-batch computation, written out: one forward of the WHOLE batch with the double
    backprop, the harmonization mean over the whole batch (images without a map count as zeros)."""
    logits, saliency = input_saliency(model.backbone, data["image"], data["label"], reduce=model.reduce)
    task = model.task_loss(logits, data["label"])
    levels = model.harmonization.levels
    return task + model.harmonization_weight * harmonization_loss(saliency, data["heatmap"], data["has_heatmap"], levels)


def loss_and_gradients(model, data, split):
    model.split_annotated = split
    model.zero_grad(set_to_none=True)
    loss = step(model, data)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("task_loss", ["tau_ce", "hkr"])
def test_lipschitz_network_annotated_only_equals_full_batch(task_loss, monkeypatch):
    torch.manual_seed(0)
    model = HarmonizedClassifier(lip_vgg(4, widths=(8, 16)), task_loss=task_loss, harmonization_weight=2.0, levels=3)
    model = model.double()
    data = mixed_batch(dtype=torch.float64)
    calls = []
    original = align.module.input_gradient
    monkeypatch.setattr(align.module, "input_gradient", lambda m, x, *a, **k: calls.append(len(x)) or original(m, x, *a, **k))
    split_loss, split_grads = loss_and_gradients(model, data, split=True)
    assert calls == [3]  # the double backprop ran on the 3 annotated images only
    full_loss, full_grads = loss_and_gradients(model, data, split=False)
    assert calls == [3, 10]
    torch.testing.assert_close(split_loss, full_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(split_loss, reference_loss(model, data), rtol=1e-12, atol=1e-14)
    for split, full in zip(split_grads, full_grads, strict=True):
        torch.testing.assert_close(split, full, rtol=1e-9, atol=1e-12)
    # and in float32, to float round-off (the AOC weight goes through iterated orthogonalisation, whose float32
    # round-off reaches a few 1e-6 on single gradient entries; float64 above is exact to 1e-9)
    model = model.float()
    data32 = {key: value.float() if value.is_floating_point() else value for key, value in data.items()}
    split_loss, split_grads = loss_and_gradients(model, data32, split=True)
    full_loss, full_grads = loss_and_gradients(model, data32, split=False)
    torch.testing.assert_close(split_loss, full_loss, rtol=1e-5, atol=1e-6)
    for split, full in zip(split_grads, full_grads, strict=True):
        torch.testing.assert_close(split, full, rtol=1e-4, atol=1e-5)


def test_layernorm_vit_annotated_only_equals_full_batch():
    timm = pytest.importorskip("timm")  # the zoo's dependency
    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, num_classes=4, depth=2)
    for block in backbone.blocks:  # the fused attention kernels have no double backward
        block.attn.fused_attn = False
    model = HarmonizedClassifier(backbone, harmonization_weight=1.0, levels=3).double()
    assert not batch_coupled(model.backbone)
    data = mixed_batch(size=6, annotated=(1, 5), dtype=torch.float64)
    split_loss, split_grads = loss_and_gradients(model, data, split=True)
    full_loss, full_grads = loss_and_gradients(model, data, split=False)
    torch.testing.assert_close(split_loss, full_loss, rtol=1e-12, atol=1e-14)
    for split, full in zip(split_grads, full_grads, strict=True):
        torch.testing.assert_close(split, full, rtol=1e-9, atol=1e-12)


def test_batchnorm_in_training_mode_keeps_the_full_batch(monkeypatch):
    torch.manual_seed(0)
    model = HarmonizedClassifier(resnet18(4), harmonization_weight=1.0, levels=3).train()
    assert batch_coupled(model.backbone)
    data = mixed_batch(size=6, image=32, annotated=(2,))
    calls = []
    original = align.module.input_gradient
    monkeypatch.setattr(align.module, "input_gradient", lambda m, x, *a, **k: calls.append(len(x)) or original(m, x, *a, **k))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss = step(model, data)
    assert calls == [6]  # one forward of the whole batch, as the reference
    model.load_state_dict(state)  # same running statistics for the written-out computation
    torch.testing.assert_close(loss, reference_loss(model, data))
    # BatchNorm in eval mode does not couple the images: the split is exact again
    model.backbone.eval()
    assert not batch_coupled(model.backbone)
    calls.clear()
    split_loss = step(model, data)
    assert calls == [1]
    torch.testing.assert_close(split_loss, reference_loss(model, data), rtol=1e-5, atol=1e-6)


def test_harmonized_step_under_bf16_autocast_and_channels_last():
    torch.manual_seed(0)
    model = HarmonizedClassifier(resnet18(4), harmonization_weight=1.0, levels=3, channels_last=True)
    assert model.backbone[0].weight.is_contiguous(memory_format=torch.channels_last)
    model.backbone.eval()  # fixed statistics: the two precisions see the same network
    data = mixed_batch(size=4, image=32, annotated=(0, 2))
    full_precision = step(model, data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = step(model, data)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # bf16 keeps 8 bits of mantissa, and the saliency is a difference of small terms: a loose but finite match
    torch.testing.assert_close(loss, full_precision, rtol=0.15, atol=0.0)
    loss.backward()  # the double backward under autocast
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_fit_with_bf16_mixed_and_channels_last(tmp_path):
    from datamodules import ShortcutShapesDataModule

    torch.manual_seed(0)
    data = ShortcutShapesDataModule(train_size=32, val_size=16, test_size=16, image_size=16, batch_size=8,
                                    annotated_fraction=0.5)
    model = HarmonizedClassifier(lip_vgg(4, widths=(8, 16)), task_loss="tau_ce", channels_last=True)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["train/harmonization_loss"])
    assert torch.isfinite(metrics["val/loss"])


def test_annotated_only_training_follows_the_full_batch_trajectory():
    """Fifteen SGD steps on the orthogonium lip_vgg: the split step (annotated images with the double backprop,
    the others plain, the orthogonal kernels computed once for both passes) stays finite and gives the same
    weights as the full-batch step, in float64 to round-off. A cache of ALL parametrized tensors
    (``parametrize.cached()``) froze orthogonium's power iteration and gave NaN within these steps; recomputing
    the kernels in each pass advanced the power iteration twice per step, another trajectory."""

    def train(split: bool, steps: int = 15) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = HarmonizedClassifier(lip_vgg(4, widths=(8, 16)), task_loss="tau_ce", levels=3, split_annotated=split)
        model = model.double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        generator = torch.Generator().manual_seed(1)
        for _ in range(steps):
            images = torch.rand(10, 3, 16, 16, generator=generator, dtype=torch.float64)
            labels = torch.randint(0, 4, (10,), generator=generator)
            human = torch.rand(10, 16, 16, generator=generator, dtype=torch.float64)
            logits, harmonization = model.harmonized_forward(images, labels, human, torch.arange(10) < 3)
            loss = model.task_loss(logits, labels) + harmonization
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert torch.isfinite(loss)
        return [tensor.detach().clone() for tensor in model.state_dict().values() if tensor.is_floating_point()]

    # One step agrees to float64 round-off. Over the steps the round-off grows geometrically through the
    # orthogonalisation (measured with torch 2.14: 2.5e-16 after 1 step, 1e-14 after 5, 2e-10 after 15), so the
    # 15-step check allows 1e-8: another trajectory (the power iteration advanced twice a step) is off by ~1e-3.
    one_split, one_full = train(split=True, steps=1), train(split=False, steps=1)
    for a, b in zip(one_split, one_full):
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-14)
    split, full = train(split=True), train(split=False)
    assert all(bool(torch.isfinite(tensor).all()) for tensor in split)
    for a, b in zip(split, full):
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-8)


def test_split_step_computes_each_orthogonal_kernel_once():
    """The split step evaluates each AOC kernel's parametrization (power iteration, Bjorck, BCOP) once, as a
    full-batch pass does, not once per pass."""
    from align.models import OrthoConv2d

    torch.manual_seed(0)
    model = HarmonizedClassifier(lip_vgg(4, widths=(8, 16)), task_loss="tau_ce", levels=3)
    layers = [module for module in model.modules() if isinstance(module, OrthoConv2d)]
    calls = {id(layer): 0 for layer in layers}
    for layer in layers:
        def count(module, args, output, key=id(layer)):
            calls[key] += 1
        layer.conv.parametrizations.weight.register_forward_hook(count)
    images, labels, human = torch.rand(10, 3, 16, 16), torch.randint(0, 4, (10,)), torch.rand(10, 16, 16)
    model.harmonized_forward(images, labels, human, torch.arange(10) < 3)
    assert layers and set(calls.values()) == {1}
    model.backbone(images), model.backbone(images)  # outside the split step, every call computes its kernel
    assert set(calls.values()) == {3}
