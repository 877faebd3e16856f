"""Dictionary quality metrics against overcomplete's functions, scikit-learn and planted data."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import r2_score

from explain.concepts import make_dictionary
from explain.concepts.overcomplete_import import metrics as oc
from explain.metrics import DictionaryQuality
from explain.metrics.functional import (
    active_codes,
    dead_code_fraction,
    hoyer,
    importance_concentration,
    l0,
    matched_cosine,
    r2_global,
    r2_per_dimension,
)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=generator) + torch.arange(6.0)
    x_hat = x + 0.3 * torch.randn(50, 6, generator=generator)
    codes = torch.relu(torch.randn(50, 8, generator=generator))
    codes[:, 2] = 0  # a dead code
    return x, codes, x_hat


def test_functions_equal_overcomplete(batch):
    x, codes, x_hat = batch
    assert torch.allclose(r2_global(x, x_hat), oc.r2_score(x, x_hat))
    assert torch.allclose(dead_code_fraction(codes), oc.dead_codes(codes).mean())
    assert torch.allclose(l0(codes), oc.l0(codes))
    assert torch.allclose(hoyer(codes), oc.hoyer(codes))
    first, second = torch.randn(7, 6), torch.randn(7, 6)
    assert torch.allclose(matched_cosine(first, second, absolute=False),
                          torch.tensor(1 - oc.cosine_hungarian_loss(first, second) / 7), atol=1e-6)


def test_r2_per_dimension_is_scikit_learns_variance_weighted(batch):
    x, _, x_hat = batch
    expected = r2_score(x.numpy(), x_hat.numpy(), multioutput="variance_weighted")
    assert r2_per_dimension(x, x_hat).item() == pytest.approx(expected, abs=1e-6)
    # the global variant credits the channels' different means: higher here
    assert r2_global(x, x_hat) > r2_per_dimension(x, x_hat)


def test_active_codes_and_concentration_by_hand():
    codes = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]])
    assert active_codes(codes).item() == 1.5
    assert importance_concentration(torch.tensor([0.5, 0.1, 0.3, 0.1]), 2).item() == pytest.approx(0.8)
    with pytest.raises(ValueError, match="nonnegative"):
        importance_concentration(torch.tensor([0.5, -0.1]), 1)


def test_matched_cosine_ignores_order_and_sign():
    atoms = torch.randn(5, 9)
    shuffled = -atoms[torch.tensor([3, 0, 4, 1, 2])] * 2.0
    assert matched_cosine(atoms, shuffled).item() == pytest.approx(1.0)
    assert matched_cosine(atoms, shuffled, absolute=False).item() < 0.9


def test_stability_across_seeds_planted_against_noise():
    from tests.explain.test_dictionaries import planted

    x, _ = planted(2000, 64, 10, 2, nonnegative=True)
    noise = torch.rand(2000, 64, generator=torch.Generator().manual_seed(1))
    scores = {}
    for name, data in (("planted", x), ("noise", noise)):
        atoms = [make_dictionary("nmf", 10, init="random", seed=seed).fit(data).dictionary_ for seed in range(3)]
        scores[name] = min(matched_cosine(atoms[i], atoms[j]).item() for i, j in ((0, 1), (0, 2), (1, 2)))
    assert scores["planted"] >= 0.95
    assert scores["noise"] < 0.85


def test_metric_equals_the_functions_on_all_rows(batch):
    x, codes, x_hat = batch
    metric = DictionaryQuality(n_channels=6, n_concepts=8)
    for part in range(0, 50, 20):
        metric.update(x[part:part + 20], codes[part:part + 20], x_hat[part:part + 20])
    result = metric.compute()
    assert result["r2_per_dimension"].item() == pytest.approx(r2_per_dimension(x, x_hat).item(), abs=1e-5)
    assert result["r2_global"].item() == pytest.approx(oc.r2_score(x, x_hat).item(), abs=1e-5)
    assert result["dead_codes"].item() == pytest.approx(oc.dead_codes(codes).mean().item())
    assert result["l0"].item() == pytest.approx(oc.l0(codes).item())
    assert result["hoyer"].item() == pytest.approx(oc.hoyer(codes).mean().item(), abs=1e-5)
    with pytest.raises(ValueError, match=r"codes must be \[3, 8\]"):
        metric.update(x[:3], codes[:3, :4], x_hat[:3])
