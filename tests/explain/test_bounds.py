"""Bound propagation (explain.bounds): soundness against an independent attack, exactness on points, errors.

The independent check is a projected-gradient attack (PGD, many random starts) that searches the same box for
the largest margin ``max_{c != y} f_c - f_y``: whatever it finds is a true value of the network, so no sound
upper bound may be below it.
"""

from collections import OrderedDict

import pytest
import torch
from deel import torchlip
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from explain.attributions.eva import adversarial_overlap_bound, grid_regions, shared_crown_margins
from explain.bounds import UnsupportedLayerError, build_graph, margin_spec, margin_upper_bounds
from explain.bounds.linear import Conv2d
from explain.bounds.lipschitz import conv_operator_norm, input_gains
from explain.bounds.crown import crown_backward
from explain.bounds.ibp import ibp_spec_upper
from explain.bounds.margin import intermediate_bounds
from explain.bounds.node import Records, concretize_upper
from explain.bounds.relaxations import l2_norm_relaxation, relu_relaxation

NUM_CLASSES = 4
SHAPE = (3, 8, 8)


# --------------------------------------------------------------------------------------------- the attack
def margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``f_c(x) - f_y(x)`` for every ``c != y``: [N, K-1] (class order, y skipped)."""
    logits = model(x)
    keep = torch.ones_like(logits, dtype=torch.bool).scatter_(1, y[:, None], False)
    return (logits - logits.gather(1, y[:, None]))[keep].view(len(x), -1)


def pgd(model, lower, upper, y, starts=12, steps=25):
    """Largest ``max_c f_c - f_y`` found in the boxes [lower, upper] by sign-gradient ascent, per class [N, K-1]."""
    n = len(lower)
    lo, hi = lower.repeat(starts, 1, 1, 1), upper.repeat(starts, 1, 1, 1)
    targets = y.repeat(starts)
    x = lo + (hi - lo) * torch.rand_like(lo)
    x[:n] = (lower + upper) / 2  # one start at the centre
    best = torch.full((starts * n, NUM_CLASSES - 1), -float("inf"))
    # each class separately (the per-class bounds are checked too), summed: the gradients do not interact
    for step in range(steps):
        x.requires_grad_(True)
        values = margins(model, x, targets)
        best = torch.maximum(best, values.detach())
        (grad,) = torch.autograd.grad(values.sum(), x)
        size = (hi - lo) / 2 * (0.5 * 0.9**step)
        x = torch.minimum(torch.maximum(x.detach() + size * grad.sign(), lo), hi)
    with torch.no_grad():
        best = torch.maximum(best, margins(model, x, targets))
    return best.view(starts, n, -1).amax(0)


# ----------------------------------------------------------------------------------------- the networks
class LipBlock(nn.Module):
    """The project's residual block contract: ``merge(x, branch(x))`` with a deel-torchlip LipResidual."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch
        self.merge = torchlip.LipResidual()
        nn.init.normal_(self.merge.alpha)

    def forward(self, x):
        return self.merge(x, self.branch(x))


def _randomize_batch_norm(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.3)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(module.weight, 1.0, 0.3)
            nn.init.normal_(module.bias, 0.0, 0.3)
    return model


