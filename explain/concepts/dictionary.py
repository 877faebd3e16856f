"""One interface for the dictionaries that extract concepts: ``A [n, c] ~= U [n, r] @ D [r, c]``.

Concept extraction is dictionary learning (DESIGN section 11): the rows of ``D`` (``dictionary_``, the atoms) are
the concepts, ``U = encode(A)`` their codes, and every method here decodes linearly, ``decode(U) = U @ D``, so
CRAFT's importance and the metrics treat all of them alike. Implementations:

* ``"nmf"``: the project's NMF (:class:`explain.concepts.nmf.NMF`; ``A, U, D >= 0``), CRAFT's default;
* ``"semi_nmf"``, ``"archetypal"``: semi-NMF and archetypal analysis (:mod:`explain.concepts.factorizations`);
* ``"topk_sae"``, ``"batchtopk_sae"``, ``"jumprelu_sae"``, ``"archetypal_sae"``: sparse autoencoders trained on
  the activations (:mod:`explain.concepts.sae`).

``make_dictionary(name, n_concepts, **options)`` builds one by name.

Every dictionary encodes (and differentiates its codes, ``code_jacobian``) ``encode_batch_size`` rows at a time:
rows are independent problems, so the codes do not depend on it (up to float round-off), and ``"auto"`` takes the
largest that fits (:mod:`explain.batching`, starting at :data:`ENCODE_BATCH_SIZE` rows). The fits need every row
at once (NMF, semi-NMF, archetypal analysis) or are optimisations whose result depends on their minibatch (the
SAEs' ``batch_size``), so they are never chunked or halved.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from explain.batching import AutoBatchSize, BatchSize, resolve_batch_size, run_batched
from explain.concepts.implicit import nnls_jacobian
from explain.concepts.nmf import NMF
from explain.concepts.nnls import nnls
from explain.validation import positive_int

Activations = Tensor | DataLoader | Iterable[Tensor]
#: rows encoded at once by default, and the first size ``encode_batch_size="auto"`` tries
ENCODE_BATCH_SIZE = 65536


def check_activations(x: Any, what: str = "activations") -> Tensor:
    """``x`` if it is a floating point matrix [n, c] of finite values, else a clear error."""
    if not isinstance(x, Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a matrix [n, c] (one row per sample), got {shape}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be floating point, got dtype {x.dtype}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} hold NaN or infinite values: fix the layer or the inputs before fitting")
    return x


def batch_tensor(batch: Any) -> Tensor:
    """The activations of one DataLoader batch: the batch itself, its first item (tuple/list) or ``batch["data"]``."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    elif isinstance(batch, dict):
        if "data" not in batch:
            raise ValueError(f"a batch given as a dict needs a 'data' key with the activations, got {sorted(batch)}")
        batch = batch["data"]
    return check_activations(batch, "a batch of activations")


def iterate_batches(data: Activations) -> Iterator[Tensor]:
    """The batches [b, c] of a DataLoader (or any iterable of batches), or the whole matrix once."""
    if isinstance(data, Tensor):
        yield check_activations(data)
        return
    for batch in data:
        yield batch_tensor(batch)


def gather(data: Activations, device: torch.device | None = None) -> Tensor:
    """All the activations as one matrix [n, c] (a DataLoader is read to the end), on ``device`` when given."""
    batches = [b if device is None else b.to(device) for b in iterate_batches(data)]
    if not batches:
        raise ValueError("no activations: the DataLoader gave no batch")
    widths = {b.shape[1] for b in batches}
    if len(widths) > 1:
        raise ValueError(f"batches of activations with different widths {sorted(widths)}")
    return torch.cat(batches)


