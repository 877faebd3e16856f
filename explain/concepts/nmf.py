"""Nonnegative matrix factorization ``X ~= U W`` in torch (runs on the device of ``X``).

CRAFT factorizes the activations ``X`` [n, c] of n crops into concept coefficients ``U`` [n, r] and a concept
bank ``W`` [r, c] (Fel et al. 2023, "CRAFT: Concept Recursive Activation FacTorization for Explainability"),
minimizing ``||X - U W||_F`` with ``U, W >= 0``.

* init: NNDSVD (Boutsidis & Gallopoulos 2008), as scikit-learn's ``init="nndsvd"``; ``"nndsvda"`` (the
  reference's) fills its zeros with ``mean(X)``. The truncated SVD is randomized (as scikit-learn's) from a
  generator seeded with ``seed``, so the whole fit is deterministic given ``X`` and ``seed``.
* solver: accelerated HALS (Gillis & Glineur 2012): each iteration updates ``U`` then ``W`` by exact
  coordinate descent over the r components (:func:`~explain.concepts.nnls.hals_sweeps`, the update of
  scikit-learn's "cd" solver), doing ``inner_iter`` sweeps per factor while the products ``X W^T`` and
  ``U^T X`` (the expensive part, O(ncr)) are reused. The first ``warmup`` iterations do one sweep each, as
  scikit-learn: several sweeps straight from the NNDSVD start tend to settle in worse local minima (up to
  10% higher error on CNN activations), while one-sweep iterations first lead to the basin that
  scikit-learn finds, which the faster iterations then descend.
* stopping: after ``max_iter`` iterations, or when the error decreased by less than ``tol`` (relative)
  per iteration over the last 10 iterations, checked every 10 iterations (``tol <= 0``: always ``max_iter``). The error
  ``||X - U W||_F`` is tracked at no extra cost from the products the updates use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from explain.concepts.nnls import hals_sweeps, nnls
from explain.validation import non_negative_int, one_of, positive_int

Init = Literal["nndsvda", "nndsvd", "random"]
_TINY = 1e-30
_WINDOW = 10  # iterations over which the relative decrease of the error is averaged to stop


def _check_matrix(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"NMF factorizes a matrix [n, c], got {shape}")
    if not x.is_floating_point():
        raise TypeError(f"NMF needs a floating point matrix, got dtype {x.dtype}")
    if x.numel() and float(x.min()) < 0:
        raise ValueError(
            f"NMF needs a nonnegative matrix, got min {float(x.min()):.4g}: take activations after a ReLU "
            "(or split signed activations into positive and negative parts)"
        )


def top_singular_triplets(
    x: Tensor, rank: int, *, oversample: int = 10, power_iter: int | None = None, seed: int | None = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``rank`` leading singular triplets of ``x`` [n, c]: ``U`` [n, r], ``S`` [r], ``V`` [c, r].

    Randomized SVD (Halko, Martinsson & Tropp 2011, as scikit-learn's ``randomized_svd``): a Gaussian test
    matrix of ``rank + oversample`` columns drawn from a generator seeded with ``seed``, ``power_iter`` power
    iterations (default 7 when ``rank < 0.1 min(n, c)``, else 4) re-orthonormalized by QR, then the exact
    SVD of the small projected matrix.
    """
    width = min(rank + oversample, *x.shape)
    if power_iter is None:
        power_iter = 7 if rank < 0.1 * min(x.shape) else 4
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed) if seed is not None else generator.seed()
    test = torch.randn(x.shape[1], width, generator=generator, device=x.device, dtype=x.dtype)
    basis = torch.linalg.qr(x @ test).Q
    for _ in range(power_iter):
        basis = torch.linalg.qr(x @ torch.linalg.qr(x.T @ basis).Q).Q
    small_u, s, vh = torch.linalg.svd((basis.T @ x).double(), full_matrices=False)
    return (basis.double() @ small_u)[:, :rank], s[:rank], vh[:rank].T


