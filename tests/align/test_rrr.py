"""RRR ("Right for the Right Reasons", Ross et al. 2017): the term against its formula written out, its mask, its
gradient into the parameters, and as the alignment term of HarmonizedClassifier."""

import warnings

import pytest
import torch
from torch import nn

from align import HarmonizedClassifier
from align.losses.rrr import RRRLoss, log_probability_gradient, rrr_mask, rrr_penalty
from align.models import small_cnn


def linear_model(k=3, c=2, s=4, dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(c * s * s, k)).to(dtype)
    return model


def test_log_probability_gradient_is_the_closed_form_of_a_linear_model():
    # f(x) = W x + b: d/dx sum_k log softmax(f)_k = sum_k (w_k - K * sum_j p_j w_j) = W^T (1 - K p)
    model = linear_model()
    images = torch.rand(5, 2, 4, 4, dtype=torch.float64)
    logits, gradient = log_probability_gradient(model, images, create_graph=False)
    weight = model[1].weight
    p = torch.softmax(logits, 1)
    expected = ((1 - 3 * p) @ weight).view(5, 2, 4, 4)
    torch.testing.assert_close(gradient, expected)


def test_penalty_is_the_papers_formula_written_out():
    """lambda * mean_n sum_d (A_nd * d/dx_nd sum_k log p_nk)^2, one image at a time (no batching to hide behind)."""
    model = small_cnn(4, widths=(4, 8), depth=1, batch_norm=False).double().eval()
    images = torch.rand(6, 3, 8, 8, dtype=torch.float64)
    mask = torch.rand(6, 8, 8) < 0.3
    _, penalty = RRRLoss()(model, images, spurious_mask=mask)
    terms = []
    for n in range(6):
        x = images[n : n + 1].clone().requires_grad_(True)
        log_p = torch.log(torch.softmax(model(x), dim=1)).sum()
        (g,) = torch.autograd.grad(log_p, x)
        a = mask[n].double()
        terms.append(sum(float(((a * g[0, c]) ** 2).sum()) for c in range(3)))
    assert penalty.item() == pytest.approx(sum(terms) / 6, rel=1e-9)
    assert rrr_penalty(torch.ones(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="mask must be"):
        rrr_penalty(torch.ones(2, 3, 4, 4), torch.zeros(2, 5, 5, dtype=torch.bool))


def test_gradient_flows_into_the_parameters_as_finite_differences_say():
    model = small_cnn(4, widths=(4,), depth=1, batch_norm=False).double()
    images = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    mask = torch.zeros(4, 8, 8, dtype=torch.bool)
    mask[:, :3, :3] = True
    _, penalty = RRRLoss()(model, images, spurious_mask=mask)
    penalty.backward()  # double backprop: through the input gradient into the weights
    weight = next(model.parameters())
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    index, eps = (0, 0, 1, 1), 1e-6
    with torch.no_grad():
        original = weight[index].item()
        values = []
        for shift in (eps, -eps):
            weight[index] = original + shift
            values.append(RRRLoss()(model, images, spurious_mask=mask, create_graph=False)[1].item())
        weight[index] = original
    assert weight.grad[index].item() == pytest.approx((values[0] - values[1]) / (2 * eps), rel=1e-4)


def test_mask_is_the_spurious_mask_or_the_low_human_map():
    human = torch.tensor([[[0.0, 0.5], [0.05, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    has = torch.tensor([True, False])
    assert rrr_mask(human, has, threshold=0.1).tolist() == [[[True, False], [True, False]], [[False, False]] * 2]
    spurious = torch.tensor([[[False, True], [False, False]]] * 2)
    assert torch.equal(rrr_mask(human, has, spurious), spurious)  # the spurious mask wins
    assert rrr_mask(None, None) is None
    model = small_cnn(4, widths=(4,), depth=1)
    logits, penalty = RRRLoss()(model, torch.rand(2, 3, 2, 2), human, torch.tensor([False, False]))
    assert penalty is None and logits.shape == (2, 4)  # nothing to ignore: no double backprop
    with pytest.raises(ValueError, match="threshold"):
        RRRLoss(threshold=0.0)


def test_harmonized_classifier_with_rrr_adds_the_weighted_term():
    torch.manual_seed(0)
    backbone = small_cnn(4, widths=(8, 16), depth=1, batch_norm=False)
    model = HarmonizedClassifier(backbone, task_loss="ce", harmonization_weight=2.5, alignment_loss="rrr")
    data = {
        "image": torch.rand(6, 3, 16, 16),
        "label": torch.randint(0, 4, (6,)),
        "heatmap": torch.rand(6, 16, 16),
        "has_heatmap": torch.ones(6, dtype=torch.bool),
        "spurious_mask": torch.zeros(6, 16, 16, dtype=torch.bool),
    }
    data["spurious_mask"][:, :4, :4] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = model.training_step(data, 0)
    logits, gradient = log_probability_gradient(backbone, data["image"])
    task = nn.functional.cross_entropy(logits, data["label"], label_smoothing=0.1)
    expected = task + 2.5 * (gradient * data["spurious_mask"][:, None]).square().sum((1, 2, 3)).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in backbone.parameters())
    with pytest.raises(ValueError, match="alignment_loss"):
        HarmonizedClassifier(small_cnn(4, widths=(8,), depth=1), alignment_loss="gradcam")
