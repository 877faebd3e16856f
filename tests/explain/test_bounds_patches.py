"""Full CROWN with rows stored as patches (explain/bounds/patches.py) against the same with dense rows: every
intermediate box and the final bounds agree to float round-off, on networks of every operator that keeps
patches (strided, dilated, grouped, padded and TF "same"-padded convolutions, BatchNorm, ReLU, ReLU6/hardtanh,
max pooling, residual sums)
and of operators that turn them dense (average pooling, flatten)."""

import pytest
import torch
from torch import nn
from timm.layers import BatchNormAct2d, Conv2dSame, SelectAdaptivePool2d
from timm.models._efficientnet_blocks import InvertedResidual
from torchvision.models.resnet import BasicBlock

from explain.bounds import build_graph, margin_spec
from explain.bounds.crown import crown_spec_upper
from explain.bounds.ibp import interval_bounds
from explain.bounds.linear import Conv2d
from explain.bounds.node import Records, concretize_upper
from explain.bounds.patches import Patches


def _randomize_batch_norm(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


NETWORKS = {
    "conv-pool": lambda: nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 3 * 3, 10), nn.ReLU(), nn.Linear(10, 3)),
    "strided-dilated-grouped": lambda: nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=2), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3),
        nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, (3, 2), stride=(1, 2), padding=(1, 0)), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.LazyLinear(3)),
    "residual": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        BasicBlock(4, 4), BasicBlock(4, 8, stride=2, downsample=nn.Sequential(nn.Conv2d(4, 8, 1, stride=2),
                                                                              nn.BatchNorm2d(8))),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)),
    "efficientnet": lambda: nn.Sequential(
        Conv2dSame(3, 4, 3, stride=2), BatchNormAct2d(4, act_layer=nn.ReLU6), nn.Hardtanh(-0.3, 0.4),
        InvertedResidual(4, 4, exp_ratio=2.0, act_layer=nn.ReLU6), Conv2dSame(4, 6, 3, stride=2, groups=2),
        nn.ReLU(), SelectAdaptivePool2d(pool_type="avg", flatten=True), nn.Linear(6, 3)),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_patches_give_the_dense_rows_bounds(name):
    torch.manual_seed(0)
    model = NETWORKS[name]()
    images = torch.rand(2, 3, 12, 12)
    model(images)  # materialise lazy layers
    model = _randomize_batch_norm(model)
    graph = build_graph(model)
    spec = margin_spec(torch.tensor([0, 2]), 3)
    eps = 0.05
    results = {}
    for patches in (True, False):
        _, _, records = interval_bounds(graph.root, images - eps, images + eps, full_crown=True, patches=patches)
        boxes = [value for value in records.values() if isinstance(value, tuple)]
        results[patches] = boxes, crown_spec_upper(graph.root, spec, records, images - eps, images + eps)
    (patch_boxes, patch_bound), (dense_boxes, dense_bound) = results[True], results[False]
    assert len(patch_boxes) == len(dense_boxes)
    for patch_box, dense_box in zip(patch_boxes, dense_boxes):
        for a, b in zip(patch_box, dense_box):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patch_bound, dense_bound, rtol=1e-5, atol=1e-5)
    # the network has unstable neurons past its first layer, so full CROWN did tighten something
    _, _, ibp_records = interval_bounds(graph.root, images - eps, images + eps, full_crown=False)
    widths = [(b[1] - b[0]).sum() for b in dense_boxes]
    ibp_widths = [(b[1] - b[0]).sum() for b in ibp_records.values() if isinstance(b, tuple)]
    assert any(w < v - 1e-3 for w, v in zip(widths, ibp_widths))


