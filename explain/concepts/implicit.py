"""Implicit differentiation of the NNLS solution and CRAFT's concept attribution maps (Fel et al. 2023, CRAFT).

For one row ``a`` [c], the concept coefficients ``u(a) = argmin_{u >= 0} ||a - u W||`` (``W`` [r, c]) satisfy
the KKT conditions; on the active set ``S = {k : u_k > 0}`` (with strict complementarity, which holds
almost everywhere) the solution is locally ``u_S = a W_S^T (W_S W_S^T)^-1`` and ``u_{~S} = 0``, so

    ``J = du/da`` [r, c]:  ``J_S = (W_S W_S^T)^-1 W_S``,  ``J_{~S} = 0``.

Concept attribution map (the Grad-CAM of the paper's implicit differentiation, computed in closed form here
instead of through an iterative solver): for latent activations ``A`` [c, h, w] of an image, its concept
coefficients are those of the spatial mean, ``u = NNLS(mean_hw A, W)`` (CRAFT fits ``W`` on spatially
averaged activations of crops). Then ``du_k / dA[c, i, j] = J[k, c] / (h w)`` at every location, and the
map of concept ``k`` at location ``(i, j)`` is

    ``map_k(i, j) = ReLU( sum_c A[c, i, j] * mean_hw(du_k / dA_c) ) = ReLU( A[:, i, j] . J[k] ) / (h w)``.

Before the ReLU the map is an exact decomposition of the coefficient over the locations:
``sum_ij A[:, i, j] . J[k] / (h w) = mean_hw(A) . J[k] = u_k``. A concept absent from the image
(``u_k = 0``, ``k`` outside the active set) has a zero map: its coefficient does not move under small changes.
"""

from __future__ import annotations

from torch import Tensor

from explain.concepts.nnls import nnls, solve_on_support


def nnls_jacobian(u: Tensor, w: Tensor) -> Tensor:
    """``du/da`` [n, r, c] of the NNLS solutions ``u`` [n, r] of rows ``a`` [n, c] with ``W`` [r, c] fixed.

    Rows of ``J`` in the active set ``S = {u_k > 0}``: ``(W_S W_S^T)^-1 W_S``; other rows: zero (module docstring).

    Raises:
        ValueError: ``u`` not [n, r] or ``W`` not [r, c].
    """
    if u.ndim != 2 or w.ndim != 2 or u.shape[1] != w.shape[0]:
        raise ValueError(f"nnls_jacobian expects u [n, r] and W [r, c], got {tuple(u.shape)} and {tuple(w.shape)}")
    w = w.to(device=u.device, dtype=u.dtype)
    rhs = w.unsqueeze(0).expand(u.shape[0], -1, -1)  # solve (W_S W_S^T) J_S = W_S, row by row
    return solve_on_support(w @ w.T, rhs, u > 0)


def implicit_concept_maps(activations: Tensor, w: Tensor, u: Tensor | None = None) -> Tensor:
    """Concept attribution maps [B, r, h, w] from latent activations [B, c, h, w] and the concept bank ``W``.

    ``u`` [B, r]: the images' coefficients ``NNLS(mean_hw A, W)`` (computed when not given). See the module
    docstring for the formula; the maps are at the latent resolution (resize them to the image yourself).

    Raises:
        ValueError: ``activations`` not [B, c, h, w].
    """
    if activations.ndim != 4:
        raise ValueError(
            f"implicit concept maps need spatial activations [B, c, h, w], got {tuple(activations.shape)}"
        )
    w = w.to(device=activations.device, dtype=activations.dtype)
    pooled = activations.mean(dim=(2, 3))
    if u is None:
        u = nnls(pooled, w)
    return jacobian_concept_maps(activations, nnls_jacobian(u, w))


def jacobian_concept_maps(activations: Tensor, jacobian: Tensor) -> Tensor:
    """``ReLU(A[:, i, j] . J[k]) / (h w)`` [B, r, h, w] from activations [B, c, h, w] and the derivative ``J``
    [B, r, c] of each image's codes with respect to its spatially averaged activations (module docstring; any
    dictionary's ``code_jacobian``)."""
    if activations.ndim != 4:
        raise ValueError(f"concept maps need spatial activations [B, c, h, w], got {tuple(activations.shape)}")
    height, width = activations.shape[-2:]
    contributions = (jacobian.to(activations) @ activations.flatten(2)).unflatten(-1, (height, width))
    return contributions.clamp_min(0) / (height * width)
