"""The split step of BatchNorm networks. Frozen statistics: a plain forward of the whole batch, then the double
backprop on the annotated images with the batch statistics of that forward held constant. Ghost statistics: the
annotated images and the others as two ghost batches, the running statistics updated once with the pooled ones."""

import copy

import pytest
import torch
from torch import nn

from align import HarmonizedClassifier
from align.batch_statistics import (
    frozen_batch_statistics,
    frozen_statistics_input_gradient,
    pooled_running_statistics,
    recorded_batch_statistics,
    synchronised_batch_norms,
)
from align.losses import harmonization_loss
from align.losses.harmonization import input_gradient
from align.models import small_cnn
from explain.attributions.saliency import reduce_channels

ANNOTATED = torch.tensor([1, 4, 6])


def network(running="momentum"):
    """small_cnn with BatchNorm keeping running statistics with a momentum, a cumulative average
    (``momentum=None``, from its second step), or none."""
    torch.manual_seed(0)
    model = small_cnn(4, widths=(6, 8), depth=1).double()
    for layer in model.modules():  # running statistics away from (0, 1), so a mix-up would show
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
            layer.weight.data.uniform_(0.5, 1.5)
            layer.bias.data.uniform_(-0.2, 0.2)
            if running == "cumulative":
                layer.momentum = None
                layer.num_batches_tracked.fill_(1)
            if running == "none":
                layer.track_running_stats = False
                layer.running_mean = layer.running_var = layer.num_batches_tracked = None
    return model


def batch(size=8, image=12):
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(size, 3, image, image, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (size,), generator=generator)
    human = torch.rand(size, image, image, generator=generator, dtype=torch.float64)
    return images, labels, human


def leaves(model):
    return [module for module in model.modules() if not list(module.children())]


def hand_batch_statistics(model, images):
    """The statistics each BatchNorm normalises with, computed by running small_cnn's layers one by one."""
    statistics, x = [], images
    with torch.no_grad():
        for layer in leaves(copy.deepcopy(model)):
            if isinstance(layer, nn.BatchNorm2d):
                statistics.append((x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), correction=0)))
            x = layer(x)
    return statistics


def test_eval_mode_is_the_full_batch_exactly():
    model = network().eval()
    images, labels, _ = batch()
    logits, gradient = frozen_statistics_input_gradient(model, images, labels, ANNOTATED)
    full_logits, full_gradient = input_gradient(model, images, labels, create_graph=True)
    torch.testing.assert_close(logits, full_logits, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(gradient, full_gradient[ANNOTATED], rtol=1e-10, atol=1e-12)
    # and the parameter gradients of a loss of both
    parameters = list(model.parameters())
    ours = torch.autograd.grad(logits.square().sum() + gradient.square().sum(), parameters)
    full = torch.autograd.grad(full_logits.square().sum() + full_gradient[ANNOTATED].square().sum(), parameters)
    for a, b in zip(ours, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("running", ["momentum", "cumulative", "none"])
def test_train_mode_saliency_treats_the_batch_statistics_as_constants(running):
    """In training mode: the logits are the plain full-batch ones; the gradient is that of the same network in
    eval mode with the batch statistics as running statistics (computed here by hand), i.e. the full-batch
    saliency without the paths through the statistics; and that differs from the exact full-batch saliency."""
    model = network(running).train()
    images, labels, _ = batch()
    plain = copy.deepcopy(model)
    logits, gradient = frozen_statistics_input_gradient(model, images, labels, ANNOTATED)

    torch.testing.assert_close(logits, plain(images), rtol=1e-12, atol=1e-13)
    frozen = copy.deepcopy(plain).eval()
    norms = [layer for layer in frozen.modules() if isinstance(layer, nn.BatchNorm2d)]
    for layer, (mean, var) in zip(norms, hand_batch_statistics(model, images), strict=True):
        layer.running_mean, layer.running_var = mean.clone(), var.clone()
    _, expected = input_gradient(frozen, images[ANNOTATED], labels[ANNOTATED], create_graph=True)
    torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-12)
    # the parameter gradient of the saliency is the frozen network's too
    options = {"allow_unused": True, "materialize_grads": True}  # the head's bias does not enter a gradient
    ours = torch.autograd.grad(gradient.square().sum(), list(model.parameters()), **options)
    theirs = torch.autograd.grad(expected.square().sum(), list(frozen.parameters()), **options)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)

    _, exact = input_gradient(copy.deepcopy(model), images, labels, create_graph=False)
    # the exact saliency d(sum_b logit_b[y_b]) / d x_a also flows through the statistics (from every logit): absent here
    assert (gradient - exact[ANNOTATED]).norm() > 1e-3 * exact[ANNOTATED].norm()