def make_network(name: str) -> nn.Module:
    k = NUM_CLASSES
    if name == "linear_relu":
        net = nn.Sequential(nn.Flatten(), nn.Linear(192, 24), nn.ReLU(), nn.Dropout(0.5), nn.Linear(24, k))
    elif name == "conv_relu_avgpool":
        net = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(6, 6, 3, stride=2, padding=1, dilation=1), nn.ReLU(), nn.Identity(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, k),
        )
    elif name == "groupsort":
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), torchlip.GroupSort2(), nn.Conv2d(8, 4, 3, stride=2),
            torchlip.GroupSort2(), nn.Flatten(), nn.Linear(36, 8), torchlip.GroupSort2(), nn.Linear(8, k),
        )
    elif name == "maxmin":
        net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), torchlip.MaxMin(),
            nn.Conv2d(8, 4, 3, padding=1, padding_mode="circular"), torchlip.MaxMin(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 6), torchlip.MaxMin(), nn.Linear(12, k),
        )
    elif name == "padding_modes":  # a kernel tap may land twice on one pixel (reflect, replicate)
        net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), torchlip.GroupSort2(),
            nn.Conv2d(4, 4, 3, padding=2, dilation=2, padding_mode="replicate"), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, k),
        )
    elif name == "maxpool":
        net = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),  # overlapping (ResNet)
            nn.Conv2d(6, 6, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(24, k),
        )
    elif name == "l2_pool":
        net = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.LPPool2d(2, 2), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
            torchlip.ScaledL2NormPool2d(kernel_size=2, k_coef_lip=0.7), nn.Conv2d(6, 4, 1),
            torchlip.ScaledAdaptativeL2NormPool2d((1, 1)), nn.Flatten(), nn.Linear(4, k),
        )
    elif name == "downsampling":
        net = nn.Sequential(
            torchlip.InvertibleDownSampling(2), nn.Conv2d(12, 8, 3, padding=1), nn.ReLU(),
            nn.PixelUnshuffle(2), nn.Flatten(), nn.Unflatten(1, (32, 2, 2)), nn.Conv2d(32, 4, 2),
            nn.Flatten(), nn.Linear(4, k),
        )
    elif name == "batchnorm":
        net = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(96, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, k),
        )
    elif name == "lip_residual":
        net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), torchlip.GroupSort2(),
            LipBlock(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), torchlip.GroupSort2(), nn.Conv2d(4, 4, 1))),
            nn.AvgPool2d(4), nn.Flatten(), nn.Linear(16, k),
        )
    elif name == "basic_block":
        down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
        net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), BasicBlock(4, 4), BasicBlock(4, 8, stride=2, downsample=down),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, k),
        )
    elif name == "bottleneck":
        down = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8))
        net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Bottleneck(4, 2, downsample=down),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, k),
        )
    elif name == "relu6_depthwise_same":  # EfficientNet-Lite's operators
        from timm.layers import BatchNormAct2d, Conv2dSame, SelectAdaptivePool2d

        net = nn.Sequential(
            Conv2dSame(3, 6, 3, stride=2, bias=False), BatchNormAct2d(6, act_layer=nn.ReLU6),
            nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Hardtanh(-0.5, 0.7), nn.Conv2d(6, 4, 1),
            SelectAdaptivePool2d(pool_type="avg", flatten=True), nn.Linear(4, k),
        )
    elif name == "efficientnet_blocks":
        from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

        net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU6(), DepthwiseSeparableConv(4, 4, act_layer=nn.ReLU6),
            InvertedResidual(4, 4, exp_ratio=2.0, act_layer=nn.ReLU6),
            InvertedResidual(4, 6, stride=2, exp_ratio=2.0, act_layer=nn.ReLU6),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, k),
        )
    elif name == "torchlip":
        net = lip_network()
    else:
        raise KeyError(name)
    return _randomize_batch_norm(net).eval()


def lip_network() -> nn.Module:
    """A 1-Lipschitz deel-torchlip network (exported inside the bound code by ``vanilla_model``)."""
    net = nn.Sequential(
        torchlip.SpectralConv2d(3, 8, 3, padding=1), torchlip.GroupSort2(),
        torchlip.ScaledL2NormPool2d(kernel_size=2),
        LipBlock(torchlip.Sequential(torchlip.SpectralConv2d(8, 8, 3, padding=1), torchlip.GroupSort2())),
        torchlip.InvertibleDownSampling(2), torchlip.SpectralConv2d(32, 8, 1), torchlip.MaxMin(),
        torchlip.ScaledAdaptativeL2NormPool2d((1, 1)), nn.Flatten(), torchlip.FrobeniusLinear(16, NUM_CLASSES),
    )
    net.lipschitz_body = True
    return net.eval()


NETWORKS = ["linear_relu", "conv_relu_avgpool", "groupsort", "maxmin", "padding_modes", "maxpool", "l2_pool", "downsampling",
            "batchnorm", "lip_residual", "basic_block", "bottleneck", "relu6_depthwise_same", "efficientnet_blocks",
            "torchlip"]


