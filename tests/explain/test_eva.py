"""EVA (explain.attributions.eva): region semantics, batching, the Explainer contract."""

import pytest
import torch
from deel import torchlip
from torch import nn

from explain import EVA
from explain.attributions.eva import adversarial_overlap_bound, eva_maps, grid_regions
from explain.bounds import build_graph
from explain.bounds.containers import Chain

H = W = 16
NUM_CLASSES = 3


def _images(n=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, H, W, generator=generator), torch.randint(0, NUM_CLASSES, (n,), generator=generator)


def masked_mlp(mask: torch.Tensor) -> nn.Sequential:
    """An MLP whose first layer only reads the pixels where ``mask`` [H, W] is True (all channels)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * H * W, 12), nn.ReLU(), nn.Linear(12, NUM_CLASSES))
    with torch.no_grad():
        net[1].weight *= mask.expand(3, H, W).reshape(1, -1)
    return net.eval()


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(4 * 8 * 8, NUM_CLASSES),
    )


@pytest.mark.parametrize("bound", ["crown", "alpha-crown", "ibp"])
def test_a_model_that_reads_one_region_gets_all_its_eva_mass_there(bound):
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[:8, :8] = True  # the top-left quarter = cells (0,0), (0,1), (1,0), (1,1) of the 4x4 grid
    images, targets = _images(3)
    maps = EVA(masked_mlp(mask), eps=0.05, grid_size=4, bound=bound)(images, targets)
    assert maps.shape == (3, H, W)
    assert maps[:, ~mask].abs().max() <= 1e-6  # fixing a region the model ignores changes nothing
    assert (maps[:, mask] > 0).all()  # fixing a region it reads lowers the overlap bound


def test_a_model_that_ignores_half_the_image_gets_zero_importance_there():
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[:, : W // 2] = True
    images, targets = _images(2)
    maps = EVA(masked_mlp(mask), eps=0.05, grid_size=8)(images, targets)
    assert maps[:, :, W // 2 :].abs().max() <= 1e-6
    assert maps[:, :, : W // 2].sum() > 0


def test_batch_equals_one_image_at_a_time_and_chunking_does_not_matter():
    torch.manual_seed(0)
    net = small_cnn().eval()
    images, targets = _images(3)
    batch = EVA(net, eps=0.03, grid_size=4, batch_size=7)(images, targets)
    alone = torch.cat([EVA(net, eps=0.03, grid_size=4, batch_size=1000)(images[i : i + 1], targets[i : i + 1])
                       for i in range(3)])
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bound", ["ibp", "crown", "alpha-crown"])
def test_per_box_map_is_full_ball_overlap_minus_region_overlap(bound):
    """Each pixel gets AO(x, B) - AO(x, B_u) of its cell u, as computed by adversarial_overlap_bound."""
    torch.manual_seed(0)
    net = small_cnn().eval()
    images, targets = _images(1)
    maps = EVA(net, eps=0.04, grid_size=2, bound=bound, relaxation="per_box")(images, targets)
    cells = grid_regions(H, W, 2)
    full = adversarial_overlap_bound(net, images, targets, 0.04, method=bound)
    for cell in range(4):
        fixed = (cells == cell)[None]
        expected = full - adversarial_overlap_bound(net, images, targets, 0.04, fixed=fixed, method=bound)
        torch.testing.assert_close(maps[0][cells == cell], expected.expand(int(fixed.sum())), rtol=1e-4, atol=1e-6)
    if bound == "ibp":
        assert (maps >= -1e-6).all()  # IBP is monotone under inclusion: fixing cells never raises the bound


def test_shared_relaxation_propagates_each_image_once_and_maps_are_nonnegative(monkeypatch):
    """One linear bound per image, maximised over nested boxes: one backward pass per image instead of one
    per (image, region) box, and fixing a region never raises the bound. Both relaxations find the cells
    the model reads."""
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[:, : W // 2] = True
    net = masked_mlp(mask)
    images, targets = _images(2)
    rows = []
    backward = Chain.backward

    def counting(self, A, bias, records):
        rows.append(A.shape[0])
        return backward(self, A, bias, records)

    monkeypatch.setattr(Chain, "backward", counting)
    maps = {}
    for relaxation, boxes in (("shared", 2), ("per_box", 2 * (1 + 16))):
        rows.clear()
        maps[relaxation] = EVA(net, eps=0.05, grid_size=4, relaxation=relaxation)(images, targets)
        assert sum(rows) == boxes, relaxation
        assert maps[relaxation][:, :, W // 2 :].abs().max() <= 1e-6, relaxation
        assert (maps[relaxation][:, :, : W // 2] > 0).all(), relaxation
    assert (maps["shared"] >= -1e-6).all()


def test_bound_graph_is_reused_until_the_weights_change():
    torch.manual_seed(0)
    net = small_cnn().eval()
    images, targets = _images(2)
    explainer = EVA(net, eps=0.03, grid_size=4)
    before = explainer(images, targets)
    graph = explainer._bound_graph()
    assert explainer._bound_graph() is graph
    with torch.no_grad():
        net[0].weight.mul_(1.5)  # an in-place update, as an optimizer step
    after = explainer(images, targets)
    assert explainer._bound_graph() is not graph
    torch.testing.assert_close(after, EVA(net, eps=0.03, grid_size=4)(images, targets))
    assert not torch.allclose(before, after)


def test_shared_relaxation_with_crown_classes():
    torch.manual_seed(0)
    net = small_cnn().eval()
    images, targets = _images(2)
    regions = grid_regions(H, W, 4).expand(2, H, W)
    graph = build_graph(net)
    every = eva_maps(graph, images, targets, regions, 0.03, crown_classes=NUM_CLASSES - 1)
    torch.testing.assert_close(every, eva_maps(graph, images, targets, regions, 0.03))
    partial = eva_maps(graph, images, targets, regions, 0.03, crown_classes=1)
    assert partial.shape == (2, H, W) and torch.isfinite(partial).all() and (partial >= -1e-6).all()


def test_label_map_regions_per_call_and_at_construction():
    torch.manual_seed(0)
    net = small_cnn().eval()
    images, targets = _images(2)
    grid = grid_regions(H, W, 4)
    default = EVA(net, eps=0.03, grid_size=4)(images, targets)
    # the same partition with other ids (superpixel-style labels) gives the same map
    relabelled = (grid * 7 + 100)[None].expand(2, H, W)
    torch.testing.assert_close(EVA(net, eps=0.03)(images, targets, regions=relabelled), default)
    torch.testing.assert_close(EVA(net, eps=0.03, regions=grid * 3)(images, targets), default)
    # a per-image label map: the map is constant on each region
    labels = torch.stack([grid_regions(H, W, 2), (torch.arange(H)[:, None] + torch.arange(W)[None] >= H).long()])
    maps = EVA(net, eps=0.03)(images, targets, regions=labels)
    for b in range(2):
        for region in labels[b].unique():
            values = maps[b][labels[b] == region]
            assert torch.allclose(values, values[0].expand_as(values))
    with pytest.raises(ValueError, match="do not match"):
        EVA(net)(images, targets, regions=torch.zeros(H, W + 1, dtype=torch.long))
    with pytest.raises(TypeError, match="integer label map"):
        EVA(net)(images, targets, regions=torch.zeros(H, W))


def test_grid_regions_partition():
    cells = grid_regions(10, 7, 3)
    assert cells.shape == (10, 7) and set(cells.unique().tolist()) == set(range(9))
    assert cells[0, 0] == 0 and cells[-1, -1] == 8


def test_lipschitz_bound_scores_equal_regions_alike():
    """The Lipschitz certificate depends on a box only through its number of free cells (documented)."""
    net = nn.Sequential(
        torchlip.SpectralConv2d(3, 4, 3, padding=1), torchlip.GroupSort2(),
        torchlip.ScaledAdaptativeL2NormPool2d((1, 1)), nn.Flatten(), torchlip.FrobeniusLinear(4, NUM_CLASSES),
    )
    net.lipschitz_body = True
    images, targets = _images(1)
    maps = EVA(net, eps=0.01, grid_size=4, bound="lipschitz")(images, targets)
    torch.testing.assert_close(maps, maps[0, 0, 0].expand_as(maps))
    best = EVA(net, eps=0.01, grid_size=4, bound="best")(images, targets)
    assert best.shape == maps.shape and torch.isfinite(best).all()
    with pytest.raises(ValueError, match="lipschitz_body"):
        EVA(small_cnn().eval(), bound="lipschitz")(images, targets)


def test_explainer_contract_inference_mode_modes_and_grads():
    torch.manual_seed(0)
    net = small_cnn().train()
    net[1].eval()  # a mixed state must come back as it was
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.5)
    net[6].bias.grad = None
    running_mean = net[1].running_mean.clone()
    images, targets = _images(2)
    explainer = EVA(net, eps=0.03, grid_size=4)
    with torch.inference_mode():
        maps = explainer(images, targets)
    assert not maps.is_inference() and maps.shape == (2, H, W) and torch.isfinite(maps).all()
    assert net.training and not net[1].training and net[3].training
    assert all((p.grad == 0.5).all() for name, p in net.named_parameters() if name != "6.bias")
    assert net[6].bias.grad is None
    torch.testing.assert_close(net[1].running_mean, running_mean)
    with torch.no_grad():
        torch.testing.assert_close(explainer(images, targets), maps)
    with torch.inference_mode():
        bound = adversarial_overlap_bound(net, images, targets, 0.03)
    assert bound.shape == (2,) and net.training


def test_eva_maps_function_matches_the_explainer():
    torch.manual_seed(0)
    net = small_cnn().eval()
    images, targets = _images(2)
    regions = grid_regions(H, W, 4).expand(2, H, W)
    direct = eva_maps(build_graph(net), images, targets, regions, eps=0.03, method="crown", batch_size=5)
    torch.testing.assert_close(direct, EVA(net, eps=0.03, grid_size=4)(images, targets))


def test_bad_arguments_are_named():
    net = small_cnn().eval()
    images, targets = _images(1)
    with pytest.raises(ValueError, match="eps"):
        EVA(net, eps=-1.0)
    with pytest.raises(ValueError, match="bound"):
        EVA(net, bound="exact")
    with pytest.raises(ValueError, match="grid_size"):
        EVA(net, grid_size=0)
    with pytest.raises(ValueError, match="relaxation"):
        EVA(net, relaxation="per_region")
    with pytest.raises(ValueError, match="fixed"):
        adversarial_overlap_bound(net, images, targets, 0.1, fixed=torch.zeros(H, W))
    with pytest.raises(ValueError, match="method"):
        adversarial_overlap_bound(net, images, targets, 0.1, method="alpha")
    with pytest.raises(ValueError, match="targets"):
        adversarial_overlap_bound(net, images, torch.tensor([NUM_CLASSES]), 0.1)


# ------------------------------------------------------------------------------- networks people explain
def tiny_resnet() -> nn.Module:
    """torchvision's ResNet class (one BasicBlock per stage), few channels: the ResNet-18/50 code path."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3, width_per_group=64)
    model.inplanes = 8  # narrower stages than ResNet-18 (rebuilt with fewer channels)
    model.conv1 = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(8)
    model.layer1 = model._make_layer(BasicBlock, 8, 1)
    model.layer2 = model._make_layer(BasicBlock, 8, 1, stride=2)
    model.layer3 = model._make_layer(BasicBlock, 8, 1, stride=2)
    model.layer4 = model._make_layer(BasicBlock, 8, 1, stride=2)
    model.fc = nn.Linear(8, 3)
    return _random_statistics(model)


