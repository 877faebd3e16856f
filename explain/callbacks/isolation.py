"""Keep a callback's work from changing the training run it watches.

A monitor must leave training bit-for-bit unchanged: same seed, same weights with or without it. Explaining
a model can draw random numbers (SmoothGrad noise, a dataset's transforms, a ``seed=None`` explainer) and
could toggle ``requires_grad``; these context managers put everything back. :func:`isolated` is what the
monitors wrap their work in.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize


@contextlib.contextmanager
def preserved_rng(device: torch.device | None = None) -> Iterator[None]:
    """Restore the global RNGs (Python, NumPy, torch CPU and the CUDA ``device``) on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = [device] if device is not None and torch.device(device).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Set ``requires_grad=False`` on every parameter (no ``.grad`` can be written), restore the flags on exit."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


@contextlib.contextmanager
def isolated(model: nn.Module, device: torch.device | None = None) -> Iterator[None]:
    """Everything a monitor does between two training steps:

    * the global RNGs are restored (:func:`preserved_rng`) and no parameter can get a ``.grad`` (:func:`frozen`);
    * outside ``inference_mode``, so the tensors it keeps (monitor set, metric states, cached weights) are
      normal tensors that a later explanation may use in autograd (an explainer still takes grad itself);
    * parametrized weights (deel-torchlip's spectral / Bjorck normalization, ``torch.nn.utils.parametrize``)
      are computed once rather than at every forward pass: the weights cannot change meanwhile.
    """
    with preserved_rng(device), frozen(model), torch.inference_mode(False), parametrize.cached():
        yield
