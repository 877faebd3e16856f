"""``batch_size="auto"``: the largest batch that fits in memory, found once per model and input shape.

:class:`AutoBatchSize` runs a computation with a batch size, starting large; on an out-of-memory error it halves
the size and runs it again, until it fits (or a size of 1 does not). The size that fit is remembered per key
(the explainer's model is fixed, so the key is the input shape, dtype and device) and logged once.

Out-of-memory errors it recognises: CUDA's (``torch.OutOfMemoryError``) and the CPU allocator's refusal
(``RuntimeError: DefaultCPUAllocator: can't allocate memory``). On the CPU, Linux usually grants memory it does
not have and later kills the process (the OOM killer), which no program can catch: the CPU start is therefore
moderate (:data:`CPU_START`), and a refusal only comes for requests larger than the machine.

Halving and rerunning gives the same result as a fixed batch size for every computation whose result does not
depend on how its inputs are chunked (all of ``explain``'s: their noise, designs and crops are drawn per call or
per step, not per chunk). Only such computations take ``"auto"``: a size that changes the result (an SAE's
training minibatch) never does.

:func:`run_batched` is the one entry point of the chunked computations that are not explainers (CRAFT, MACO, the
dictionaries' encoding): ``run(size)`` with a fixed size, or with the size an :class:`AutoBatchSize` finds.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Hashable
from typing import Literal, TypeVar, Union

import torch

from explain.validation import batch_size_or_auto

T = TypeVar("T")
#: an explainer's ``batch_size``: inputs per pass, or ``"auto"`` (the largest that fits)
BatchSize = Union[int, Literal["auto"]]
log = logging.getLogger(__name__)

#: first batch size tried on an accelerator (CUDA, MPS, ...) and on the CPU
ACCELERATOR_START = 1024
CPU_START = 64


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA's out-of-memory error and the CPU allocator's ``can't allocate memory``."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error)


def release_cached_memory() -> None:
    """Give the CUDA caching allocator's free blocks back after a failed attempt (the failed attempt's tensors are
    gone once its exception is)."""
    if torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


class AutoBatchSize:
    """``AutoBatchSize()(key, device, run)``: ``run(batch_size)`` with the largest batch size that fits, halving
    from the remembered size for ``key`` (or from :data:`ACCELERATOR_START` / :data:`CPU_START` on ``device``).

    ``fitted`` maps each key to the size that fit; it is logged once (``INFO``, logger ``explain.batching``), and
    again only if a later call has to lower it. ``start`` replaces both first sizes (e.g. rows of activations
    encoded at once, far more than images).

    Raises:
        torch.OutOfMemoryError: (or the CPU allocator's ``RuntimeError``) when even a batch of 1 does not fit;
            any other error is raised at once, unchanged.
    """

    def __init__(self, name: str = "explainer", start: int | None = None) -> None:
        self.name = name
        self.start = start
        self.fitted: dict[Hashable, int] = {}

    def __call__(self, key: Hashable, device: torch.device, run: Callable[[int], T], total: int | None = None) -> T:
        """``run(size)`` with the largest size that fits; ``total``, the number of inputs ``run`` splits: a size
        above it that fails is halved from ``total`` (every size above it is one chunk of them all)."""
        start = self.start or (CPU_START if torch.device(device).type == "cpu" else ACCELERATOR_START)
        size = self.fitted.get(key, start)
        while True:
            try:
                result = run(size)
                break
            except RuntimeError as error:
                if not is_out_of_memory(error) or size == 1:
                    raise
            # out of the except block: the failed attempt's frames and tensors are released before the next one
            release_cached_memory()
            size = min(size, total or size) // 2
        if self.fitted.get(key) != size:  # found, or lowered by a larger input of the same shape later
            log.info("%s: batch_size='auto' uses %d for %s", self.name, size, key)
        self.fitted[key] = size
        return result

    def __repr__(self) -> str:
        return f"AutoBatchSize({self.name!r}, fitted={self.fitted})"


def resolve_batch_size(
    name: str, value: BatchSize | AutoBatchSize, owner: str, start: int | None = None
) -> int | AutoBatchSize:
    """``value`` if it is a positive int or an :class:`AutoBatchSize` (shared with whoever made it), a new
    ``AutoBatchSize(owner, start)`` for ``"auto"``.

    Raises:
        ValueError: ``value`` none of those (the message names ``name``).
    """
    if isinstance(value, AutoBatchSize):
        return value
    return AutoBatchSize(owner, start) if batch_size_or_auto(name, value) == "auto" else value


def run_batched(
    batch_size: int | AutoBatchSize, key: Hashable, device: torch.device, run: Callable[[int], T], total: int
) -> T:
    """``run(batch_size)`` for an int; for an :class:`AutoBatchSize`, ``run`` with the largest size that fits
    (``batch_size(key, device, run, total)``; ``total``: the number of inputs ``run`` splits).

    ``run(size)`` must do the whole chunked computation with chunks of ``size`` (an attempt that runs out of
    memory is thrown away and run again at half the size), and draw its random numbers outside the chunks.
    """
    return batch_size(key, device, run, total) if isinstance(batch_size, AutoBatchSize) else run(batch_size)
