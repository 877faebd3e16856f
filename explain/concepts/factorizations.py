"""Semi-NMF and archetypal analysis as :class:`~explain.concepts.dictionary.Dictionary`, fitted by overcomplete.

* **Semi-NMF** (Ding, Li & Jordan 2010, "Convex and semi-nonnegative matrix factorizations"): ``A ~= U D`` with
  ``U >= 0`` and ``D`` signed, so signed activations (ViT tokens, pre-ReLU layers) need no ``sign_split``. Fitted
  by overcomplete's ``SemiNMF`` (multiplicative updates); ``encode`` is the exact NNLS ``argmin_{U >= 0}
  ||A - U D||`` of :func:`explain.concepts.nnls.nnls` (the problem overcomplete's encoder approximates
  iteratively), so its derivative is the implicit one of NMF and CRAFT's concept maps work.
* **Archetypal analysis** (Cutler & Breiman 1994): ``A ~= U D`` with ``D = W A`` (each atom a convex combination
  of data points, rows of ``W`` on the simplex) and each row of ``U`` on the simplex. Written here (alternating
  projected gradient with the exact simplex projection): overcomplete 0.3.0's ``ArchetypalAnalysis`` "projects"
  with a softmax, which does not keep a point of the simplex in place, and leaves 91% of the planted data's norm
  unexplained in our test data. No concept maps (``code_jacobian`` raises).

Both read a DataLoader whole (they need every row at once) and are seeded (semi-NMF's random start is drawn from
torch's generator seeded with ``seed`` inside :func:`torch.random.fork_rng`, which restores the global state).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from explain.batching import BatchSize
from explain.concepts.dictionary import ENCODE_BATCH_SIZE, Activations, Dictionary, NNLSCodes, gather
from explain.concepts.overcomplete_import import optimization
from explain.validation import one_of, positive_int


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """torch's global generators seeded with ``seed`` inside the block, restored after it (None: not seeded)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