@pytest.mark.parametrize("running", ["momentum", "cumulative"])
def test_running_statistics_are_updated_once_as_in_a_plain_step(running):
    images, labels, human = batch()
    has_heatmap = torch.zeros(len(images), dtype=torch.bool)
    has_heatmap[ANNOTATED] = True
    module = HarmonizedClassifier(network(running), levels=2, batch_statistics="frozen").train()
    plain = copy.deepcopy(module.backbone)
    logits, harmonization = module.harmonized_forward(images, labels, human, has_heatmap)
    (module.task_loss(logits, labels) + harmonization).backward()
    plain(images)
    for name, buffer in plain.named_buffers():
        torch.testing.assert_close(module.backbone.get_buffer(name), buffer, rtol=0, atol=0, msg=name)
    for layer in module.backbone.modules():  # and the layers are back in training mode with their own buffers
        if isinstance(layer, nn.BatchNorm2d):
            assert layer.training and int(layer.num_batches_tracked) == (1 if running == "momentum" else 2)


def test_module_step_is_plain_task_loss_plus_frozen_harmonization():
    """The module's loss and parameter gradients with the option: the task loss of the plain full-batch forward
    plus the harmonization loss of the frozen-statistics saliency, with the reference's whole-batch mean."""
    images, labels, human = batch()
    has_heatmap = torch.zeros(len(images), dtype=torch.bool)
    has_heatmap[ANNOTATED] = True
    module = HarmonizedClassifier(network(), levels=2, harmonization_weight=3.0, batch_statistics="frozen")
    module.train()
    state = copy.deepcopy(module.state_dict())
    logits, harmonization = module.harmonized_forward(images, labels, human, has_heatmap)
    loss = module.task_loss(logits, labels) + 3.0 * harmonization
    ours = torch.autograd.grad(loss, list(module.backbone.parameters()))

    module.load_state_dict(state)
    task_logits = module.backbone(images)
    norms = [layer for layer in module.backbone.modules() if isinstance(layer, nn.BatchNorm2d)]
    statistics = dict(zip(norms, hand_batch_statistics(module.backbone, images), strict=True))
    with frozen_batch_statistics(module.backbone, statistics):
        _, gradient = input_gradient(module.backbone, images[ANNOTATED], labels[ANNOTATED], create_graph=True)
    saliency = torch.zeros(len(images), *images.shape[-2:], dtype=images.dtype)
    saliency = saliency.index_copy(0, ANNOTATED, reduce_channels(gradient, "mean"))
    human = human * has_heatmap[:, None, None]
    expected = module.task_loss(task_logits, labels) + 3.0 * harmonization_loss(saliency, human, has_heatmap, levels=2)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-13)
    theirs = torch.autograd.grad(expected, list(module.backbone.parameters()))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_default_keeps_the_full_batch_and_recording_leaves_the_network_alone():
    images, labels, human = batch()
    has_heatmap = torch.arange(len(images)) < 2
    module = HarmonizedClassifier(network(), levels=2).train()
    calls = []
    module.backbone.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    module.harmonized_forward(images, labels, human, has_heatmap)
    assert calls == [8]  # one double-backprop pass of the whole batch
    module.batch_statistics = "frozen"
    calls.clear()
    module.harmonized_forward(images, labels, human, has_heatmap)
    assert calls == [8, 2]  # the plain whole batch, then the annotated images
    # outside the two contexts nothing stays hooked or swapped
    model = network().train()
    before = [buffer.clone() for buffer in model.buffers()]
    with recorded_batch_statistics(model) as statistics:
        model(images)
    with frozen_batch_statistics(model, statistics):
        model(images)
    assert all(layer.training for layer in model.modules())
    assert not any(layer._forward_pre_hooks for layer in model.modules())
    assert int(model[0][1].num_batches_tracked) == 1 and not torch.equal(before[0], model[0][1].running_mean)


