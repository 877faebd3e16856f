"""Certified radius of 1-Lipschitz classifiers: exact constant, and no attack inside the radius flips a prediction."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from align.certification import (
    certified_accuracy,
    certified_correct,
    certified_radius,
    last_linear,
    margin_lipschitz,
)
from align.models import lip_vgg


def pgd_l2(model, images, radius, steps=40):
    """Projected gradient ascent on max_{j != pred} f_j - f_pred inside the L2 ball of ``radius`` [B]."""
    with torch.no_grad():
        predicted = model(images).argmax(1)
    delta = torch.zeros_like(images, requires_grad=True)
    step = (2.5 * radius / steps)[:, None, None, None]
    for _ in range(steps):
        logits = model(images + delta)
        own = logits.gather(1, predicted[:, None])[:, 0]
        other = logits.scatter(1, predicted[:, None], float("-inf")).amax(1)
        (gradient,) = torch.autograd.grad((other - own).sum(), delta)
        with torch.no_grad():
            delta += step * gradient / gradient.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
            norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta *= (radius / norm).clamp(max=1.0)[:, None, None, None]
    return (images + delta).detach(), predicted


def margin(logits, predicted):
    own = logits.gather(1, predicted[:, None])[:, 0]
    return own - logits.scatter(1, predicted[:, None], float("-inf")).amax(1)


def test_margin_lipschitz_is_the_largest_row_distance():
    weight = torch.randn(5, 7)
    brute = max(np.linalg.norm(weight[i].numpy() - weight[j].numpy()) for i, j in itertools.combinations(range(5), 2))
    assert margin_lipschitz(weight).item() == pytest.approx(brute, rel=1e-6)
    linear = nn.Linear(7, 5)
    assert margin_lipschitz(linear).item() == pytest.approx(margin_lipschitz(linear.weight).item())
    # orthonormal rows: sqrt(2)
    orthonormal = torch.linalg.qr(torch.randn(7, 4)).Q.T
    assert margin_lipschitz(orthonormal).item() == pytest.approx(2**0.5, rel=1e-5)


def test_radius_and_accuracy_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.5, 0.4], [2.0, 2.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    torch.testing.assert_close(certified_radius(logits, 2.0), torch.tensor([1.0, 0.05, 0.0]))
    assert certified_correct(logits, labels, 2.0, 0.04).tolist() == [True, True, False]
    assert certified_accuracy(logits, labels, 2.0, 0.5).item() == pytest.approx(1 / 3)


def test_attack_flips_a_linear_model_just_beyond_its_boundary():
    # for f(x) = W x + b the boundary between the prediction p and the runner-up q lies at the distance
    # (f_p - f_q) / ||w_p - w_q||: the attack used below must flip every input slightly beyond it (so that it is
    # strong enough to test the certificate), and the certified radius can never exceed that distance
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    images = torch.randn(16, 3, 2, 2)
    with torch.no_grad():
        logits = model(images)
        weight = model[1].weight
        top = logits.topk(2, dim=1)
        p, q = top.indices[:, 0], top.indices[:, 1]
        boundary = (top.values[:, 0] - top.values[:, 1]) / (weight[p] - weight[q]).norm(dim=1)
    adversarial, predicted = pgd_l2(model, images, 1.05 * boundary)
    assert (predicted == p).all()
    assert (model(adversarial).argmax(1) != predicted).all()
    assert (certified_radius(logits, margin_lipschitz(weight)) <= boundary + 1e-6).all()


def test_no_attack_inside_the_certified_radius_flips_a_lipschitz_cnn():
    torch.manual_seed(0)
    model = lip_vgg(3, widths=(8, 16), depth=1)
    with torch.no_grad():  # a trained-looking head: larger margins than at init
        model.head.parametrizations.weight.original.mul_(torch.tensor([[1.0], [2.0], [3.0]]))
        model.head.bias.copy_(torch.tensor([0.02, -0.01, 0.0]))
    model.eval()
    images = torch.rand(24, 3, 16, 16)
    with torch.no_grad():
        logits = model(images)
    lipschitz = margin_lipschitz(last_linear(model))
    radius = certified_radius(logits, lipschitz)
    assert (radius > 0).all()
    adversarial, predicted = pgd_l2(model, images, 0.99 * radius)
    with torch.no_grad():
        attacked = model(adversarial)
    assert (attacked.argmax(1) == predicted).all()
    # the margin cannot drop faster than L times the perturbation's norm
    moved = (adversarial - images).flatten(1).norm(dim=1)
    assert (margin(logits, predicted) - margin(attacked, predicted) <= lipschitz * moved * (1 + 1e-4) + 1e-6).all()