class Dictionary:
    """A dictionary of ``n_concepts`` atoms ``dictionary_`` [r, c] (module docstring).

    Args:
        n_concepts: r, the number of atoms.
        encode_batch_size: rows encoded at once by :meth:`encode` and :meth:`code_jacobian` (module docstring),
            or ``"auto"``: the largest that fits, remembered per width, dtype and device in ``auto_batch_size``.
        seed: seeds every random choice of the fit (initialisation, minibatches); None: not seeded.
        device: where the fit runs and ``dictionary_`` lives; None: the device of the activations.

    Class attributes: ``name`` (its :func:`make_dictionary` name), ``nonnegative_inputs`` (it needs ``A >= 0``:
    split signed activations with ``sign_split``), ``gives_maps`` (it has :meth:`code_jacobian`, hence CRAFT's
    concept maps).

    A subclass implements ``_fit(data) -> codes of the training rows or None`` (it sets ``dictionary_``) and
    ``_encode(x)``; it stores every ``__init__`` argument under its own name (scikit-learn's rule), which
    :meth:`get_params` reads back.
    """

    name: ClassVar[str] = ""
    nonnegative_inputs: ClassVar[bool] = False
    gives_maps: ClassVar[bool] = False

    def __init__(
        self,
        n_concepts: int,
        *,
        encode_batch_size: BatchSize = ENCODE_BATCH_SIZE,
        seed: int | None = 0,
        device: torch.device | str | None = None,
    ) -> None:
        self.n_concepts = positive_int("n_concepts", n_concepts)
        rows = resolve_batch_size("encode_batch_size", encode_batch_size, type(self).__name__, ENCODE_BATCH_SIZE)
        self.encode_batch_size = encode_batch_size
        #: with ``encode_batch_size="auto"``, what finds and remembers the sizes that fit (None otherwise)
        self.auto_batch_size: AutoBatchSize | None = rows if isinstance(rows, AutoBatchSize) else None
        self.seed = seed
        self.device = torch.device(device) if device is not None else None
        self.dictionary_: Tensor | None = None

    # ------------------------------------------------------------------ public API
    def fit(self, activations: Activations) -> Dictionary:
        """Learn the atoms from ``activations`` [n, c] (a tensor, or a DataLoader of batches [b, c])."""
        self.fit_transform(activations)
        return self

    def fit_transform(self, activations: Activations) -> Tensor:
        """Learn the atoms and return the codes [n, r] of ``activations`` (read twice when it is a DataLoader).

        The fit is a training loop for the SAEs: it runs with autograd on even when called under ``no_grad`` or
        inference mode (``Trainer.predict``, validation hooks); inference-mode activations are cloned for it.
        """
        if isinstance(activations, Tensor) and activations.is_inference():
            with torch.inference_mode(False):
                activations = activations.clone()
        with torch.inference_mode(False), torch.enable_grad():
            codes = self._fit(activations)
        if self.dictionary_ is None:  # pragma: no cover - a subclass bug
            raise RuntimeError(f"{type(self).__name__}._fit did not set dictionary_")
        if not bool(torch.isfinite(self.dictionary_).all()):
            raise FloatingPointError(
                f"{type(self).__name__}: the fit diverged (non-finite atoms); lower the learning rate or rescale "
                "the activations"
            )
        if codes is None:
            return torch.cat([self.encode(batch) for batch in iterate_batches(activations)])
        return codes

    def encode(self, activations: Tensor) -> Tensor:
        """Codes [n, r] of ``activations`` [n, c] with the atoms fixed, on the activations' device."""
        atoms = self._check_fitted()
        x = check_activations(activations)
        if x.shape[1] != atoms.shape[1]:
            raise ValueError(f"activations have {x.shape[1]} channels but the atoms {atoms.shape[1]}")
        self._check_sign(x)
        return self._by_rows("encode", self._encode, x.to(atoms.device, atoms.dtype)).to(x.device, x.dtype)

    def decode(self, codes: Tensor) -> Tensor:
        """Activations [n, c] = ``codes`` [n, r] @ ``dictionary_``."""
        atoms = self._check_fitted()
        if codes.ndim != 2 or codes.shape[1] != atoms.shape[0]:
            raise ValueError(f"codes must be [n, {atoms.shape[0]}], got {tuple(codes.shape)}")
        return (codes.to(atoms) @ atoms).to(codes.device)

    def code_jacobian(self, activations: Tensor) -> Tensor:
        """``d encode(a) / d a`` [n, r, c] at each row of ``activations`` [n, c] (CRAFT's concept maps).

        Raises:
            NotImplementedError: the method's codes have no usable derivative (``gives_maps`` is False).
        """
        raise NotImplementedError(
            f"the {self.name!r} dictionary gives no concept maps: its codes come from an iterative solver with "
            "no derivative here. Use Craft.concept_maps(method='activation'), or the 'nmf', 'semi_nmf' or an SAE "
            "dictionary"
        )

    def get_params(self) -> dict[str, Any]:
        """The ``__init__`` arguments (scikit-learn's ``get_params``): ``type(d)(**d.get_params())`` is an unfitted
        twin."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    # ------------------------------------------------------------------ for subclasses
    def _fit(self, activations: Activations) -> Tensor | None:
        raise NotImplementedError

    def _encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _check_fitted(self) -> Tensor:
        if self.dictionary_ is None:
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call fit(activations) first")
        return self.dictionary_

    def _check_sign(self, x: Tensor) -> None:
        if self.nonnegative_inputs and x.numel() and float(x.min()) < 0:
            raise ValueError(
                f"the {self.name!r} dictionary needs nonnegative activations, got min {float(x.min()):.4g}: take "
                "activations after a ReLU, split signed ones (explain.concepts.split_model(..., sign_split=True)), "
                "or use a dictionary for signed data ('semi_nmf', 'archetypal' or an SAE)"
            )

    def _by_rows(self, what: str, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """``cat([fn(chunk) for chunk in x.split(encode_batch_size)])``, halved on out-of-memory with ``"auto"``
        (``fn`` must treat rows independently)."""
        rows = self.auto_batch_size if self.auto_batch_size is not None else self.encode_batch_size
        key = (what, *x.shape[1:], x.dtype, x.device)
        run = lambda size: torch.cat([fn(chunk) for chunk in x.split(size)])  # noqa: E731
        return run_batched(rows, key, x.device, run, x.shape[0])

    def _fit_device(self, x: Tensor) -> torch.device:
        return self.device if self.device is not None else x.device

    def __repr__(self) -> str:
        state = "fitted" if self.dictionary_ is not None else "not fitted"
        return f"{type(self).__name__}(n_concepts={self.n_concepts}, {state})"


class NNLSCodes(Dictionary):
    """A dictionary whose codes are the exact NNLS ``argmin_{U >= 0} ||A - U D||`` with the atoms fixed (NMF,
    semi-NMF); their derivative is the implicit one of :func:`explain.concepts.implicit.nnls_jacobian`."""

    def _encode(self, x: Tensor) -> Tensor:
        return nnls(x, self.dictionary_)

    def code_jacobian(self, activations: Tensor) -> Tensor:
        """Implicit derivative of the NNLS codes: rows of the active set ``(D_S D_S^T)^-1 D_S``, others 0."""
        atoms = self._check_fitted()
        x = check_activations(activations).to(atoms)
        return self._by_rows("code_jacobian", lambda rows: nnls_jacobian(nnls(rows, atoms), atoms), x)


class NMFDictionary(NNLSCodes):
    """The project's NMF (:class:`explain.concepts.nmf.NMF`, accelerated HALS from NNDSVDa): ``A, U, D >= 0``.

    ``encode`` is the exact NNLS ``argmin_{U >= 0} ||A - U D||`` (CRAFT's ``transform``); its derivative is the
    implicit one of :func:`explain.concepts.implicit.nnls_jacobian`. Options: those of ``NMF`` (``init``,
    ``max_iter``, ``tol``, ``inner_iter``, ``warmup``), ``encode_batch_size``, ``seed`` and ``device``. The fitted
    ``NMF`` is ``factorizer_``. A DataLoader is read whole (NMF needs every row at once).
    """

    name = "nmf"
    nonnegative_inputs = True
    gives_maps = True

    def __init__(
        self,
        n_concepts: int,
        *,
        init: str = "nndsvda",
        max_iter: int = 200,
        tol: float = 1e-4,
        inner_iter: int = 4,
        warmup: int = 10,
        encode_batch_size: BatchSize = ENCODE_BATCH_SIZE,
        seed: int | None = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(n_concepts, encode_batch_size=encode_batch_size, seed=seed, device=device)
        self.init, self.max_iter, self.tol, self.inner_iter, self.warmup = init, max_iter, tol, inner_iter, warmup
        self.factorizer_ = self._factorizer()  # checks the options now

    def _factorizer(self) -> NMF:
        return NMF(self.n_concepts, init=self.init, max_iter=self.max_iter, tol=self.tol,
                   inner_iter=self.inner_iter, warmup=self.warmup, seed=self.seed)

    def _fit(self, activations: Activations) -> Tensor:
        x = gather(activations, self.device)
        self._check_sign(x)
        self.factorizer_ = self._factorizer()
        codes = self.factorizer_.fit_transform(x)
        self.dictionary_ = self.factorizer_.W
        return codes



def _registry() -> dict[str, type[Dictionary]]:
    from explain.concepts.factorizations import ArchetypalAnalysis, SemiNMF
    from explain.concepts.sae import ArchetypalSAE, BatchTopKSAE, JumpReLUSAE, TopKSAE

    classes = (NMFDictionary, SemiNMF, ArchetypalAnalysis, TopKSAE, BatchTopKSAE, JumpReLUSAE, ArchetypalSAE)
    return {cls.name: cls for cls in classes}


def dictionary_names() -> tuple[str, ...]:
    """The names :func:`make_dictionary` knows."""
    return tuple(_registry())


def make_dictionary(name: str, n_concepts: int, **options: Any) -> Dictionary:
    """The dictionary called ``name`` with ``n_concepts`` atoms and its ``options`` (module docstring).

    Raises:
        ValueError: an unknown ``name`` (the message lists the known ones), or an option the method refuses.
        TypeError: an option the method does not take.

    >>> make_dictionary("nmf", 4, max_iter=50)
    NMFDictionary(n_concepts=4, not fitted)
    """
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown dictionary {name!r}: choose one of {', '.join(registry)}")
    return registry[name](n_concepts, **options)