def _data(n=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    return x, y


def _box(x, eps, fixed):
    radius = eps * (~fixed).unsqueeze(1).float()
    return x - radius, x + radius


# ----------------------------------------------------------------------------------------- soundness
@pytest.mark.parametrize("name", NETWORKS)
def test_bounds_are_sound_against_pgd_and_exact_on_points(name):
    torch.manual_seed(0)
    net = make_network(name)
    x, y = _data()
    fixed = torch.rand(len(x), *SHAPE[1:]) < 0.3  # some cells may not move
    eps = 0.1
    methods = ["ibp", "crown"] + (["lipschitz", "best"] if name == "torchlip" else [])
    graph = build_graph(net)
    lower, upper = _box(x, eps, fixed)
    attack = pgd(net, lower, upper, y)
    with torch.no_grad():
        clean = margins(net, x, y)
    for method in methods:
        for lipschitz_boxes in (True, False):
            bound = margin_upper_bounds(graph, lower, upper, y, method, lipschitz_boxes=lipschitz_boxes)
            assert bound.shape == attack.shape
            assert (attack <= bound + 1e-5).all(), f"{name}/{method}: PGD {attack} exceeds bound {bound}"
        # the whole image fixed: the box is the point x and every bound is the clean margin
        point = margin_upper_bounds(graph, x, x, y, method)
        torch.testing.assert_close(point, clean, rtol=1e-4, atol=1e-5, msg=f"{name}/{method}")


def test_crown_is_on_average_at_least_as_tight_as_ibp_and_lipschitz_boxes_never_loosen_ibp():
    x, y = _data(n=4, seed=3)
    gaps = {(method, boxes): [] for method in ("ibp", "crown") for boxes in (False, True)}
    for name in NETWORKS:
        torch.manual_seed(0)
        net = make_network(name)
        graph = build_graph(net)
        lower, upper = _box(x, 0.05, torch.zeros(len(x), *SHAPE[1:], dtype=torch.bool))
        attack = pgd(net, lower, upper, y, starts=4, steps=10)
        for method, boxes in gaps:
            bound = margin_upper_bounds(graph, lower, upper, y, method, lipschitz_boxes=boxes)
            gaps[method, boxes].append((bound - attack).mean())
    gaps = {key: torch.stack(values) for key, values in gaps.items()}
    for boxes in (False, True):
        assert gaps["crown", boxes].mean() <= gaps["ibp", boxes].mean()
    # here even on every network with plain IBP boxes (with Lipschitz boxes IBP gains more on l2_pool)
    assert (gaps["crown", False] <= gaps["ibp", False]).all()
    # intersecting with another enclosure can only shrink IBP's boxes, which is monotone
    assert (gaps["ibp", True] <= gaps["ibp", False] + 1e-5).all()


def test_lipschitz_boxes_tighten_a_deep_lipschitz_network_and_stay_sound():
    torch.manual_seed(0)
    stages = []
    for index in range(3):  # a VGG-like 1-Lipschitz network: 3 stages of 2 x (orthogonal conv + GroupSort2)
        stages += [torchlip.ScaledL2NormPool2d(kernel_size=2)] if index else []
        stages += [torchlip.SpectralConv2d(3 if index == 0 else 8, 8, 3, padding=1), torchlip.GroupSort2(),
                   torchlip.SpectralConv2d(8, 8, 3, padding=1), torchlip.GroupSort2()]
    head = [torchlip.ScaledAdaptativeL2NormPool2d((1, 1)), nn.Flatten(), torchlip.FrobeniusLinear(8, NUM_CLASSES)]
    net = torchlip.vanilla_model(nn.Sequential(*stages, *head).eval(), in_place=False)
    graph = build_graph(net)
    x, y = torch.rand(3, 3, 16, 16), torch.tensor([0, 1, 2])
    lower, upper = x - 0.002, x + 0.002
    attack = pgd(net, lower, upper, y, starts=4, steps=10)
    for method in ("ibp", "crown-ibp"):  # (full CROWN is within 1e-4 of PGD here with or without them)
        plain = margin_upper_bounds(graph, lower, upper, y, method, lipschitz_boxes=False)
        tight = margin_upper_bounds(graph, lower, upper, y, method)
        assert (attack <= tight + 1e-5).all()
        assert (tight - attack).mean() < 0.1 * (plain - attack).mean(), method  # measured: x0.03 (IBP), x0.014


def _node_inputs(root, x):
    inputs = {}
    root.interval(x, x, Records(inputs=inputs))
    return inputs


@pytest.mark.parametrize("name", NETWORKS)
def test_lipschitz_constants_bound_the_gradient_of_every_coordinate(name):
    """``L_j >= ||grad z_j||_2`` for every coordinate reaching a nonlinear node (and every pair difference
    before a GroupSort2), ``L >= ||Jacobian||_2`` for the whole vector, at random points."""
    torch.manual_seed(0)
    net = make_network(name)
    graph = build_graph(net)
    x, _ = _data(n=1)
    gains = input_gains(graph.root, x)
    assert gains, name
    for point in x:
        for key, gain in gains.items():
            value = lambda p: _node_inputs(graph.root, p[None])[key][0]  # noqa: E731
            jacobian = torch.autograd.functional.jacobian(value, point).flatten(-3)  # [*shape, 192]
            rows = jacobian.norm(dim=-1)
            one = lambda t: t[0] if t.ndim else t  # noqa: E731  (drop the batch dim of [1, C, 1, 1] constants)
            assert (rows <= one(gain.coord).expand_as(rows) * (1 + 1e-4) + 1e-6).all(), name
            flat = jacobian.reshape(-1, jacobian.shape[-1]).double()
            assert torch.linalg.matrix_norm(flat, 2) <= gain.whole * (1 + 1e-4) + 1e-6, name
            if gain.pair is not None:
                pairs = (jacobian[0::2] - jacobian[1::2]).norm(dim=-1)
                assert (pairs <= one(gain.pair).expand_as(pairs) * (1 + 1e-4) + 1e-6).all(), name


@pytest.mark.parametrize(
    "options",
    [dict(padding=1), dict(padding=0), dict(stride=2, padding=1), dict(dilation=2, padding=2),
     dict(groups=2, padding=1), dict(padding="same"), dict(padding=1, padding_mode="circular"),
     dict(padding=1, padding_mode="reflect"), dict(padding=1, padding_mode="replicate")],
)
def test_conv_operator_norm_bounds_the_exact_spectral_norm(options):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, **options)
    node = Conv2d(conv, conv.weight.detach(), None, "conv")
    for size in [(8, 8), (5, 7)]:
        with torch.no_grad():
            flat = lambda v: conv(v.view(1, 4, *size)).flatten()  # noqa: E731
            jacobian = torch.autograd.functional.jacobian(flat, torch.zeros(4 * size[0] * size[1]))
        exact = torch.linalg.matrix_norm(jacobian.double(), 2).item()
        bound = conv_operator_norm(node, size)
        assert exact <= bound
        if options.get("padding_mode", "zeros") == "zeros":
            assert bound <= 1.5 * exact  # the circulant embedding (measured: within 5 to 42 %)
        elif options["padding_mode"] == "circular":
            assert bound == pytest.approx(exact, rel=1e-5)  # exactly the circulant


