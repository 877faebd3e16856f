"""Total-order Sobol indices from a quasi-Monte Carlo design (Fel et al. 2021, "Look at the Variance!").

The design is the "A / C_i" scheme: draw ``N`` points of dimension ``2D`` from a scrambled QMC sequence,
``A`` = the first ``D`` columns, ``B`` = the last ``D``, and ``C_i`` = ``A`` with its column ``i`` taken
from ``B``. Total indices only need ``f(A)`` and ``f(C_i)``: the reference also evaluates ``f(B)`` and never
uses it, so here the cost is ``N (D + 1)`` evaluations.

With ``fA = f(A)`` [N] and ``fC = f(C_i)`` [N] (``V`` = Var(fA), population variance; ``S`` = the sample
variance of fA, ddof 1), the estimators of ``ST_i`` are

* Jansen (1999):        ``sum_j (fA_j - fC_j)^2 / (2 N S)``, with the SAMPLE variance as xplique's and craft's
  ``JansenEstimator`` (the reference of Sobol attribution and CRAFT importance)
* Saltelli (2010):      ``mean(fA (fA - fC)) / V``
* Homma-Saltelli (1996): ``(V - (mean(fA fC) - mean(fA)^2)) / V``
* Janon (2014):         ``1 - (mean(fA fC) - m^2) / (mean((fA^2 + fC^2) / 2) - m^2)``, ``m = mean((fA + fC) / 2)``
* Glen-Isaacs (2012):   ``1 - corr(fA, fC)`` (Pearson)

All estimate ``ST_i = E[Var(f | X_~i)] / Var(f)``; they differ in variance and bias.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from explain.validation import int_at_least, one_of, positive_int

Estimator = Literal["jansen", "saltelli", "homma", "janon", "glen"]
ESTIMATORS: tuple[str, ...] = ("jansen", "saltelli", "homma", "janon", "glen")
_EPS = 1e-12


def sobol_design(
    nb_dim: int,
    nb_design: int,
    *,
    sampler: Literal["sobol", "halton"] = "sobol",
    scramble: bool = True,
    seed: int | None = 0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """QMC design in [0,1]: rows ``A`` (``nb_design`` of them) followed by ``C_1 .. C_D``: [N (D + 1), D].

    ``sampler="sobol"`` uses :class:`torch.quasirandom.SobolEngine`, ``"halton"`` uses
    :class:`scipy.stats.qmc.Halton` (the sampler of the CRAFT reference code).
    """
    positive_int("nb_dim", nb_dim)
    int_at_least("nb_design", nb_design, 2)
    one_of("sampler", sampler, ("sobol", "halton"))
    if sampler == "sobol":
        engine = torch.quasirandom.SobolEngine(dimension=2 * nb_dim, scramble=scramble, seed=seed)
        points = engine.draw(nb_design, dtype=torch.float64)
    else:  # "halton"
        from scipy.stats import qmc

        points = torch.from_numpy(qmc.Halton(d=2 * nb_dim, scramble=scramble, seed=seed).random(nb_design))
    a, b = points[:, :nb_dim], points[:, nb_dim:]
    # C[i, j] = A[j] with column i replaced by B[j, i]
    c = a.unsqueeze(0).repeat(nb_dim, 1, 1)
    index = torch.arange(nb_dim)
    c[index, :, index] = b.T
    return torch.cat([a, c.reshape(nb_dim * nb_design, nb_dim)]).to(dtype)


def split_outputs(outputs: Tensor, nb_dim: int, nb_design: int) -> tuple[Tensor, Tensor]:
    """Split evaluations [..., N (D + 1)] of a :func:`sobol_design` into ``fA`` [..., 1, N] and ``fC`` [..., D, N].

    Raises:
        ValueError: the last dimension is not ``nb_design * (nb_dim + 1)``.
    """
    expected = nb_design * (nb_dim + 1)
    if outputs.shape[-1] != expected:
        raise ValueError(
            f"expected {expected} = nb_design * (nb_dim + 1) outputs in the last dimension, "
            f"got shape {tuple(outputs.shape)}"
        )
    f_a = outputs[..., :nb_design].unsqueeze(-2)
    f_c = outputs[..., nb_design:].reshape(*outputs.shape[:-1], nb_dim, nb_design)
    return f_a, f_c


def total_sobol_indices(
    outputs: Tensor, nb_dim: int, nb_design: int, estimator: Estimator = "jansen"
) -> Tensor:
    """Total Sobol indices [..., D] from evaluations [..., N (D + 1)] of a :func:`sobol_design` (module docstring)."""
    one_of("estimator", estimator, ESTIMATORS)
    f_a, f_c = split_outputs(outputs.double(), nb_dim, nb_design)
    var = f_a.var(dim=-1, correction=0)
    if estimator == "jansen":
        sample_var = f_a.var(dim=-1, correction=1)
        indices = (f_a - f_c).square().mean(-1) / (2 * sample_var + _EPS)
    elif estimator == "saltelli":
        indices = (f_a * (f_a - f_c)).mean(-1) / (var + _EPS)
    elif estimator == "homma":
        indices = (var - ((f_a * f_c).mean(-1) - f_a.mean(-1).square())) / (var + _EPS)
    elif estimator == "janon":
        m = ((f_a + f_c) / 2).mean(-1)
        num = (f_a * f_c).mean(-1) - m.square()
        den = ((f_a.square() + f_c.square()) / 2).mean(-1) - m.square()
        indices = 1 - num / (den + _EPS)
    else:  # "glen"
        a_c = f_a - f_a.mean(-1, keepdim=True)
        c_c = f_c - f_c.mean(-1, keepdim=True)
        corr = (a_c * c_c).mean(-1) / (a_c.square().mean(-1).sqrt() * c_c.square().mean(-1).sqrt() + _EPS)
        indices = 1 - corr
    return indices.to(outputs.dtype if outputs.is_floating_point() else torch.float32)