def test_frozen_statistics_refuse_a_layer_that_was_not_recorded():
    model = network().train()
    with pytest.raises(ValueError, match="no recorded statistics"):
        with frozen_batch_statistics(model, {}):
            pass


def test_ghost_step_is_the_exact_step_of_two_ghost_batches():
    """``batch_statistics="ghost"``: the annotated images are one batch (their own statistics, the exact double
    backprop through them) and the others a second one; the loss and its parameter gradient equal those of the two
    batches run apart through the reference's full-batch step (the whole-batch means weighted by the sizes)."""
    images, labels, human = batch()
    has_heatmap = torch.zeros(len(images), dtype=torch.bool)
    has_heatmap[ANNOTATED] = True
    others = (~has_heatmap).nonzero().flatten()
    module = HarmonizedClassifier(network(), levels=2, harmonization_weight=3.0, batch_statistics="ghost").train()
    state = copy.deepcopy(module.state_dict())
    logits, harmonization = module.harmonized_forward(images, labels, human, has_heatmap)
    loss = module.task_loss(logits, labels) + 3.0 * harmonization
    ours = torch.autograd.grad(loss, list(module.backbone.parameters()))

    module.load_state_dict(state)
    logits_map, gradient = input_gradient(module.backbone, images[ANNOTATED], labels[ANNOTATED], create_graph=True)
    logits_plain = module.backbone(images[others])
    n = len(images)
    task = (module.task_loss(logits_map, labels[ANNOTATED]) * len(ANNOTATED)
            + module.task_loss(logits_plain, labels[others]) * len(others)) / n
    saliency = reduce_channels(gradient, "mean")
    everywhere = torch.ones(len(ANNOTATED), dtype=torch.bool)
    expected = task + 3.0 * harmonization_loss(saliency, human[ANNOTATED], everywhere, levels=2) * len(ANNOTATED) / n
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-13)
    theirs = torch.autograd.grad(expected, list(module.backbone.parameters()))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # and it is not the full-batch step: the ghost batches normalise with their own statistics
    module.load_state_dict(state)
    full = module.backbone(images)
    assert (full[ANNOTATED] - logits_map).abs().max() > 1e-3


@pytest.mark.parametrize("running", ["momentum", "cumulative"])
def test_ghost_running_statistics_are_one_update_with_the_pooled_statistics(running):
    """One update per step (``num_batches_tracked`` + 1) with the mean and unbiased variance of everything each
    layer saw in both ghost batches: written out from the layers' recorded inputs. The first layer sees the raw
    images, so it ends exactly as after a plain step of the whole batch."""
    images, labels, human = batch()
    has_heatmap = torch.zeros(len(images), dtype=torch.bool)
    has_heatmap[ANNOTATED] = True
    module = HarmonizedClassifier(network(running), levels=2, batch_statistics="ghost").train()
    norms = [layer for layer in module.backbone.modules() if isinstance(layer, nn.BatchNorm2d)]
    start = [(layer.running_mean.clone(), layer.running_var.clone(), int(layer.num_batches_tracked)) for layer in norms]
    plain = copy.deepcopy(module.backbone)
    seen = {layer: [] for layer in norms}
    hooks = [layer.register_forward_pre_hook(lambda layer, args: seen[layer].append(args[0].detach())) for layer in norms]
    logits, harmonization = module.harmonized_forward(images, labels, human, has_heatmap)
    (module.task_loss(logits, labels) + harmonization).backward()
    for hook in hooks:
        hook.remove()
    for layer, (mean0, var0, tracked0) in zip(norms, start, strict=True):
        x = torch.cat(seen[layer])
        assert len(seen[layer]) == 2 and x.shape[0] == len(images)
        f = layer.momentum if layer.momentum is not None else 1 / (tracked0 + 1)
        assert int(layer.num_batches_tracked) == tracked0 + 1
        torch.testing.assert_close(layer.running_mean, (1 - f) * mean0 + f * x.mean((0, 2, 3)), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(layer.running_var, (1 - f) * var0 + f * x.var((0, 2, 3)), rtol=1e-12, atol=1e-13)
    plain(images)
    first = norms[0]
    torch.testing.assert_close(first.running_mean, plain[0][1].running_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(first.running_var, plain[0][1].running_var, rtol=1e-12, atol=1e-14)


def test_pooled_running_statistics_restores_them_on_error_and_skips_single_runs():
    images, _, _ = batch()
    model = network().train()
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    with pytest.raises(RuntimeError, match="boom"):
        with pooled_running_statistics(model):
            model(images[:3]), model(images[3:])
            raise RuntimeError("boom")
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, before[name], rtol=0, atol=0, msg=name)
    once = copy.deepcopy(model)
    with pooled_running_statistics(model):
        model(images)  # one run: the plain update, untouched
    once(images)
    for name, buffer in once.named_buffers():
        torch.testing.assert_close(model.get_buffer(name), buffer, rtol=0, atol=0, msg=name)


def test_batch_statistics_option_is_checked():
    with pytest.raises(ValueError, match="batch_statistics"):
        HarmonizedClassifier(network(), batch_statistics="frozen_ish")


def distributed_world_of_two(monkeypatch):
    """Make torch.distributed report an initialised group of two processes (SyncBatchNorm's own test)."""
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)