@pytest.mark.parametrize("name", ["groupsort", "maxpool", "basic_block", "torchlip"])
def test_shared_relaxation_bounds_every_region_box_soundly(name):
    """EVA's shared relaxation: CROWN's linear bound on the full ball, maximised over each region box."""
    torch.manual_seed(0)
    net = make_network(name)
    graph = build_graph(net)
    x, y = _data(n=2)
    eps = 0.1
    inverses = grid_regions(*SHAPE[1:], 2).expand(2, *SHAPE[1:])
    full, regions = shared_crown_margins(graph, x, y, inverses, eps)
    torch.testing.assert_close(full, margin_upper_bounds(graph, x - eps, x + eps, y, "crown"), rtol=1e-4, atol=1e-5)
    records = intermediate_bounds(graph, x - eps, x + eps)[1]
    A, bias = crown_backward(graph.root, margin_spec(y, NUM_CLASSES), records)  # valid on every sub-box
    for region in range(4):
        lower, upper = _box(x, eps, inverses == region)
        torch.testing.assert_close(regions[:, region], concretize_upper(A, bias, lower, upper), rtol=1e-4, atol=1e-5)
        assert (pgd(net, lower, upper, y, starts=4, steps=10) <= regions[:, region] + 1e-5).all()
        assert (regions[:, region] <= full + 1e-5).all()


def test_lipschitz_bound_formula_and_best_is_the_smallest():
    """Lipschitz bound = clean margin + ||w_c - w_y|| * eps * sqrt(#free cells * channels)."""
    net = make_network("torchlip")
    x, y = _data(n=2)
    fixed = torch.zeros(2, *SHAPE[1:], dtype=torch.bool)
    fixed[0, :4] = True  # half of image 0 does not move
    lower, upper = _box(x, 0.02, fixed)
    graph = build_graph(net)
    bound = margin_upper_bounds(graph, lower, upper, y, "lipschitz")
    weight = graph.head.weight
    with torch.no_grad():
        clean = margins(net, x, y)
    free = torch.tensor([3 * 32, 3 * 64], dtype=torch.float)
    gaps = (margin_spec(y, NUM_CLASSES) @ weight).norm(dim=-1)
    torch.testing.assert_close(bound, clean + gaps * 0.02 * free.sqrt()[:, None], rtol=1e-4, atol=1e-5)
    best = margin_upper_bounds(graph, lower, upper, y, "best")
    for method in ("ibp", "crown", "lipschitz"):
        assert (best <= margin_upper_bounds(graph, lower, upper, y, method) + 1e-6).all()


@pytest.mark.parametrize("method", ["crown-ibp", "crown"])
def test_crown_on_the_top_classes_only_keeps_ibp_for_the_others(method):
    net = make_network("batchnorm")
    x, y = _data(n=3)
    lower, upper = _box(x, 0.05, torch.zeros(3, *SHAPE[1:], dtype=torch.bool))
    graph = build_graph(net)
    ibp = margin_upper_bounds(graph, lower, upper, y, "ibp")
    if method == "crown":  # the others keep IBP on the same (full-CROWN) intermediate boxes: tighter than IBP
        records = intermediate_bounds(graph, lower, upper)[1]
        tightened = ibp_spec_upper(graph.root, margin_spec(y, NUM_CLASSES), records)
        assert (tightened <= ibp + 1e-6).all() and (tightened < ibp - 1e-3).any()
        ibp = tightened
    crown = margin_upper_bounds(graph, lower, upper, y, method)
    partial = margin_upper_bounds(graph, lower, upper, y, method, crown_classes=1)
    chosen = ibp.argmax(1, keepdim=True)
    torch.testing.assert_close(partial.gather(1, chosen), crown.gather(1, chosen))
    others = torch.ones_like(ibp, dtype=torch.bool).scatter_(1, chosen, False)
    torch.testing.assert_close(partial[others], ibp[others])
    torch.testing.assert_close(margin_upper_bounds(graph, lower, upper, y, method, crown_classes=3), crown)
    assert (pgd(net, lower, upper, y) <= partial + 1e-5).all()


def test_input_range_intersection_is_sound():
    net = make_network("conv_relu_avgpool")
    x, y = _data()
    x[:, :, :2] = 1.0  # saturated rows: the clipped box is one-sided there
    eps = 0.2
    bound = adversarial_overlap_bound(net, x, y, eps, method="crown", input_range=(0.0, 1.0))
    unclipped = adversarial_overlap_bound(net, x, y, eps, method="crown")
    attack = pgd(net, (x - eps).clamp(min=0), (x + eps).clamp(max=1), y).amax(1)
    assert (attack <= bound + 1e-5).all()
    assert (bound <= unclipped + 1e-5).all()
    with pytest.raises(ValueError, match="outside input_range"):
        adversarial_overlap_bound(net, x + 1, y, eps, input_range=(0.0, 1.0))


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_margin_bounds_can_be_called_from_inference_mode(method):
    """Also alpha-CROWN, whose slopes need gradients (through the autograd transpose of average pooling too)."""
    net = make_network("conv_relu_avgpool")  # average pooling is transposed through autograd
    x, y = _data()
    graph = build_graph(net)
    expected = margin_upper_bounds(graph, x - 0.1, x + 0.1, y, method)
    with torch.inference_mode():
        torch.testing.assert_close(margin_upper_bounds(build_graph(net), x - 0.1, x + 0.1, y, method), expected)