class SemiNMF(NNLSCodes):
    """Semi-NMF (module docstring): ``U >= 0``, signed atoms. Options: ``max_iter=500``, ``tol=1e-4``,
    ``solver="mu"`` (or ``"pgd"``), ``l1_penalty=0`` (on the codes, overcomplete's), ``encode_batch_size``, ``seed``,
    ``device``."""

    name = "semi_nmf"
    gives_maps = True

    def __init__(
        self,
        n_concepts: int,
        *,
        max_iter: int = 500,
        tol: float = 1e-4,
        solver: str = "mu",
        l1_penalty: float = 0.0,
        encode_batch_size: BatchSize = ENCODE_BATCH_SIZE,
        seed: int | None = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(n_concepts, encode_batch_size=encode_batch_size, seed=seed, device=device)
        self.max_iter = positive_int("max_iter", max_iter)
        self.solver = one_of("solver", solver, ("mu", "pgd"))
        self.tol, self.l1_penalty = tol, l1_penalty

    def _fit(self, activations: Activations) -> Tensor:
        x = gather(activations, self.device)
        device = x.device
        model = optimization.SemiNMF(self.n_concepts, solver=self.solver, device=device, tol=self.tol,
                                     l1_penalty=self.l1_penalty)
        with seeded(self.seed, device):
            model.fit(x, max_iter=self.max_iter)
        self.dictionary_ = model.get_dictionary().detach().to(x.dtype)
        return self._by_rows("encode", self._encode, x)



def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v`` onto the probability simplex (Duchi et al. 2008, sort-based)."""
    ordered = v.sort(dim=1, descending=True).values
    partial = ordered.cumsum(dim=1) - 1
    ranks = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    last = ((ordered - partial / ranks) > 0).to(v.dtype).cumsum(dim=1).argmax(dim=1, keepdim=True)
    theta = partial.gather(1, last) / (last + 1).to(v.dtype)
    return (v - theta).clamp_min(0)


def furthest_sum(x: Tensor, count: int, seed: int | None = 0) -> Tensor:
    """Indices of ``count`` rows of ``x`` far apart (FurthestSum, Moerup & Hansen 2012): from a row drawn with
    ``seed``, add the row with the largest sum of distances to those chosen; the first pick is then dropped and
    redrawn the same way (it was random)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else torch.Generator()
    chosen = [int(torch.randint(x.shape[0], (1,), generator=generator))]
    total = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for _ in range(count):
        total += (x - x[chosen[-1]]).norm(dim=1)
        score = total.clone()
        score[chosen] = -1
        chosen.append(int(score.argmax()))
    return torch.tensor(chosen[1:], device=x.device)


def _simplex_codes(x: Tensor, atoms: Tensor, codes: Tensor, steps: int) -> Tensor:
    """``steps`` projected gradient steps (step ``1 / ||D D^T||_2``) on ``min ||X - Z D||^2``, rows of Z on the
    simplex."""
    gram = atoms @ atoms.T
    step = 1 / torch.linalg.matrix_norm(gram, 2).clamp_min(1e-30)
    cross = x @ atoms.T
    for _ in range(steps):
        codes = project_simplex(codes - step * (codes @ gram - cross))
    return codes


class ArchetypalAnalysis(Dictionary):
    """Archetypal analysis (module docstring): atoms ``D = W A`` in the convex hull of the data, codes on the simplex.

    Alternating projected gradient: ``inner_iter`` steps on the codes ``Z``, then one on ``W`` (step
    ``1 / (||Z^T Z||_2 ||A||_2^2)``), both projected onto the simplex row by row; ``W`` starts at ``r`` data
    points far apart (:func:`furthest_sum`, from a row drawn with ``seed``), ``Z`` at their codes. ``encode``:
    ``encode_iter`` projected gradient steps from uniform codes.
    Options: ``max_iter=500``, ``inner_iter=5``, ``encode_iter=300``, ``encode_batch_size``, ``seed``, ``device``.
    """

    name = "archetypal"

    def __init__(
        self,
        n_concepts: int,
        *,
        max_iter: int = 500,
        inner_iter: int = 5,
        encode_iter: int = 300,
        encode_batch_size: BatchSize = ENCODE_BATCH_SIZE,
        seed: int | None = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(n_concepts, encode_batch_size=encode_batch_size, seed=seed, device=device)
        self.max_iter = positive_int("max_iter", max_iter)
        self.inner_iter = positive_int("inner_iter", inner_iter)
        self.encode_iter = positive_int("encode_iter", encode_iter)
        self.weights_: Tensor | None = None

    def _fit(self, activations: Activations) -> Tensor:
        x = gather(activations, self.device)
        n = x.shape[0]
        if n < self.n_concepts:
            raise ValueError(f"archetypal analysis needs at least n_concepts={self.n_concepts} rows, got {n}")
        chosen = furthest_sum(x, self.n_concepts, self.seed)
        weights = torch.zeros(self.n_concepts, n, device=x.device, dtype=x.dtype)
        weights[torch.arange(self.n_concepts, device=x.device), chosen] = 1
        codes = torch.full((n, self.n_concepts), 1 / self.n_concepts, device=x.device, dtype=x.dtype)
        codes = _simplex_codes(x, weights @ x, codes, self.encode_iter)  # codes of the start first
        data_norm2 = torch.linalg.matrix_norm(x, 2).square()
        for _ in range(self.max_iter):
            atoms = weights @ x
            codes = _simplex_codes(x, atoms, codes, self.inner_iter)
            gradient = (codes.T @ (codes @ atoms - x)) @ x.T
            step = 1 / (torch.linalg.matrix_norm(codes.T @ codes, 2) * data_norm2).clamp_min(1e-30)
            weights = project_simplex(weights - step * gradient)
        self.weights_, self.dictionary_ = weights, weights @ x
        return _simplex_codes(x, self.dictionary_, codes, self.inner_iter)

    def _encode(self, x: Tensor) -> Tensor:
        start = torch.full((x.shape[0], self.n_concepts), 1 / self.n_concepts, device=x.device, dtype=x.dtype)
        return _simplex_codes(x, self.dictionary_, start, self.encode_iter)