def test_synchronised_batch_norms_are_the_sync_layers_in_training_in_a_group_of_several(monkeypatch):
    model = nn.SyncBatchNorm.convert_sync_batchnorm(network())
    assert synchronised_batch_norms(model) == []  # no process group
    distributed_world_of_two(monkeypatch)
    sync = [layer for layer in model.modules() if isinstance(layer, nn.SyncBatchNorm)]
    assert sync and synchronised_batch_norms(model) == sync
    assert synchronised_batch_norms(network()) == []  # plain BatchNorm never synchronises
    model.eval()
    assert synchronised_batch_norms(model) == []
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 1)
    assert synchronised_batch_norms(model.train()) == []


@pytest.mark.parametrize(("alignment_loss", "statistics", "split", "refused"), [
    ("harmonization", "full", True, True),
    ("harmonization", "ghost", True, True),
    ("harmonization", "frozen", False, True),  # no split: the full-batch double backprop
    ("harmonization", "frozen", True, False),
    ("rrr", "frozen", True, True),
])
def test_fit_refuses_a_double_backprop_through_synchronised_batch_norm(
    monkeypatch, alignment_loss, statistics, split, refused
):
    distributed_world_of_two(monkeypatch)
    module = HarmonizedClassifier(nn.SyncBatchNorm.convert_sync_batchnorm(network()), alignment_loss=alignment_loss,
                                  batch_statistics=statistics, split_annotated=split)
    if not refused:
        module.on_fit_start()
        return
    with pytest.raises(RuntimeError, match="SyncBatchNorm.*pytorch/pytorch#61222") as error:
        module.on_fit_start()
    assert ("use batch_statistics='frozen'" in str(error.value)) == (alignment_loss == "harmonization")
    HarmonizedClassifier(network(), alignment_loss=alignment_loss, batch_statistics=statistics).on_fit_start()


def test_frozen_statistics_split_a_fully_annotated_batch_only_when_batch_norm_is_synchronised(monkeypatch):
    """Every image annotated: the exact full-batch step, unless the BatchNorm synchronises (its backward has no
    double backward); then the frozen-statistics step, the double backprop on all images with the statistics of
    the plain pass held constant."""
    images, labels, human = batch()
    every = torch.ones(len(images), dtype=torch.bool)
    module = HarmonizedClassifier(network(), levels=2, batch_statistics="frozen").train()
    state = copy.deepcopy(module.state_dict())
    _, full = module.harmonized_forward(images, labels, human, every)
    module.load_state_dict(state)
    _, exact = input_gradient(module.backbone, images, labels, create_graph=True)
    torch.testing.assert_close(full, module.harmonization(reduce_channels(exact, "mean"), human, every))

    module.load_state_dict(state)
    monkeypatch.setattr("align.module.synchronised_batch_norms", lambda model: [model])
    _, frozen = module.harmonized_forward(images, labels, human, every)
    module.load_state_dict(state)
    _, gradient = frozen_statistics_input_gradient(module.backbone, images, labels, torch.arange(len(images)))
    torch.testing.assert_close(frozen, module.harmonization(reduce_channels(gradient, "mean"), human))
    assert not torch.allclose(frozen, full)