def test_adversarial_overlap_bound_fixed_everything_is_the_clean_margin():
    net = make_network("basic_block")
    x, y = _data()
    with torch.no_grad():
        clean = margins(net, x, y).amax(1)
    for method in ("ibp", "crown"):
        bound = adversarial_overlap_bound(net, x, y, 0.3, fixed=torch.ones(*SHAPE[1:], dtype=torch.bool), method=method)
        torch.testing.assert_close(bound, clean, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------- relaxations
def test_relu_relaxation_sandwiches_relu():
    lower = torch.randn(500)
    upper = lower + torch.rand(500) * 2
    x = lower + (upper - lower) * torch.rand(50, 500)
    lower_slope, upper_slope, upper_offset = relu_relaxation(lower, upper)
    assert (lower_slope * x <= x.relu() + 1e-6).all()
    assert (x.relu() <= upper_slope * x + upper_offset + 1e-6).all()


def test_l2_norm_relaxation_sandwiches_the_window_norm():
    lower = torch.randn(4, 2, 6, 5)
    upper = lower + torch.rand(4, 2, 6, 5)
    upper[0, 0] = lower[0, 0] = 0.0  # a degenerate plane
    for kernel in [(2, 2), None]:
        lower_slope, upper_slope, upper_offset = l2_norm_relaxation(lower, upper, kernel)
        for _ in range(20):
            x = lower + (upper - lower) * torch.rand_like(lower)
            if kernel is None:
                norm = x.square().sum((-2, -1), keepdim=True).sqrt()
                low = (lower_slope * x).sum((-2, -1), keepdim=True)
                up = (upper_slope * x).sum((-2, -1), keepdim=True) + upper_offset
            else:
                window = lambda t: nn.functional.avg_pool2d(t, kernel) * 4  # noqa: E731
                norm = window(x.square()).sqrt()
                low, up = window(lower_slope * x), window(upper_slope * x) + upper_offset
            assert (low <= norm + 1e-5).all() and (norm <= up + 1e-5).all()


# ----------------------------------------------------------------------------------------- errors and graph
def test_unsupported_layer_names_type_and_path():
    net = nn.Sequential(OrderedDict(features=nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh()), head=nn.Linear(4, 2)))
    with pytest.raises(UnsupportedLayerError, match=r"Tanh.*'features\.1'"):
        build_graph(net)

    class Custom(nn.Module):
        def forward(self, x):
            return x * 2

    with pytest.raises(UnsupportedLayerError, match=r"Custom.*'2'"):
        build_graph(nn.Sequential(nn.Flatten(), nn.Linear(4, 4), Custom()))
    with pytest.raises(UnsupportedLayerError, match="norm_type=2"):
        build_graph(nn.Sequential(nn.LPPool2d(3, 2)))


def test_layers_that_compute_something_else_are_refused():
    class SafeL2(torchlip.ScaledL2NormPool2d):  # same values, different code (e.g. a NaN-safe sqrt)
        def forward(self, x):
            return nn.functional.avg_pool2d(x.square(), self.kernel_size).mul(4).clamp(min=0).sqrt()

        def vanilla_export(self):
            return self

    class NotL2(SafeL2):  # kept by the export, caught by the probe at build time
        def forward(self, x):
            return nn.functional.avg_pool2d(x.abs(), self.kernel_size)

    class ExportedAway(torchlip.ScaledL2NormPool2d):  # the export replaces it by LPPool2d: caught at call time
        def forward(self, x):
            return nn.functional.avg_pool2d(x.abs(), self.kernel_size)

    x, y = _data(n=2)
    head = [nn.Flatten(), nn.Linear(48, NUM_CLASSES)]
    adversarial_overlap_bound(nn.Sequential(SafeL2(kernel_size=2), *head), x, y, 0.1)
    with pytest.raises(UnsupportedLayerError, match="NotL2"):
        build_graph(nn.Sequential(NotL2(kernel_size=2), *head))
    with pytest.raises(UnsupportedLayerError, match="does not reproduce the model's outputs"):
        adversarial_overlap_bound(nn.Sequential(ExportedAway(kernel_size=2), *head), x, y, 0.1)


def test_torchlip_export_leaves_the_callers_model_untouched():
    net = lip_network().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = _data(n=2)
    adversarial_overlap_bound(net, x, y, 0.01, method="best")
    assert net.training and all(m.training for m in net.modules())
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, before[key])


