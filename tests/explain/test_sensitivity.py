"""Total Sobol indices from a QMC design, checked against closed forms (explain.sensitivity)."""

import math

import pytest
import torch

from explain.sensitivity import ESTIMATORS, sobol_design, split_outputs, total_sobol_indices


def ishigami(x: torch.Tensor, a: float = 7.0, b: float = 0.1) -> torch.Tensor:
    return torch.sin(x[:, 0]) + a * torch.sin(x[:, 1]) ** 2 + b * x[:, 2] ** 4 * torch.sin(x[:, 0])


def ishigami_total_indices(a: float = 7.0, b: float = 0.1) -> torch.Tensor:
    """Closed form (Ishigami & Homma 1990; Sobol' & Levitan 1999)."""
    pi = math.pi
    var = a**2 / 8 + b * pi**4 / 5 + b**2 * pi**8 / 18 + 1 / 2
    v1, v2, v13 = (1 + b * pi**4 / 5) ** 2 / 2, a**2 / 8, 8 * b**2 * pi**8 / 225
    return torch.tensor([(v1 + v13) / var, v2 / var, v13 / var], dtype=torch.float64)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ishigami_total_indices_match_closed_form(estimator, seed):
    nb_design = 2**14
    design = sobol_design(3, nb_design, seed=seed, dtype=torch.float64)
    outputs = ishigami(-math.pi + 2 * math.pi * design)
    indices = total_sobol_indices(outputs, 3, nb_design, estimator)
    torch.testing.assert_close(indices, ishigami_total_indices(), atol=0.02, rtol=0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_additive_linear_function_indices(estimator):
    # f = sum_i w_i x_i with independent uniform inputs: ST_i = w_i^2 / sum_j w_j^2
    weights = torch.tensor([3.0, -2.0, 1.0, 0.5], dtype=torch.float64)
    nb_design = 2**12
    design = sobol_design(4, nb_design, seed=3, dtype=torch.float64)
    indices = total_sobol_indices(design @ weights, 4, nb_design, estimator)
    torch.testing.assert_close(indices, weights**2 / weights.square().sum(), atol=0.02, rtol=0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_unused_input_gets_zero_index(estimator):
    nb_design = 64
    design = sobol_design(3, nb_design, seed=0, dtype=torch.float64)
    outputs = torch.exp(design[:, 0]) * design[:, 2]  # ignores x_1
    indices = total_sobol_indices(outputs, 3, nb_design, estimator)
    assert abs(indices[1].item()) < 1e-9
    assert (indices[[0, 2]] > 0.05).all()


def test_jansen_divides_by_the_sample_variance():
    """Jansen as xplique's and craft's JansenEstimator, written out with numpy: sum_j (fA_j - fC_ij)^2 over
    (2 N var(fA, ddof=1)); with N = 8 the population variance would make every index 8/7 larger."""
    import numpy as np

    nb_dim, nb_design = 3, 8
    outputs = torch.randn(2, nb_design * (nb_dim + 1), dtype=torch.float64)
    indices = total_sobol_indices(outputs, nb_dim, nb_design, "jansen")
    for row, got in zip(outputs.numpy(), indices):
        f_a, f_c = row[:nb_design], row[nb_design:].reshape(nb_dim, nb_design)
        expected = ((f_a - f_c) ** 2).sum(1) / (2 * nb_design * np.var(f_a, ddof=1))
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)


def test_indices_are_computed_per_leading_dimension():
    nb_design = 256
    design = sobol_design(2, nb_design, seed=0, dtype=torch.float64)
    outputs = torch.stack([design[:, 0], design[:, 1], design[:, 0] + 3 * design[:, 1]])  # [3, N(D+1)]
    indices = total_sobol_indices(outputs, 2, nb_design)
    assert indices.shape == (3, 2)
    # a function of one input: that input's index is ~1 (Monte Carlo), the other's exactly 0
    torch.testing.assert_close(indices[0], torch.tensor([1.0, 0.0], dtype=torch.float64), atol=0.01, rtol=0)
    torch.testing.assert_close(indices[1], torch.tensor([0.0, 1.0], dtype=torch.float64), atol=0.01, rtol=0)
    assert indices[0, 1] == 0 and indices[1, 0] == 0
    torch.testing.assert_close(indices[2], total_sobol_indices(outputs[2], 2, nb_design))


def test_design_structure():
    nb_dim, nb_design = 5, 16
    design = sobol_design(nb_dim, nb_design, seed=0)
    assert design.shape == (nb_design * (nb_dim + 1), nb_dim)
    assert design.dtype == torch.float32
    assert ((design >= 0) & (design <= 1)).all()
    a = design[:nb_design]
    c = design[nb_design:].view(nb_dim, nb_design, nb_dim)
    for i in range(nb_dim):
        others = [j for j in range(nb_dim) if j != i]
        assert torch.equal(c[i][:, others], a[:, others])  # C_i is A ...
        assert not torch.equal(c[i][:, i], a[:, i])  # ... with column i from B
    # the B columns are the last nb_dim coordinates of the same Sobol points
    engine = torch.quasirandom.SobolEngine(2 * nb_dim, scramble=True, seed=0)
    points = engine.draw(nb_design, dtype=torch.float64).float()
    torch.testing.assert_close(a, points[:, :nb_dim])
    torch.testing.assert_close(torch.stack([c[i][:, i] for i in range(nb_dim)], 1), points[:, nb_dim:])


def test_design_seed_and_halton_sampler():
    assert torch.equal(sobol_design(3, 8, seed=1), sobol_design(3, 8, seed=1))
    assert not torch.equal(sobol_design(3, 8, seed=1), sobol_design(3, 8, seed=2))
    halton = sobol_design(3, 8, sampler="halton", seed=0)
    assert halton.shape == (32, 3)
    with pytest.raises(ValueError, match="sampler"):
        sobol_design(3, 8, sampler="latin")


def test_bad_shapes_and_names_raise():
    with pytest.raises(ValueError, match="nb_design \\* \\(nb_dim \\+ 1\\)"):
        split_outputs(torch.zeros(10), nb_dim=3, nb_design=4)
    with pytest.raises(ValueError, match="estimator"):
        total_sobol_indices(torch.rand(16), 3, 4, estimator="sobol")
    with pytest.raises(ValueError, match="nb_dim"):
        sobol_design(0, 8)
    with pytest.raises(ValueError, match="nb_design"):
        sobol_design(3, 1)
