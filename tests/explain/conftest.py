"""Fixtures shared by the tests of ``explain``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import pytest
import torch


@pytest.fixture
def quiet_trainer() -> Callable[..., L.Trainer]:
    """``quiet_trainer(**options)``: a Trainer on the CPU with no progress bar, no model summary and no checkpoint
    (what every callback test wants), plus ``options``."""

    def make(**options: Any) -> L.Trainer:
        return L.Trainer(
            accelerator="cpu",
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            **options,
        )

    return make


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for tiny problems: on a shared 2-core machine, BLAS threading only adds synchronisation
    stalls (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