# ----------------------------------------------------------------------------------------- full CROWN
@pytest.mark.parametrize("name", NETWORKS)
def test_full_crown_is_sound_at_several_radii_and_on_region_boxes(name):
    """Full CROWN, CROWN-IBP and IBP against PGD at three radii, on the full box and on boxes that fix half of the
    image (EVA's region boxes), with the shared relaxation's region bounds checked too."""
    torch.manual_seed(0)
    net = make_network(name)
    graph = build_graph(net)
    x, y = _data(n=2, seed=4)
    inverses = grid_regions(*SHAPE[1:], 2).expand(2, *SHAPE[1:])
    for eps in (0.01, 0.1):
        full, shared = shared_crown_margins(graph, x, y, inverses, eps)
        for region in (None, 1):
            fixed = torch.zeros(2, *SHAPE[1:], dtype=torch.bool) if region is None else inverses == region
            lower, upper = _box(x, eps, fixed)
            attack = pgd(net, lower, upper, y, starts=4, steps=10)
            for method in ("crown", "crown-ibp", "ibp"):
                bound = margin_upper_bounds(graph, lower, upper, y, method)
                assert (attack <= bound + 1e-5).all(), f"{name}/{method}/eps={eps}/region={region}"
            tight = margin_upper_bounds(graph, lower, upper, y, "crown", tight_boxes=True)
            assert (attack <= tight + 1e-5).all(), f"{name}/tight/eps={eps}/region={region}"
            if region is not None:
                assert (attack <= shared[:, region] + 1e-5).all(), f"{name}/shared/eps={eps}/region={region}"


def test_full_crown_is_tighter_than_crown_ibp_on_every_network():
    """With tight boxes on every network; with auto_LiRPA's (the default) on every one but max pooling right after a
    convolution, whose input box is CROWN's even where the interval box is narrower (auto_LiRPA's rule): there full
    CROWN is looser at eps 0.1."""
    x, y = _data(n=3, seed=5)
    for name in NETWORKS:
        torch.manual_seed(0)
        graph = build_graph(make_network(name))
        for eps in (0.01, 0.1):
            lower, upper = x - eps, x + eps
            full = margin_upper_bounds(graph, lower, upper, y, "crown")
            tight = margin_upper_bounds(graph, lower, upper, y, "crown", tight_boxes=True)
            cheap = margin_upper_bounds(graph, lower, upper, y, "crown-ibp")
            assert (tight <= cheap + 1e-5).all(), f"{name} eps={eps}: {tight} vs {cheap}"
            if name == "maxpool" and eps == 0.1:
                assert (full > cheap + 1e-2).any() and (tight < full - 1e-3).any()
            else:
                assert (full <= cheap + 1e-5).all(), f"{name} eps={eps}: {full} vs {cheap}"


