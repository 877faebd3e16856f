"""Sparse autoencoders as :class:`~explain.concepts.dictionary.Dictionary`: overcomplete's modules and losses,
trained by a short loop here.

An SAE encodes ``z = sparsify(E(a))`` (``E`` overcomplete's linear encoder, ``z >= 0``) and decodes
``a_hat = z D`` with atoms ``D`` [r, c] of unit norm; inputs may be signed (ViT tokens need no ``sign_split``).

* ``"topk_sae"``: keep the ``top_k`` largest codes of each row (Gao et al. 2024, "Scaling and evaluating sparse
  autoencoders"); loss: MSE + AuxK (overcomplete's ``top_k_auxiliary_loss``, which revives dead codes).
* ``"batchtopk_sae"``: keep the ``top_k * batch`` largest codes of the batch, and a running threshold at
  inference (Bussmann et al. 2024); loss as TopK.
* ``"jumprelu_sae"``: ``z = pre * (pre > exp(theta))`` with learned thresholds and a kernel pseudo-gradient
  (Rajamanoharan et al. 2024); loss: MSE + ``sparsity_penalty`` * L1 of the codes (overcomplete's ``mse_l1``).
* ``"archetypal_sae"``: TopK with a relaxed archetypal dictionary, atoms ``W C + Relax`` near the convex hull of
  ``n_candidates`` data points ``C`` (Fel et al. 2025, "Archetypal SAE"); loss as TopK.

Training (:meth:`SparseAutoencoder._fit`): on the activations' device (or ``device``), Adam at ``lr``, ``epochs``
passes over minibatches of ``batch_size`` rows (a tensor is shuffled each epoch by a generator seeded with
``seed``; a DataLoader is used as it comes), gradient norm clipped at ``clip_grad``, a rich progress bar
(``progress=False`` hides it). The weights are initialised inside :func:`torch.random.fork_rng` seeded with
``seed``. The loss stays on the device; it is read every ``check_every`` steps to stop with an error on NaN.
``code_jacobian`` is the encoder's own gradient, ``d z / d a`` by autograd.

``batch_size`` is the training minibatch: it changes the fit (the steps, and BatchTopK's codes), so it takes no
``"auto"``. ``encode_batch_size`` (rows per encoding pass, ``"auto"`` allowed) does not change the codes.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from explain.batching import BatchSize
from explain.concepts.dictionary import (
    ENCODE_BATCH_SIZE,
    Activations,
    Dictionary,
    check_activations,
    iterate_batches,
)
from explain.concepts.factorizations import seeded
from explain.concepts.overcomplete_import import sae as oc_sae
from explain.validation import in_interval, positive_int


class SparseAutoencoder(Dictionary):
    """Common training loop and options of the SAEs (module docstring).

    Args:
        n_concepts: r, the number of atoms (may exceed the channels: overcomplete).
        top_k: active codes per row (TopK, BatchTopK, Archetypal); default ``max(r // 10, 1)``.
        epochs, batch_size, lr, clip_grad: the training loop's (module docstring); ``batch_size`` is not
            ``"auto"`` (it changes the fit), ``encode_batch_size`` may be.
        progress: show a rich progress bar.
        check_every: steps between the NaN checks of the loss (each reads it on the host once).
        seed, device: see :class:`~explain.concepts.dictionary.Dictionary`.
    """

    criterion: ClassVar[Any] = staticmethod(oc_sae.losses.top_k_auxiliary_loss)

    def __init__(
        self,
        n_concepts: int,
        *,
        top_k: int | None = None,
        epochs: int = 30,
        batch_size: int = 128,
        lr: float = 3e-3,
        clip_grad: float | None = 1.0,
        progress: bool = True,
        check_every: int = 50,
        encode_batch_size: BatchSize = ENCODE_BATCH_SIZE,
        seed: int | None = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(n_concepts, encode_batch_size=encode_batch_size, seed=seed, device=device)
        self.top_k = positive_int("top_k", top_k, allow_none=True)
        if top_k is not None and top_k > n_concepts:
            raise ValueError(f"top_k={top_k} is more than n_concepts={n_concepts}")
        self.epochs = positive_int("epochs", epochs)
        if batch_size == "auto":
            raise ValueError(
                f"{self.name}: batch_size is the training minibatch, which changes the fit, so it is not chosen "
                "automatically; give an int (encode_batch_size='auto' sizes the encoding passes)"
            )
        self.batch_size = positive_int("batch_size", batch_size)
        self.lr = in_interval("lr", lr, 0, low_open=True)
        self.clip_grad = clip_grad
        self.progress = progress
        self.check_every = positive_int("check_every", check_every)
        self.model_: nn.Module | None = None
        self.losses_: list[float] = []

    @property
    def k(self) -> int:
        """Active codes per row."""
        return self.top_k if self.top_k is not None else max(self.n_concepts // 10, 1)

    def _build(self, channels: int, sample: Tensor) -> nn.Module:
        raise NotImplementedError

    def _start(self, model: nn.Module, sample: Tensor) -> nn.Module:
        """Atoms at ``r`` distinct random rows of ``sample`` (unit norm), the encoder at their transpose (Gao et al.
        2024 start the encoder at the decoder's transpose; data rows as atoms avoid the poor minima of a random
        start)."""
        if sample.shape[0] < self.n_concepts:
            raise ValueError(
                f"{self.name} needs at least n_concepts={self.n_concepts} rows to start, got {sample.shape[0]}"
            )
        rows = sample[torch.randperm(sample.shape[0], device=sample.device)[: self.n_concepts]]
        atoms = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        with torch.no_grad():
            model.dictionary._weights.copy_(atoms)
            model.encoder.final_block[0].weight.copy_(atoms)
            model.encoder.final_block[0].bias.zero_()
        return model

    def _loss(self, x: Tensor, model: nn.Module) -> Tensor:
        pre_codes, codes, x_hat = model(x)
        return self.criterion(x, x_hat, pre_codes, codes, model.get_dictionary())

    def _batches(self, data: Activations, generator: torch.Generator, device: torch.device):
        if isinstance(data, Tensor):
            order = torch.randperm(data.shape[0], generator=generator).to(data.device)
            for index in order.split(self.batch_size):
                yield data[index].to(device, non_blocking=True)
        else:
            for batch in iterate_batches(data):
                yield batch.to(device, non_blocking=True)

    def _fit(self, activations: Activations) -> None:
        first = next(iter(iterate_batches(activations)), None)
        if first is None:
            raise ValueError("no activations: the DataLoader gave no batch")
        device = self._fit_device(first)
        if isinstance(activations, Tensor):
            sample = activations
            steps = -(-activations.shape[0] // self.batch_size) * self.epochs
        else:
            sample = first
            steps = len(activations) * self.epochs if hasattr(activations, "__len__") else None
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else torch.Generator()
        with seeded(self.seed, device):
            model = self._build(first.shape[1], sample.to(device)).to(device)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        self.losses_, running, since_check = [], torch.zeros((), device=device), 0
        columns = (TextColumn(f"{self.name} training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, disable=not self.progress, transient=True) as bar:
            task = bar.add_task("train", total=steps)
            for epoch in range(self.epochs):
                for x in self._batches(activations, generator, device):
                    optimizer.zero_grad(set_to_none=True)
                    loss = self._loss(x, model)
                    loss.backward()
                    if self.clip_grad:
                        nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad)
                    optimizer.step()
                    running += loss.detach()
                    since_check += 1
                    if since_check == self.check_every:
                        self._check_loss(running, since_check, epoch)
                        running.zero_()
                        since_check = 0
                    bar.advance(task)
            if since_check:
                self._check_loss(running, since_check, self.epochs - 1)
        model.eval()  # overcomplete fuses the dictionary in eval mode
        self.model_ = model
        self.dictionary_ = model.get_dictionary().detach().clone()
        return None

    def _check_loss(self, running: Tensor, steps: int, epoch: int) -> None:
        mean = float(running) / steps
        if mean != mean or mean in (float("inf"), float("-inf")):
            raise FloatingPointError(
                f"{self.name}: the training loss is not finite in epoch {epoch}: lower lr, or rescale the activations"
            )
        self.losses_.append(mean)

    def _encode(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model_.encode(x)[1]

    def code_jacobian(self, activations: Tensor) -> Tensor:
        """The encoder's own gradient ``d z_k / d a`` [n, r, c] by autograd (rows are independent in eval mode)."""
        atoms = self._check_fitted()
        x = check_activations(activations).to(atoms).detach()
        return self._by_rows("code_jacobian", self._jacobian, x)

    def _jacobian(self, x: Tensor) -> Tensor:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            codes = self.model_.encode(x)[1]
            rows = [torch.autograd.grad(codes[:, k].sum(), x, retain_graph=True)[0] for k in range(codes.shape[1])]
        return torch.stack(rows, dim=1).detach()


class TopKSAE(SparseAutoencoder):
    """TopK SAE (module docstring)."""

    name = "topk_sae"
    gives_maps = True

    def _build(self, channels: int, sample: Tensor) -> nn.Module:
        return self._start(oc_sae.TopKSAE(channels, self.n_concepts, top_k=self.k, device=sample.device), sample)


class BatchTopKSAE(SparseAutoencoder):
    """BatchTopK SAE (module docstring): ``top_k`` active codes per row on average over a batch."""

    name = "batchtopk_sae"
    gives_maps = True

    def _build(self, channels: int, sample: Tensor) -> nn.Module:
        return self._start(oc_sae.BatchTopKSAE(channels, self.n_concepts, top_k=self.k, device=sample.device), sample)

    def _loss(self, x: Tensor, model: nn.Module) -> Tensor:
        model.top_k = self.k * x.shape[0]  # overcomplete counts the codes kept over the whole batch
        return super()._loss(x, model)


class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU SAE (module docstring). Extra options: ``sparsity_penalty=1e-4`` (times overcomplete's L1 of the
    codes, summed over the batch: scale it with ``batch_size``),
    ``bandwidth=1e-3`` and ``kernel="silverman"`` (the threshold's pseudo-gradient)."""

    name = "jumprelu_sae"
    gives_maps = True

    def __init__(
        self,
        n_concepts: int,
        *,
        sparsity_penalty: float = 1e-4,
        bandwidth: float = 1e-3,
        kernel: str = "silverman",
        top_k: int | None = None,
        epochs: int = 30,
        batch_size: int = 128,
        lr: float = 3e-3,
        clip_grad: float | None = 1.0,
        progress: bool = True,
        check_every: int = 50,
        encode_batch_size: BatchSize = ENCODE_BATCH_SIZE,
        seed: int | None = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(n_concepts, top_k=top_k, epochs=epochs, batch_size=batch_size, lr=lr, clip_grad=clip_grad,
                         progress=progress, check_every=check_every, encode_batch_size=encode_batch_size, seed=seed,
                         device=device)
        self.sparsity_penalty = in_interval("sparsity_penalty", sparsity_penalty, 0)
        self.bandwidth = in_interval("bandwidth", bandwidth, 0, low_open=True)
        if kernel not in oc_sae.JumpSAE._KERNELS:
            raise ValueError(f"kernel must be one of {sorted(oc_sae.JumpSAE._KERNELS)}, got {kernel!r}")
        self.kernel = kernel

    def _build(self, channels: int, sample: Tensor) -> nn.Module:
        model = oc_sae.JumpSAE(channels, self.n_concepts, kernel=self.kernel, bandwidth=self.bandwidth,
                               device=sample.device)
        return self._start(model, sample)

    def _loss(self, x: Tensor, model: nn.Module) -> Tensor:
        pre_codes, codes, x_hat = model(x)
        return oc_sae.losses.mse_l1(x, x_hat, pre_codes, codes, model.get_dictionary(),
                                    penalty=self.sparsity_penalty)


class ArchetypalSAE(SparseAutoencoder):
    """Relaxed Archetypal TopK SAE (module docstring). Extra options: ``n_candidates=1024`` data points (drawn
    with ``seed`` from the training rows; from the first batch of a DataLoader) and ``delta=1.0`` (the bound on
    the relaxation's norm)."""

    name = "archetypal_sae"
    gives_maps = True

    def __init__(
        self,
        n_concepts: int,
        *,
        n_candidates: int = 1024,
        delta: float = 1.0,
        top_k: int | None = None,
        epochs: int = 30,
        batch_size: int = 128,
        lr: float = 3e-3,
        clip_grad: float | None = 1.0,
        progress: bool = True,
        check_every: int = 50,
        encode_batch_size: BatchSize = ENCODE_BATCH_SIZE,
        seed: int | None = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(n_concepts, top_k=top_k, epochs=epochs, batch_size=batch_size, lr=lr, clip_grad=clip_grad,
                         progress=progress, check_every=check_every, encode_batch_size=encode_batch_size, seed=seed,
                         device=device)
        self.n_candidates = positive_int("n_candidates", n_candidates)
        self.delta = in_interval("delta", delta, 0)

    def _build(self, channels: int, sample: Tensor) -> nn.Module:
        if sample.shape[0] < self.n_concepts:
            raise ValueError(
                f"archetypal_sae needs at least n_concepts={self.n_concepts} candidate points, got {sample.shape[0]} "
                "rows"
            )
        count = min(self.n_candidates, sample.shape[0])
        points = sample[torch.randperm(sample.shape[0], device=sample.device)[:count]]
        model = oc_sae.RATopKSAE(channels, self.n_concepts, points=points.detach().clone(), top_k=self.k,
                                 delta=self.delta, device=sample.device)
        with torch.no_grad():  # atom i starts at candidate i (not unit norm): encoder rows c_i / |c_i|^2 code it as 1
            start = points[: self.n_concepts]
            model.encoder.final_block[0].weight.copy_(start / start.square().sum(dim=1, keepdim=True).clamp_min(1e-12))
            model.encoder.final_block[0].bias.zero_()
        return model
