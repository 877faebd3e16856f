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