def nndsvd_init(
    x: Tensor, rank: int, *, fill: Literal["zeros", "mean"] = "mean", eps: float = 1e-6, seed: int | None = 0
) -> tuple[Tensor, Tensor]:
    """NNDSVD start ``(U [n, r], W [r, c])`` of Boutsidis & Gallopoulos (2008); ``fill="mean"`` is NNDSVDa.

    Component 0 is ``sqrt(s_0) |u_0| |v_0|^T``; component j > 0 keeps the larger (by ``|x_+| |y_+|`` against
    ``|x_-| |y_-|``) of the positive and negative parts of the j-th singular pair, scaled by
    ``sqrt(s_j sigma)``. Entries below ``eps`` are zeroed, then set to ``mean(X)`` for NNDSVDa.

    Raises:
        ValueError: ``x`` not a nonnegative matrix, ``rank`` outside ``[1, min(n, c)]``, or an unknown ``fill``.
        TypeError: ``x`` not floating point.
    """
    _check_matrix(x)
    one_of("fill", fill, ("zeros", "mean"))
    if not 1 <= rank <= min(x.shape):
        raise ValueError(f"NNDSVD needs 1 <= rank <= min(n, c) = {min(x.shape)}, got rank={rank}")
    left, s, right = top_singular_triplets(x, rank, seed=seed)  # [n, r], [r], [c, r]
    left_pos, left_neg = left.clamp_min(0), (-left).clamp_min(0)
    right_pos, right_neg = right.clamp_min(0), (-right).clamp_min(0)
    norms = [t.norm(dim=0) for t in (left_pos, left_neg, right_pos, right_neg)]
    mass_pos, mass_neg = norms[0] * norms[2], norms[1] * norms[3]
    positive = mass_pos > mass_neg
    u_part = torch.where(positive, left_pos / norms[0].clamp_min(_TINY), left_neg / norms[1].clamp_min(_TINY))
    w_part = torch.where(positive, right_pos / norms[2].clamp_min(_TINY), right_neg / norms[3].clamp_min(_TINY))
    scale = (s * torch.where(positive, mass_pos, mass_neg)).sqrt()
    # the leading pair is nonnegative up to its sign (Perron-Frobenius): take absolute values
    u_part[:, 0], w_part[:, 0], scale[0] = left[:, 0].abs(), right[:, 0].abs(), s[0].sqrt()
    u, w = u_part * scale, (w_part * scale).T
    u[u < eps], w[w < eps] = 0, 0
    if fill == "mean":
        mean = x.double().mean()
        u[u == 0], w[w == 0] = mean, mean
    return u.to(x.dtype), w.contiguous().to(x.dtype)


def random_init(x: Tensor, rank: int, *, seed: int | None = 0) -> tuple[Tensor, Tensor]:
    """``|N(0, 1)| sqrt(mean(X) / r)`` start, as scikit-learn's ``init="random"``, from a seeded generator."""
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed) if seed is not None else generator.seed()
    scale = (x.mean() / rank).sqrt()
    u = torch.randn(x.shape[0], rank, generator=generator, device=x.device, dtype=x.dtype).abs() * scale
    w = torch.randn(rank, x.shape[1], generator=generator, device=x.device, dtype=x.dtype).abs() * scale
    return u, w


def _squared_error(x_norm2: Tensor, ut_x: Tensor, ut_u: Tensor, w: Tensor) -> Tensor:
    """``||X - U W||^2 = ||X||^2 - 2 <U^T X, W> + <U^T U, W W^T>`` without forming ``U W`` (float64)."""
    w = w.double()
    return x_norm2 - 2 * (ut_x.double() * w).sum() + (ut_u.double() * (w @ w.T)).sum()


INITS: tuple[str, ...] = ("nndsvda", "nndsvd", "random")


def nmf(
    x: Tensor, rank: int, *, callback: Callable[[int, float], bool | None] | None = None, **options: Any
) -> tuple[Tensor, Tensor]:
    """Factorize ``x`` [n, c] >= 0 as ``U`` [n, r] @ ``W`` [r, c], both >= 0 (module docstring): the factors of
    ``NMF(rank, **options).fit_transform(x, callback=callback)``.

    ``options``: those of :class:`NMF` (``init="nndsvda"``, ``max_iter=200``, ``tol=1e-4``, ``inner_iter=4``,
    ``warmup=10``, ``seed=0``). ``callback(iteration, error)``, if given, is called after every iteration with
    the Frobenius error ``||X - U W||_F``; returning True stops the fit.

    Raises:
        ValueError: ``x`` is not a nonnegative matrix, ``rank`` is not in ``[1, min(n, c)]``, an unknown
            ``init``, or ``max_iter``, ``inner_iter`` not positive ints or ``warmup`` negative.
        TypeError: ``x`` is not floating point, or an unknown option.

    >>> import torch
    >>> x = torch.rand(6, 2) @ torch.rand(2, 5)  # a nonnegative matrix of rank 2
    >>> u, w = nmf(x, 2, max_iter=500, tol=0)
    >>> u.shape, w.shape, bool((u >= 0).all() and (w >= 0).all())
    (torch.Size([6, 2]), torch.Size([2, 5]), True)
    >>> bool(reconstruction_error(x, u, w) < 1e-2 * x.norm())
    True
    """
    factorizer = NMF(rank, **options)
    u = factorizer.fit_transform(x, callback=callback)
    return u, factorizer.W


