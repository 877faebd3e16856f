"""Quality of a dictionary ``A ~= U D`` (DESIGN section 11): reconstruction, sparsity, stability, concentration.

* ``r2_per_dimension``: ``1 - sum ||A - A_hat||^2 / sum_j ||A_j - mean(A_j)||^2``, every channel centred on its
  own mean (scikit-learn's ``r2_score(multioutput="variance_weighted")``, the "fraction of variance explained");
* ``r2_global``: overcomplete's ``r2_score``: ``1 - mean (A - A_hat)^2 / (mean (A - mean(A))^2 + 1e-6)``, one mean
  over every entry (so it credits a dictionary for the channels' different means);
* ``dead_code_fraction``: share of the codes that are zero on every row (overcomplete's ``dead_codes``, averaged);
* ``l0``: share of nonzero codes (overcomplete's ``l0``); ``active_codes``: nonzero codes per row;
* ``hoyer``: ``(sqrt(r) - ||u||_1 / ||u||_2) / (sqrt(r) - 1)`` per row, 1 for one active code, 0 for a flat row
  (Hoyer 2004; overcomplete's ``hoyer``, with its 1e-6 in the denominator);
* ``matched_cosine``: the mean cosine of the atoms of two dictionaries matched one to one by the Hungarian
  assignment that maximises it (``absolute=True``: ``|cosine|``, atoms equal up to sign count as the same); with
  ``absolute=False`` it is ``1 - cosine_hungarian_loss / r`` of overcomplete. Stability across seeds and concept
  drift across epochs are this number;
* ``importance_concentration``: the share of the total importance held by the ``k`` most important concepts.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from explain.validation import positive_int

_EPSILON = 1e-6  # overcomplete's


def _pair(x: Tensor, x_hat: Tensor) -> None:
    if x.ndim != 2 or x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must be matrices [n, c] of the same shape, got {tuple(x.shape)} and "
                         f"{tuple(x_hat.shape)}")


def r2_per_dimension(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance explained, each channel centred on its own mean (module docstring)."""
    _pair(x, x_hat)
    x, x_hat = x.double(), x_hat.double()
    residual = (x - x_hat).square().sum()
    total = (x - x.mean(dim=0)).square().sum()
    return (1 - residual / total.clamp_min(1e-30)).float()


def r2_global(x: Tensor, x_hat: Tensor) -> Tensor:
    """overcomplete's ``r2_score``: one mean over every entry (module docstring)."""
    _pair(x, x_hat)
    return 1 - (x - x_hat).square().mean() / ((x - x.mean()).square().mean() + _EPSILON)


def dead_code_fraction(codes: Tensor) -> Tensor:
    """Share of the ``r`` codes that are zero on every row of ``codes`` [n, r]."""
    return (codes.sum(dim=0) == 0).float().mean()


def l0(codes: Tensor) -> Tensor:
    """Share of nonzero entries of ``codes``."""
    return (codes != 0).float().mean()


def active_codes(codes: Tensor) -> Tensor:
    """Nonzero codes per row, averaged over the rows of ``codes`` [n, r]."""
    return (codes != 0).float().sum(dim=1).mean()


def hoyer(codes: Tensor) -> Tensor:
    """Hoyer sparsity [n] of each row of ``codes`` [n, r] (module docstring)."""
    if codes.ndim != 2 or codes.shape[1] < 2:
        raise ValueError(f"hoyer needs codes [n, r] with r >= 2, got {tuple(codes.shape)}")
    root = codes.shape[1] ** 0.5
    ratio = codes.abs().sum(dim=1) / (codes.norm(dim=1) + _EPSILON)
    return (root - ratio) / (root - 1)


def cosine_matrix(first: Tensor, second: Tensor) -> Tensor:
    """Cosine [r1, r2] between the atoms (rows) of two dictionaries over the same channels."""
    if first.ndim != 2 or second.ndim != 2 or first.shape[1] != second.shape[1]:
        raise ValueError(f"dictionaries must be [r, c] over the same c, got {tuple(first.shape)} and "
                         f"{tuple(second.shape)}")
    first = first.double() / first.double().norm(dim=1, keepdim=True).clamp_min(1e-30)
    second = second.double().to(first.device) / second.double().norm(dim=1, keepdim=True).clamp_min(1e-30)
    return first @ second.T


def hungarian_match(first: Tensor, second: Tensor, *, absolute: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The one-to-one matching of atoms that maximises the summed (absolute) cosine.

    Returns ``(rows, cols, cosine)``: atom ``rows[i]`` of ``first`` matches atom ``cols[i]`` of ``second`` with
    cosine ``cosine[i]`` (``min(r1, r2)`` pairs, rows in increasing order).
    """
    similarity = cosine_matrix(first, second)
    similarity = similarity.abs() if absolute else similarity
    rows, cols = linear_sum_assignment(similarity.cpu().numpy(), maximize=True)
    rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
    return rows, cols, similarity.cpu()[rows, cols].float()


def matched_cosine(first: Tensor, second: Tensor, *, absolute: bool = True) -> Tensor:
    """Mean cosine of the Hungarian-matched atoms of two dictionaries (module docstring)."""
    return hungarian_match(first, second, absolute=absolute)[2].mean()


def importance_concentration(importance: Tensor, k: int) -> Tensor:
    """Share ``sum(top-k importance) / sum(importance)`` of the concepts' (nonnegative) importance [r]."""
    positive_int("k", k)
    if importance.ndim != 1 or importance.numel() == 0:
        raise ValueError(f"importance must be a vector [r], got {tuple(importance.shape)}")
    if bool((importance < 0).any()):
        raise ValueError("importance must be nonnegative to give a share")
    total = importance.sum()
    return importance.topk(min(k, importance.numel())).values.sum() / total.clamp_min(1e-30)
