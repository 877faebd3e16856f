"""Nonnegative least squares with a fixed dictionary: ``U = argmin_{U >= 0} ||A - U W||_F``.

This is CRAFT's ``transform`` (the concept coefficients of new activations with the concept bank ``W`` fixed)
and the building block of NMF. Rows of ``A`` are independent problems; all of them are solved at once:

1. HALS / coordinate descent (Cichocki & Phan 2009; the "cd" solver of scikit-learn) on the rows of ``U``:
   ``U[:, k] <- max(0, U[:, k] + (B[:, k] - U G[:, k]) / G[k, k])`` with ``G = W W^T`` and ``B = A W^T``;
2. every 10 sweeps, an exact "polish" on the active set ``S = {k : U_k > 0}`` found so far:
   ``U_S = A W_S^T (W_S W_S^T)^-1``, with a KKT check (feasible, and no descent direction off ``S``). The solver
   stops when every row is certified optimal, so the result is the exact minimizer up to round-off, which is
   what implicit differentiation (:mod:`explain.concepts.implicit`) relies on.
"""

from __future__ import annotations

import torch
from torch import Tensor

_TINY = 1e-30


def hals_sweeps(factor: Tensor, gram: Tensor, cross: Tensor, sweeps: int = 1) -> Tensor:
    """In-place HALS sweeps on ``factor`` [r, m] for ``min_{F >= 0} 1/2 tr(F^T G F) - tr(P^T F)``.

    ``gram`` G [r, r] and ``cross`` P [r, m]: for NNLS ``min ||A - U W||`` with ``F = U^T`` they are ``W W^T``
    and ``W A^T``. Each sweep updates the rows of ``F`` one after the other (Gauss-Seidel) with the exact
    minimizer in ``F[k]`` given the others: ``F[k] <- max(0, (P[k] - sum_{j != k} G[k, j] F[j]) / G[k, k])``.
    """
    inverse = 1 / gram.diagonal().clamp_min(_TINY)
    scaled_gram = gram * inverse[:, None]
    scaled_gram.diagonal().zero_()  # the j = k term is left out
    scaled_cross = cross * inverse[:, None]
    row = torch.empty_like(factor[0])
    for _ in range(sweeps):
        for k in range(factor.shape[0]):
            torch.addmv(scaled_cross[k], factor.T, scaled_gram[k], alpha=-1, out=row)
            torch.clamp_min(row, 0, out=factor[k])
    return factor


def solve_on_support(gram: Tensor, rhs: Tensor, support: Tensor) -> Tensor:
    """Solve ``G_SS X_S = B_S`` on each row's support ``S``, with ``X = 0`` outside: [n, r, m].

    ``gram`` G [r, r], ``rhs`` B [n, r, m], ``support`` bool [n, r]. For NNLS with ``B = (A W^T)[..., None]``
    this is the least squares solution on the support, ``U_S = A W_S^T (W_S W_S^T)^-1``. One batched solve,
    with ``G_SS`` completed by the identity outside ``S``; singular systems use the pseudo-inverse.
    """
    mask = support.to(gram.dtype)
    system = gram * mask[:, :, None] * mask[:, None, :] + torch.diag_embed(1 - mask)
    rhs = rhs * mask[:, :, None]
    solution, info = torch.linalg.solve_ex(system, rhs)
    if bool((info != 0).any()):
        bad = info != 0
        solution[bad] = torch.linalg.pinv(system[bad], hermitian=True) @ rhs[bad]
    return solution * mask[:, :, None]


def _polish(gram: Tensor, cross: Tensor, u: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """Exact least squares on the support of ``u`` where it stays >= 0, and which rows are then optimal.

    A row is optimal (KKT) when it is feasible and the gradient ``u G - b`` is >= 0 off the support (up to
    ``tol`` times the row's scale); on the support it is zero by construction.
    """
    support = u > 0
    exact = solve_on_support(gram, cross.unsqueeze(-1), support).squeeze(-1)
    feasible = (exact >= 0).all(dim=1)
    gradient = exact @ gram - cross
    scale = cross.abs().amax(dim=1, keepdim=True).clamp_min(_TINY)
    stationary = ((gradient >= -tol * scale) | support).all(dim=1)
    return torch.where(feasible[:, None], exact, u), feasible & stationary


def nnls(
    activations: Tensor,
    w: Tensor,
    *,
    max_iter: int = 500,
    tol: float | None = None,
) -> Tensor:
    """``U = argmin_{U >= 0} ||A - U W||_F`` for ``A`` [n, c] and ``W`` [r, c] -> ``U`` [n, r].

    Starts from the clamped unconstrained solution; every 10 HALS sweeps (at most ``max_iter``) the exact
    active-set solution is computed and the fit stops once every row satisfies the KKT conditions (gradient
    off the support >= ``-tol`` times the row's scale; default ``sqrt(machine epsilon)``). Rows still not
    certified after ``max_iter`` sweeps keep the better of the HALS iterate and its feasible polish.

    Raises:
        ValueError: ``activations`` [n, c] and ``W`` [r, c] with different ``c``.
    """
    if activations.ndim != 2 or w.ndim != 2 or activations.shape[1] != w.shape[1]:
        raise ValueError(
            f"nnls expects activations [n, c] and W [r, c] with the same c, got {tuple(activations.shape)} and "
            f"{tuple(w.shape)}"
        )
    w = w.to(device=activations.device, dtype=activations.dtype)
    tol = torch.finfo(activations.dtype).eps ** 0.5 if tol is None else tol
    gram = w @ w.T
    cross = activations @ w.T  # [n, r]
    if cross.numel() == 0:
        return cross.clone()
    # start: unconstrained least squares, clamped (pinv: W may be rank deficient)
    factor = (cross @ torch.linalg.pinv(gram, hermitian=True)).clamp_min_(0).T.contiguous()  # [r, n]
    cross_t = cross.T.contiguous()
    for iteration in range(0, max_iter, 10):
        u, optimal = _polish(gram, cross, factor.T, tol)
        if bool(optimal.all()):
            return u
        hals_sweeps(factor, gram, cross_t, min(10, max_iter - iteration))
    return _polish(gram, cross, factor.T, tol)[0]