def _stable_after_full_crown_network(x: torch.Tensor, eps: float) -> nn.Sequential:
    """Linear-ReLU-Linear-ReLU-Linear whose first ReLU is active on the whole box and whose second ReLU is active
    too, but only by a margin that the interval box cannot see (its box crosses 0): the network is affine on the
    box, so a bound that finds every neuron stable is exact."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    with torch.no_grad():
        flat = x.flatten(1)
        first = flat @ net[1].weight.T
        reach = eps * net[1].weight.abs().sum(1)
        net[1].bias.copy_(-(first - reach).amin(0) + 0.1)  # every first-layer neuron active on every box
        product = net[3].weight @ net[1].weight  # the second layer is affine in x: exact range via |W2 W1|
        second = (flat @ product.T + net[1].bias @ net[3].weight.T)
        exact_low = second - eps * product.abs().sum(1)
        net[3].bias.copy_(-exact_low.amin(0) + 1e-3)  # active by 1e-3 on the exact range
    return net.eval()


def test_full_crown_is_exact_when_no_neuron_is_unstable():
    x, y = _data(n=3, seed=6)
    eps = 0.05
    net = _stable_after_full_crown_network(x, eps)
    graph = build_graph(net)
    # the network is W x + b on the box: its margins' maxima in closed form
    W = net[5].weight @ net[3].weight @ net[1].weight
    b = net[5].weight @ (net[3].weight @ net[1].bias + net[3].bias) + net[5].bias
    spec = margin_spec(y, NUM_CLASSES)
    rows = spec @ W  # [n, K-1, 192]
    exact = (rows @ x.flatten(1).unsqueeze(-1)).squeeze(-1) + spec @ b + eps * rows.abs().sum(-1)
    with torch.no_grad():
        torch.testing.assert_close(margins(net, x + eps * rows.sign().view(3, 3, *SHAPE)[:, 0], y)[:, 0], exact[:, 0],
                                   rtol=1e-4, atol=1e-4)  # the maximiser of class 0's margin attains it
    full = margin_upper_bounds(graph, x - eps, x + eps, y, "crown", lipschitz_boxes=False)
    torch.testing.assert_close(full, exact, rtol=1e-4, atol=1e-4)
    # the interval boxes see the second layer as unstable, so CROWN-IBP cannot be exact
    cheap = margin_upper_bounds(graph, x - eps, x + eps, y, "crown-ibp", lipschitz_boxes=False)
    assert (cheap > exact + 1e-2).any()


# ----------------------------------------------------------------------------------------- every relaxation
def _nonlinear_nodes():
    from explain.bounds.activations import Clamp, MaxMin, PairSort, ReLU
    from explain.bounds.pooling import L2NormPool, MaxPool

    return {
        "relu": (ReLU("relu"), (2, 4, 5, 5)),
        "pairsort": (PairSort("pairsort", scale=0.8), (2, 4, 5, 5)),
        "pairsort_flat": (PairSort("pairsort"), (2, 6)),
        "maxmin": (MaxMin("maxmin", scale=1.3), (2, 3, 5, 5)),
        "maxpool_overlapping": (MaxPool("maxpool", (3, 3), (2, 2), (1, 1), (1, 1)), (2, 3, 7, 7)),
        "maxpool_dilated": (MaxPool("maxpool", (2, 2), (1, 1), (0, 0), (2, 2)), (2, 3, 6, 6)),
        "l2_pool": (L2NormPool("l2", (2, 2), scale=0.9), (2, 3, 6, 6)),
        "l2_pool_global": (L2NormPool("l2", None), (2, 3, 4, 4)),
        "hardtanh": (Clamp("hardtanh", -0.5, 0.7), (2, 3, 5, 5)),  # boxes across one, both or no kink
        "relu6_flat": (Clamp("relu6", 0.0, 6.0), (2, 12)),
    }


@pytest.mark.parametrize("name", list(_nonlinear_nodes()))
def test_every_relaxation_sandwiches_its_function_on_its_box(name):
    """The backward step of each nonlinear node, ``<A, op(z)> + b <= <A', z> + b'`` on the recorded box, for
    coefficients of both signs (positive ones read the upper line, negative ones the lower line), at random
    points and at the box's vertices. Boxes are narrow, wide, and straddle or avoid the kinks."""
    node, shape = _nonlinear_nodes()[name]
    generator = torch.Generator().manual_seed(0)
    centre = torch.randn(shape, generator=generator)
    width = torch.rand(shape, generator=generator) * torch.tensor([0.05, 2.0]).repeat(shape[0] // 2).view(-1, *[1] * (len(shape) - 1))
    lower, upper = centre - width, centre + width
    records = Records()
    node.interval(lower, upper, records)
    out_shape = node.interval(lower, lower, Records())[0].shape
    A = torch.randn(shape[0], 5, *out_shape[1:], generator=generator)
    A_in, bias = node.backward(A, torch.zeros(shape[0], 5), records)
    points = [lower, upper] + [lower + (upper - lower) * torch.rand(shape, generator=generator) for _ in range(30)]
    points += [torch.where(torch.rand(shape, generator=generator) < 0.5, lower, upper) for _ in range(30)]
    for z in points:
        out = node.interval(z, z, Records())[0]
        value = (A * out.unsqueeze(1)).flatten(2).sum(-1)
        relaxed = (A_in * z.unsqueeze(1)).flatten(2).sum(-1) + bias
        assert (value <= relaxed + 1e-5).all(), f"{name}: {(value - relaxed).max()}"


def test_relu_relaxation_is_the_crown_one():
    """auto_LiRPA's CROWN choice: upper line through (l, 0) and (u, u); lower slope 1 if u >= -l else 0; exact
    on stable neurons."""
    lower = torch.tensor([-2.0, -1.0, 0.5, -3.0, -1.0])
    upper = torch.tensor([1.0, 3.0, 2.0, -0.5, 1.0])
    lower_slope, upper_slope, upper_offset = relu_relaxation(lower, upper)
    torch.testing.assert_close(lower_slope, torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(upper_slope, torch.tensor([1 / 3, 3 / 4, 1.0, 0.0, 0.5]))
    torch.testing.assert_close(upper_offset, torch.tensor([2 / 3, 3 / 4, 0.0, 0.0, 0.5]))


def test_every_method_is_exact_on_a_monotone_network():
    """Nonnegative weights everywhere and a head whose class 0 is constant: each margin ``f_c - f_0`` increases
    in every input, so its maximum over the box is at the upper corner, where every upper relaxation (the ReLU
    chord, the max-pooling ceiling) touches its function. A sound bound equals that value; an upper line lowered
    anywhere (e.g. the ReLU offset scaled by 0.7) falls below it."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(4, 4, 1), nn.ReLU(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, NUM_CLASSES),
    ).eval()
    with torch.no_grad():
        for layer in (net[0], net[3], net[7]):
            layer.weight.abs_()
        net[0].bias.uniform_(-1.5, 0.0)  # unstable first-layer neurons
        net[3].bias.uniform_(-1.0, 0.0)
        net[7].weight[0] = 0.0
        net[7].bias[0] = 0.0
    graph = build_graph(net)
    x, _ = _data(n=3, seed=7)
    y = torch.zeros(3, dtype=torch.long)
    for eps in (0.02, 0.2):
        with torch.no_grad():
            corner = margins(net, x + eps, y)
        for method in ("crown", "crown-ibp", "ibp"):
            bound = margin_upper_bounds(graph, x - eps, x + eps, y, method)
            torch.testing.assert_close(bound, corner, rtol=1e-4, atol=1e-4, msg=f"{method} eps={eps}")


# ----------------------------------------------------------------------------------------- alpha-CROWN
@pytest.mark.parametrize("name", NETWORKS)
def test_alpha_crown_is_sound_and_never_looser_than_full_crown(name):
    """alpha-CROWN against PGD on a small full box and on a wide box fixing half the image, and at most
    full CROWN's bound everywhere (it starts from CROWN's slopes and keeps the best)."""
    torch.manual_seed(0)
    net = make_network(name)
    graph = build_graph(net)
    x, y = _data(n=2, seed=8)
    inverses = grid_regions(*SHAPE[1:], 2).expand(2, *SHAPE[1:])
    for eps, fixed in ((0.02, torch.zeros(2, *SHAPE[1:], dtype=torch.bool)), (0.1, inverses == 1)):
        lower, upper = _box(x, eps, fixed)
        attack = pgd(net, lower, upper, y, starts=4, steps=10)
        alpha = margin_upper_bounds(graph, lower, upper, y, "alpha-crown", alpha_iterations=8)
        full = margin_upper_bounds(graph, lower, upper, y, "crown")
        assert (attack <= alpha + 1e-5).all(), f"{name} eps={eps}: {(attack - alpha).max()}"
        assert (alpha <= full + 1e-6).all(), f"{name} eps={eps}: {(alpha - full).max()}"


def test_alpha_crown_tightens_full_crown_where_neurons_are_unstable():
    """On ReLU, GroupSort2 and MaxMin networks with unstable neurons the optimised slopes lower some bound, and
    more steps never loosen it; with no step (or no unstable neuron) it is full CROWN's bound."""
    x, y = _data(n=3, seed=9)
    for name in ("conv_relu_avgpool", "groupsort", "maxmin", "basic_block"):
        torch.manual_seed(0)
        graph = build_graph(make_network(name))
        lower, upper = x - 0.1, x + 0.1
        full = margin_upper_bounds(graph, lower, upper, y, "crown")
        none = margin_upper_bounds(graph, lower, upper, y, "alpha-crown", alpha_iterations=0)
        few = margin_upper_bounds(graph, lower, upper, y, "alpha-crown", alpha_iterations=5)
        many = margin_upper_bounds(graph, lower, upper, y, "alpha-crown", alpha_iterations=10)
        torch.testing.assert_close(none, full)
        assert (few < full - 1e-3).any(), f"{name}: {full - few}"
        assert (many <= few + 1e-6).all()
    net = _stable_after_full_crown_network(x, 0.05)
    graph = build_graph(net)
    full = margin_upper_bounds(graph, x - 0.05, x + 0.05, y, "crown")
    torch.testing.assert_close(margin_upper_bounds(graph, x - 0.05, x + 0.05, y, "alpha-crown"), full)
    for bad in (-1, True, 2.5):
        with pytest.raises(ValueError, match="alpha_iterations"):
            margin_upper_bounds(graph, x - 0.05, x + 0.05, y, "alpha-crown", alpha_iterations=bad)


def test_any_lower_slope_in_zero_one_keeps_the_relu_relaxation_sound():
    """The relaxation alpha-CROWN optimises: for every row's own slopes in [0, 1] on the unstable neurons,
    ``<A, relu(z)> <= <A', z> + c`` on the box; and :meth:`LowerSlopes.project` brings slopes back there."""
    from explain.bounds.activations import relaxed_backward
    from explain.bounds.alpha import LowerSlopes

    generator = torch.Generator().manual_seed(0)
    lower = torch.randn(2, 3, 4, 4, generator=generator) - 0.5
    upper = lower + 2 * torch.rand(2, 3, 4, 4, generator=generator)
    A = torch.randn(2, 5, 3, 4, 4, generator=generator)
    slopes = LowerSlopes()
    default = relu_relaxation(lower, upper)[0]
    variable = slopes.get("relu", default, 5)
    with torch.no_grad():
        variable.copy_(torch.rand(variable.shape, generator=generator) * 3 - 1)  # outside [0, 1] too
    slopes.project()
    assert variable.min() >= 0 and variable.max() <= 1
    A_in, offset = relaxed_backward(A, lower, upper, slopes, "relu")
    for _ in range(50):
        z = lower + (upper - lower) * torch.rand(lower.shape, generator=generator)
        value = (A * z.clamp(min=0).unsqueeze(1)).flatten(2).sum(-1)
        relaxed = (A_in * z.unsqueeze(1)).flatten(2).sum(-1) + offset
        assert (value <= relaxed + 1e-5).all()


def test_a_lipschitz_constant_beyond_float32_caps_nothing():
    """Deep real networks (EfficientNet-Lite0 at 224 px) multiply layer norms past float32's range."""
    from explain.bounds.node import Gain

    gain = Gain(1e40, torch.tensor([1.0, 3e38])).capped()
    assert gain.whole == 1e40 and torch.equal(gain.coord, torch.tensor([1.0, 3e38]))
    assert torch.equal(Gain(2.0, torch.tensor([1.0, 3.0])).capped().coord, torch.tensor([1.0, 2.0]))