def reconstruction_error(x: Tensor, u: Tensor, w: Tensor) -> Tensor:
    """Frobenius norm ``||X - U W||_F`` (scikit-learn's ``reconstruction_err_``)."""
    return torch.linalg.matrix_norm(x - u @ w)


class NMF:
    """``NMF(rank, **options)``: the factorization of the module docstring on ``fit``,
    :func:`~explain.concepts.nnls.nnls` with ``W`` fixed on ``transform`` (:func:`nmf` is ``fit_transform`` once).

    After ``fit(X)``: ``W`` [r, c] (the components, scikit-learn's ``components_``), ``error`` (final
    Frobenius error) and ``n_iter``.

    Raises:
        ValueError: ``rank``, ``max_iter`` or ``inner_iter`` not a positive int, ``warmup`` negative, or an unknown
            ``init``; at ``fit``, a matrix that is not nonnegative [n, c].
        RuntimeError: ``transform`` before ``fit``.

    >>> import torch
    >>> x = torch.rand(8, 2) @ torch.rand(2, 6)
    >>> factorizer = NMF(2, max_iter=500, tol=0).fit(x)
    >>> factorizer.W.shape, factorizer.transform(x[:3]).shape
    (torch.Size([2, 6]), torch.Size([3, 2]))
    """

    def __init__(
        self,
        rank: int = 10,
        *,
        init: Init = "nndsvda",
        max_iter: int = 200,
        tol: float = 1e-4,
        inner_iter: int = 4,
        warmup: int = 10,
        seed: int | None = 0,
    ) -> None:
        self.rank = positive_int("rank", rank)
        self.init = one_of("init", init, INITS)
        self.max_iter = positive_int("max_iter", max_iter)
        self.tol = tol
        self.inner_iter = positive_int("inner_iter", inner_iter)
        self.warmup = non_negative_int("warmup", warmup)
        self.seed = seed
        self.W: Tensor | None = None
        self.error: float | None = None
        self.n_iter = 0

    def fit_transform(self, x: Tensor, *, callback: Callable[[int, float], bool | None] | None = None) -> Tensor:
        """Fit on ``x`` [n, c] and return its coefficients ``U`` [n, r]; ``callback`` as in :func:`nmf`."""
        _check_matrix(x)
        u, w = self._initial_factors(x)
        ut, xt = u.T.contiguous(), x.T.contiguous()  # U is kept transposed: its rows are the components
        x_norm2 = x.double().square().sum()
        # errors stay on the device: the host reads them only for a callback or once per stopping window (no per-step
        # GPU sync)
        errors: list[Tensor] = []
        for iteration in range(self.max_iter):
            sweeps = 1 if iteration < self.warmup else self.inner_iter
            hals_sweeps(ut, w @ w.T, w @ xt, sweeps)  # U-step: min_U ||X^T - W^T U^T||
            ut_x = ut @ x
            ut_u = ut @ ut.T
            hals_sweeps(w, ut_u, ut_x, sweeps)  # W-step: min_W ||X - U W||
            errors.append(_squared_error(x_norm2, ut_x, ut_u, w).clamp_min(0).sqrt())
            if callback is not None and callback(iteration, float(errors[-1])):
                break
            if self.tol > 0 and iteration >= self.warmup + _WINDOW and (iteration - self.warmup) % _WINDOW == 0:
                if float(errors[-1 - _WINDOW] - errors[-1] - _WINDOW * self.tol * errors[-1]) <= 0:
                    break
        self.W, self.n_iter = w, len(errors)
        self.error = float(errors[-1]) if errors else None
        return ut.T.contiguous()

    def _initial_factors(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.init == "random":
            return random_init(x, self.rank, seed=self.seed)
        return nndsvd_init(x, self.rank, fill="mean" if self.init == "nndsvda" else "zeros", seed=self.seed)

    def fit(self, x: Tensor) -> NMF:
        """Fit on ``x`` [n, c]; the factors are ``W`` and the return value of :meth:`fit_transform`."""
        self.fit_transform(x)
        return self

    def transform(self, x: Tensor) -> Tensor:
        """Coefficients ``U`` [n, r] of new rows ``x`` [n, c]: NNLS with the fitted ``W`` fixed.

        Raises:
            RuntimeError: called before ``fit``.
            ValueError: ``x`` not a nonnegative matrix [n, c].
            TypeError: ``x`` not floating point.
        """
        if self.W is None:
            raise RuntimeError("NMF.transform called before fit: call fit(x) or fit_transform(x) first")
        _check_matrix(x)
        return nnls(x, self.W)

    def __repr__(self) -> str:
        return f"NMF(rank={self.rank}, init={self.init!r}, max_iter={self.max_iter}, tol={self.tol})"
