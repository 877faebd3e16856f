"""Dictionaries of explain.concepts on planted data: known atoms, known sparse codes, noise."""

from __future__ import annotations

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch.utils.data import DataLoader, TensorDataset

from explain.concepts import NMF, make_dictionary
from explain.concepts.dictionary import NMFDictionary, dictionary_names
from explain.concepts.factorizations import project_simplex

SAE_OPTIONS = {"progress": False, "top_k": 3}


def planted(n: int, c: int, r: int, k: int, nonnegative: bool = False, noise: float = 0.01, seed: int = 0):
    """``X = U D + noise``: unit atoms ``D`` [r, c], ``k`` active codes in [0.5, 1.5] per row."""
    generator = torch.Generator().manual_seed(seed)
    atoms = torch.randn(r, c, generator=generator)
    if nonnegative:
        atoms = atoms.clamp_min(0)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    active = torch.rand(n, r, generator=generator).argsort(dim=1)[:, :k]
    codes = torch.zeros(n, r).scatter_(1, active, torch.rand(n, k, generator=generator) + 0.5)
    x = codes @ atoms + noise * torch.randn(n, c, generator=generator)
    return (x.clamp_min(0) if nonnegative else x), atoms


def recovery(learned: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean |cosine| of each true atom with a distinct learned atom (Hungarian), written out with scipy."""
    learned = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    truth = truth / truth.norm(dim=1, keepdim=True)
    cosine = (truth @ learned.T).abs().numpy()
    rows, cols = linear_sum_assignment(-cosine)
    return float(cosine[rows, cols].mean())


@pytest.fixture(scope="module")
def signed_data():
    return planted(3000, 32, 16, 3)


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="unknown dictionary 'pca'.*nmf, semi_nmf, archetypal, topk_sae"):
        make_dictionary("pca", 4)
    assert dictionary_names() == ("nmf", "semi_nmf", "archetypal", "topk_sae", "batchtopk_sae", "jumprelu_sae",
                                  "archetypal_sae")


def test_nmf_dictionary_is_the_project_nmf():
    x = torch.rand(60, 12) @ torch.rand(12, 20)
    dictionary = make_dictionary("nmf", 5, max_iter=80)
    codes = dictionary.fit_transform(x)
    reference = NMF(5, max_iter=80)
    reference_codes = reference.fit_transform(x)
    assert torch.equal(dictionary.dictionary_, reference.W) and torch.equal(codes, reference_codes)
    assert torch.equal(dictionary.encode(x[:7]), reference.transform(x[:7]))
    assert torch.allclose(dictionary.decode(codes), codes @ reference.W)


def test_nmf_recovers_a_planted_nonnegative_dictionary():
    x, atoms = planted(2000, 64, 10, 2, nonnegative=True)
    assert recovery(make_dictionary("nmf", 10).fit(x).dictionary_, atoms) >= 0.98


@pytest.mark.parametrize("name", ["topk_sae", "batchtopk_sae", "archetypal_sae"])
def test_topk_saes_recover_a_planted_dictionary(signed_data, name):
    # twice as many atoms as planted ones (the usual SAE recovery protocol): each planted atom is matched to a
    # distinct learned one
    x, atoms = signed_data
    dictionary = make_dictionary(name, 32, **SAE_OPTIONS).fit(x)
    assert recovery(dictionary.dictionary_, atoms) >= 0.95
    codes = dictionary.encode(x)
    assert (codes >= 0).all() and codes.shape == (3000, 32)


def test_jumprelu_sae_recovers_a_planted_dictionary(signed_data):
    x, atoms = signed_data
    dictionary = make_dictionary("jumprelu_sae", 32, progress=False).fit(x)
    assert recovery(dictionary.dictionary_, atoms) >= 0.95
    active = (dictionary.encode(x) > 0).float().sum(dim=1).mean()
    assert 1 <= active <= 8  # sparse: about the 3 planted codes


def test_sae_is_seeded_and_trains_from_a_dataloader(signed_data):
    x, atoms = signed_data
    first = make_dictionary("topk_sae", 32, **SAE_OPTIONS, epochs=3).fit(x)
    again = make_dictionary("topk_sae", 32, **SAE_OPTIONS, epochs=3).fit(x)
    other = make_dictionary("topk_sae", 32, **SAE_OPTIONS, epochs=3, seed=1).fit(x)
    assert torch.equal(first.dictionary_, again.dictionary_)
    assert not torch.equal(first.dictionary_, other.dictionary_)
    loader = DataLoader(TensorDataset(x), batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert recovery(make_dictionary("topk_sae", 32, **SAE_OPTIONS).fit(loader).dictionary_, atoms) >= 0.95


def test_sae_trains_the_same_under_inference_mode(signed_data):
    """Trainer.predict and validation hooks call fit under inference mode / no_grad: the training loop still runs,
    with the same atoms as outside."""
    x, _ = signed_data
    outside = make_dictionary("topk_sae", 32, **SAE_OPTIONS, epochs=2).fit(x)
    with torch.inference_mode():
        inside = make_dictionary("topk_sae", 32, **SAE_OPTIONS, epochs=2).fit(x.clone())
    torch.testing.assert_close(inside.dictionary_, outside.dictionary_)


def test_topk_code_jacobian_is_the_encoder_rows_of_the_active_codes(signed_data):
    x, _ = signed_data
    dictionary = make_dictionary("topk_sae", 32, **SAE_OPTIONS, epochs=2).fit(x)
    rows = x[:5]
    jacobian = dictionary.code_jacobian(rows)
    weight = dictionary.model_.encoder.final_block[0].weight.detach()
    active = dictionary.encode(rows) > 0
    expected = torch.where(active[:, :, None], weight[None], torch.zeros(()))
    assert torch.allclose(jacobian, expected)


def test_semi_nmf_fits_signed_data_with_nonnegative_codes(signed_data):
    x, _ = signed_data
    dictionary = make_dictionary("semi_nmf", 16)
    codes = dictionary.fit_transform(x)
    assert (codes >= 0).all() and (dictionary.dictionary_ < 0).any()
    residual = (x - dictionary.decode(codes)).square().sum() / (x - x.mean(0)).square().sum()
    assert residual < 0.2
    with pytest.raises(ValueError, match="needs nonnegative activations"):
        make_dictionary("nmf", 4).fit(x)


def test_archetypal_analysis_recovers_planted_archetypes():
    generator = torch.Generator().manual_seed(0)
    archetypes = torch.randn(5, 12, generator=generator)
    weights = torch.distributions.Dirichlet(torch.full((5,), 0.1)).sample((400,))
    x = weights @ archetypes
    dictionary = make_dictionary("archetypal", 5, max_iter=300).fit(x)
    # its atoms stay near the archetypes (from a FurthestSum start at 1.0 here, the alternating steps settle at
    # about 0.88: a weak point of this solver, see docs/dictionaries.md)
    assert recovery(dictionary.dictionary_, archetypes) >= 0.85
    weights = dictionary.weights_
    assert (weights >= 0).all() and torch.allclose(weights.sum(1), torch.ones(5), atol=1e-5)
    assert torch.allclose(dictionary.dictionary_, weights @ x, atol=1e-5)
    codes = dictionary.encode(x)
    assert (codes >= 0).all() and torch.allclose(codes.sum(1), torch.ones(400), atol=1e-5)
    with pytest.raises(NotImplementedError, match="gives no concept maps"):
        dictionary.code_jacobian(x[:2])


def test_simplex_projection_is_the_closest_point():
    v = torch.tensor([[0.2, 0.3, 0.5], [2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    expected = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert torch.allclose(project_simplex(v), expected)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"matrix \[n, c\]"):
        make_dictionary("topk_sae", 4).fit(torch.rand(3, 4, 5))
    with pytest.raises(ValueError, match="NaN"):
        make_dictionary("topk_sae", 4).fit(torch.tensor([[float("nan"), 1.0]] * 8))
    with pytest.raises(RuntimeError, match="not fitted"):
        NMFDictionary(3).encode(torch.rand(2, 4))
    with pytest.raises(ValueError, match="top_k=5 is more than n_concepts=4"):
        make_dictionary("topk_sae", 4, top_k=5)