@pytest.mark.parametrize("stride, padding, dilation, groups", [(1, 1, 1, 1), (2, 0, 1, 2), (2, 3, 2, 1)])
def test_convolution_on_patches_is_the_dense_transpose(stride, padding, dilation, groups):
    """One backward step through a convolution: the patches' dense form equals the dense step, for rows whose
    windows stick out of the layer."""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation, groups=groups)
    node = Conv2d(conv, conv.weight.detach(), conv.bias.detach(), "conv")
    x = torch.rand(2, 4, 9, 9)
    records = Records()
    out = node.interval(x, x, records)[0]
    shape = tuple(out.shape[1:])
    index = torch.randint(0, out[0].numel(), (2, 5))
    signs = torch.randn(2, 5)
    rows = Patches.unit_rows(index, signs, shape, x.dtype)
    # rows one layer further (a 3x3 window at stride 1, padding 1: sticking out at the borders)
    rows = rows.moved(torch.randn(2, 5, 6, 3, 3), (1, 1), (1, 1), rows.size)
    bias = torch.zeros(2, 5)
    patch_A, patch_bias = node.backward_patches(rows, bias, records)
    dense_A, dense_bias = node.backward(rows.to_dense(), bias, records)
    dense_patch = patch_A.to_dense() if isinstance(patch_A, Patches) else patch_A
    torch.testing.assert_close(dense_patch, dense_A, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patch_bias, dense_bias, rtol=1e-5, atol=1e-5)
    lower, upper = x - 0.1, x + 0.1
    torch.testing.assert_close(concretize_upper(patch_A, patch_bias, lower, upper),
                               concretize_upper(dense_A, dense_bias, lower, upper), rtol=1e-5, atol=1e-5)


def test_residual_sum_of_patches_is_the_dense_sum():
    """Two paths from the same unit rows (stride 2): a 3x3 convolution with padding 1 and a 1x1 one."""
    torch.manual_seed(2)
    rows = Patches.unit_rows(torch.randint(0, 4 * 4 * 4, (2, 3)), torch.ones(2, 3), (4, 4, 4), torch.float32)
    a = rows.moved(torch.randn(2, 3, 5, 3, 3), (2, 2), (1, 1), (8, 8))
    b = rows.moved(torch.randn(2, 3, 5, 1, 1), (2, 2), (0, 0), (8, 8))
    for first, second in ((a, b), (b, a)):
        total = first + second
        assert isinstance(total, Patches)
        torch.testing.assert_close(total.to_dense(), first.to_dense() + second.to_dense())
        values = torch.randn(2, 7, 8, 8)
        torch.testing.assert_close(total.window(values)[..., 1:2, 1:2], second.window(values) if second is b
                                   else first.window(values))


@pytest.mark.parametrize("name", ["conv-pool", "residual"])
def test_rows_grouped_by_cell_give_the_bounds_of_single_rows(name, monkeypatch):
    """Once every channel of a cell gets a row (auto_LiRPA's dense rule, at a large radius), the rows of a cell
    form a group that reads the relaxation maps once (``Patches.group``); the same rows one by one (group 1)
    give the same intermediate boxes and bounds."""
    torch.manual_seed(0)
    model = _randomize_batch_norm(NETWORKS[name]())
    graph = build_graph(model)
    images = torch.rand(2, 3, 12, 12)
    spec, eps = margin_spec(torch.tensor([0, 2]), 3), 0.5
    make_rows = Patches.unit_rows.__func__
    groups = []

    def recorded(cls, *args, **kwargs):
        rows = make_rows(cls, *args, **kwargs)
        groups.append(rows.group)
        return rows

    def single(cls, *args, **kwargs):
        rows = make_rows(cls, *args, **kwargs)
        rows.group = 1
        return rows

    results = []
    for rows in (recorded, single):
        monkeypatch.setattr(Patches, "unit_rows", classmethod(rows))
        _, _, records = interval_bounds(graph.root, images - eps, images + eps, full_crown=True, patches=True)
        boxes = [value for value in records.values() if isinstance(value, tuple)]
        results.append((boxes, crown_spec_upper(graph.root, spec, records, images - eps, images + eps)))
    assert max(groups) > 1  # the grouped path ran
    (grouped_boxes, grouped_bound), (single_boxes, single_bound) = results
    for grouped_box, single_box in zip(grouped_boxes, single_boxes, strict=True):
        for a, b in zip(grouped_box, single_box):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grouped_bound, single_bound, rtol=1e-6, atol=1e-6)