def tiny_efficientnet() -> nn.Module:
    """timm's EfficientNet class with a Lite-style stem and one stage of depthwise-separable and inverted
    residual blocks (TF "same" padding, ReLU6, BatchNormAct2d, global pooling)."""
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    torch.manual_seed(0)
    blocks = decode_arch_def([["ds_r1_k3_s1_e1_c8"], ["ir_r2_k3_s2_e2_c8"]])
    model = EfficientNet(blocks, num_classes=3, stem_size=8, num_features=16, fix_stem=True,
                         round_chs_fn=lambda c: c, act_layer=nn.ReLU6, pad_type="same")
    return _random_statistics(model)


def _random_statistics(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _pgd_overlap(model, x, y, lower, upper, steps=20, starts=4):
    """The largest ``max_{c != y} f_c - f_y`` a sign-gradient attack finds in ``[lower, upper]`` (a true value)."""
    best = torch.full((len(x),), -float("inf"), dtype=x.dtype)
    for start in range(starts):
        z = (lower + (upper - lower) * torch.rand_like(x)) if start else x.clone()
        for step in range(steps):
            z.requires_grad_(True)
            logits = model(z)
            others = logits.scatter(1, y[:, None], -float("inf")).amax(1)
            value = others - logits.gather(1, y[:, None])[:, 0]
            best = torch.maximum(best, value.detach())
            (grad,) = torch.autograd.grad(value.sum(), z)
            z = torch.minimum(torch.maximum(z.detach() + (upper - lower) / 4 * 0.8**step * grad.sign(), lower), upper)
    return best


@pytest.mark.parametrize("make", [tiny_resnet, tiny_efficientnet])
def test_eva_on_real_architectures_is_sound(make):
    """Full CROWN through torchvision's ResNet and timm's EfficientNet classes: the overlap bounds of the full ball
    and of every region box (from the shared relaxation, as EVA computes them) are above a PGD attack."""
    model = make()
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([0, 2])
    eps = 0.02
    graph = build_graph(model)
    inverses = grid_regions(16, 16, 2).expand(2, 16, 16)
    from explain.bounds import shared_crown_margins

    full, regions = shared_crown_margins(graph, x, y, inverses, eps)
    assert (_pgd_overlap(model, x, y, x - eps, x + eps) <= full.amax(1) + 1e-4).all()
    for region in range(4):
        free = (inverses != region).unsqueeze(1).float()
        attack = _pgd_overlap(model, x, y, x - eps * free, x + eps * free)
        assert (attack <= regions[:, region].amax(1) + 1e-4).all(), f"region {region}"
    maps = EVA(model, eps=eps, grid_size=2)(x, y)
    assert maps.shape == (2, 16, 16) and torch.isfinite(maps).all()


@pytest.mark.parametrize("make", [tiny_resnet, tiny_efficientnet])
def test_eva_is_exact_where_no_neuron_is_unstable(make):
    """At a radius so small that no neuron is unstable the network is affine on the ball, so each margin's
    maximum over a box is ``m_c(x) + eps * sum_{free pixels} |grad m_c|`` and EVA's map is known in closed form
    (float64)."""
    model = make().double()
    x, y = torch.rand(1, 3, 16, 16, dtype=torch.float64), torch.tensor([1])
    eps = 1e-7
    regions = grid_regions(16, 16, 2)
    x_grad = x.clone().requires_grad_(True)
    logits = model(x_grad)[0]
    values, reaches = [], []
    for c in (0, 2):
        (grad,) = torch.autograd.grad(logits[c] - logits[1], x_grad, retain_graph=True)
        values.append((logits[c] - logits[1]).item())
        reaches.append(grad.abs().sum(1)[0])  # [H, W]
    full = max(v + eps * r.sum().item() for v, r in zip(values, reaches))
    expected = torch.zeros(16, 16, dtype=torch.float64)
    for region in range(4):
        inside = regions == region
        fixed = max(v + eps * (r.sum() - r[inside].sum()).item() for v, r in zip(values, reaches))
        expected[inside] = full - fixed
    assert expected.abs().amax() > 1e-3 * eps  # the regions differ
    maps = EVA(model, eps=eps, grid_size=2, lipschitz_boxes=False)(x, y)[0]
    torch.testing.assert_close(maps, expected, rtol=1e-6, atol=1e-12)
