"""The one call signature every explainer shares: ``Explainer(model, **options)(images, targets) -> maps``.

Like captum, one class per method; unlike captum, the base class also makes each method safe to call from
anywhere in a Lightning loop:

* it works when the caller is inside ``torch.no_grad()`` or ``torch.inference_mode()`` (it re-enables grad on
  clones of its own inputs),
* it runs the model in eval mode and restores every submodule's train/eval flag afterwards,
* it never touches the parameters' ``.grad`` (gradients are taken with ``torch.autograd.grad`` w.r.t. inputs),
* it runs on the model's device and returns maps on the device of the images it was given,
* it bounds memory with ``batch_size`` (the number of inputs sent through the model at once); ``"auto"`` finds
  the largest that fits (:mod:`explain.batching`): the explanation runs with a large batch size, halved and run
  again on an out-of-memory error, and the size that fit is remembered per input shape.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from explain.batching import AutoBatchSize, BatchSize
from explain.validation import batch_size_or_auto


def model_device(model: nn.Module, default: torch.device | None = None) -> torch.device:
    """The device of the model's first parameter or buffer (``default`` or CPU for a stateless model)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return default if default is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore the train/eval flag of every submodule on exit."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def grad_enabled() -> Iterator[None]:
    """Leave ``inference_mode``/``no_grad`` for the duration of an explanation."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def check_images_targets(images: Tensor, targets: Tensor | int) -> tuple[Tensor, Tensor]:
    """Validate an explainer's inputs: images [B,C,H,W] floating point, targets int64 [B] (an int is broadcast).

    Raises:
        ValueError: ``images`` not [B, C, H, W], or ``targets`` without one entry per image.
        TypeError: ``images`` not floating point, or ``targets`` not integer class indices.
    """
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor of shape [B, C, H, W], got {shape}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point, got dtype {images.dtype}")
    if isinstance(targets, int):
        targets = torch.full((images.shape[0],), targets, dtype=torch.long, device=images.device)
    if not isinstance(targets, Tensor):
        targets = torch.as_tensor(targets)
    targets = targets.reshape(-1)
    if targets.shape[0] != images.shape[0]:
        raise ValueError(
            f"targets must have one entry per image: {images.shape[0]} images but targets of shape "
            f"{tuple(targets.shape)}"
        )
    if targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"targets must be integer class indices, got dtype {targets.dtype}")
    return images, targets.long()


def batched(fn: Callable[[Tensor], Tensor], inputs: Tensor, batch_size: int) -> Tensor:
    """``torch.cat([fn(chunk) for chunk in inputs.split(batch_size)])``: bounded-memory evaluation."""
    if inputs.shape[0] <= batch_size:
        return fn(inputs)
    return torch.cat([fn(chunk) for chunk in inputs.split(batch_size)])


class Explainer(ABC):
    """Base class: ``Explainer(model, batch_size=64, seed=0)(images [B,C,H,W], targets [B]) -> maps [B,H,W]``.

    Subclasses implement :meth:`explain`, which is called with grad enabled, the model in eval mode, and
    ``images``/``targets`` already cloned (normal tensors, not inference tensors) on the model's device; they read
    the batch size from ``self.batch_size`` (an int, also with ``batch_size="auto"``: :attr:`auto_batch_size` then
    sets it for each attempt).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``batch_size`` neither a positive int nor ``"auto"``; at the call, images or targets as
            :func:`check_images_targets` refuses.
    """

    def __init__(self, model: nn.Module, batch_size: BatchSize = 64, seed: int | None = 0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        batch_size = batch_size_or_auto("batch_size", batch_size)
        #: with ``batch_size="auto"``, what finds and remembers the size that fits (None otherwise)
        self.auto_batch_size = AutoBatchSize(type(self).__name__) if batch_size == "auto" else None
        self.batch_size: int = 64 if batch_size == "auto" else batch_size  # "auto": set at each attempt
        self.seed = seed

    @property
    def name(self) -> str:
        """Short name used as a logging key (``explain/<name>/<metric>``)."""
        return type(self).__name__.lower()

    def __call__(self, images: Tensor, targets: Tensor | int, **options) -> Tensor:
        """Maps [B,H,W]; ``options`` are this call's options, passed on to :meth:`explain` (e.g. EVA's
        ``regions``)."""
        images, targets = check_images_targets(images, targets)
        out_device = images.device
        device = model_device(self.model, default=images.device)
        with grad_enabled(), eval_mode(self.model):
            images = images.detach().to(device).clone()
            targets = targets.detach().to(device).clone()
            if self.auto_batch_size is None:
                maps = self.explain(images, targets, **options)
            else:
                key = (tuple(images.shape[1:]), images.dtype, device)
                run = lambda size: self._explain_with(size, images, targets, options)  # noqa: E731
                maps = self.auto_batch_size(key, device, run)
        if maps.shape != (images.shape[0], *images.shape[-2:]):
            raise RuntimeError(
                f"{type(self).__name__}.explain returned shape {tuple(maps.shape)}, "
                f"expected {(images.shape[0], *images.shape[-2:])}"
            )
        return maps.detach().to(out_device)

    def _explain_with(self, batch_size: int, images: Tensor, targets: Tensor, options: dict) -> Tensor:
        self.batch_size = batch_size
        return self.explain(images, targets, **options)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A fresh generator seeded with ``seed`` (None when ``seed`` is None: global RNG)."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    def forward(self, inputs: Tensor) -> Tensor:
        """Logits of ``inputs`` without building a graph, ``batch_size`` inputs at a time."""
        with torch.no_grad():
            return batched(self.model, inputs, self.batch_size)

    @abstractmethod
    def explain(self, images: Tensor, targets: Tensor) -> Tensor:
        """Return maps [B,H,W] for ``images`` [B,C,H,W] and ``targets`` [B] (see class docstring)."""

    def __repr__(self) -> str:
        batch_size = "'auto'" if self.auto_batch_size is not None else self.batch_size
        return f"{type(self).__name__}(model={type(self.model).__name__}, batch_size={batch_size})"
