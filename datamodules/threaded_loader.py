"""``ThreadedDataLoader``: a DataLoader whose workers are threads of the training process, and ``BufferPool``.

tf.data's model: the input pipeline runs on a pool of threads inside the training process. Decoding and resizing
run in torch and torchvision operators, which release the GIL, so threads use the cores much as worker processes
do, and batches need no hand-over: a worker process writes every batch into new shared memory, which the training
process then maps, and fresh pages are dear (2-4 us per 4 KiB page on the 2-core VM of BENCHMARKS.md, i.e. 0.2 ms
per 224 px float32 image on each side). With threads, a :class:`BufferPool` hands the memory of batches that
nobody holds any more to the next batch.

What stays the DataLoader's: the dataset, the sampler or batch sampler (so Lightning's ``DistributedSampler``
injection and ``len()`` work as usual), ``collate_fn`` and ``pin_memory``. Each thread fetches whole batches
(``collate_fn([dataset[i] for i in batch])``, or the dataset's ``__getitems__(batch)`` when it has one, as
PyTorch's fetcher); up to ``prefetch_batches`` batches are in flight and they come out in the sampler's order.

Trade-offs: the Python parts of the pipeline (record parsing, the sampler) share the GIL with the training loop, and
random augmentations draw from torch's global generator from several threads, so their draws are random but not
reproducible run to run (worker processes seed a generator each). Iterable datasets are refused: threads would need
a hand-made split of the stream.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset
from typing_extensions import override

from explain.validation import positive_int


class BufferPool:
    """Reused CPU tensors for batches: :meth:`empty` returns a tensor over memory no live tensor uses any more.

    Each buffer is a numpy array wrapped by ``torch.from_numpy``: the tensor's storage (and so every view of it, a
    tensor autograd saved, a batch a callback kept) holds a reference to the array, so an array referenced by the
    pool alone is free. Thread-safe.

    Args:
        capacity: most buffers kept; past it, a request that finds no free buffer of its shape gets a plain new
            tensor (a free buffer of another shape is dropped to make room when there is one).
    """

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = positive_int("capacity", capacity)
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype`` on the CPU, reusing a free buffer when there is one."""
        shape, np_dtype = tuple(shape), torch.empty((), dtype=dtype).numpy().dtype
        with self._lock:
            free = [k for k in range(len(self._arrays)) if self._is_free(k)]
            for k in free:
                if self._arrays[k].shape == shape and self._arrays[k].dtype == np_dtype:
                    return torch.from_numpy(self._arrays[k])
            array = np.empty(shape, np_dtype)
            if len(self._arrays) >= self.capacity:
                if not free:
                    return torch.from_numpy(array)
                self._arrays.pop(free[0])
            self._arrays.append(array)
            return torch.from_numpy(array)

    def _is_free(self, k: int) -> bool:
        return sys.getrefcount(self._arrays[k]) == 2  # the list's reference and getrefcount's argument

    def __len__(self) -> int:
        return len(self._arrays)

    def __getstate__(self) -> dict[str, Any]:  # a copy (e.g. a pickled DataModule) starts empty, with its own lock
        return {"capacity": self.capacity}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["capacity"])


class ThreadedDataLoader(DataLoader):
    """A ``DataLoader`` whose ``num_threads`` workers are threads of this process (module docstring).

    Takes the ``DataLoader`` arguments except ``num_workers``, ``prefetch_factor``, ``persistent_workers``,
    ``worker_init_fn`` and ``multiprocessing_context``, which belong to worker processes.

    Args:
        dataset: a map-style dataset (items fetched by index from several threads at once).
        num_threads: threads that fetch and collate batches.
        prefetch_batches: batches in flight at most (default: twice ``num_threads``).

    Raises:
        ValueError: an iterable dataset, ``num_workers > 0``, or a non-positive count.
    """

    def __init__(
        self,
        dataset: Dataset,
        *args: Any,
        num_threads: int = 2,
        prefetch_batches: int | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(dataset, IterableDataset):
            raise ValueError("ThreadedDataLoader needs a map-style dataset, not an IterableDataset")
        if kwargs.get("num_workers"):
            raise ValueError("ThreadedDataLoader runs threads, not worker processes: give num_threads, not num_workers")
        self.num_threads = positive_int("num_threads", num_threads)
        self.prefetch_batches = positive_int("prefetch_batches", prefetch_batches or 2 * num_threads)
        super().__init__(dataset, *args, **kwargs)

    def _fetch(self, indices: int | list[int]) -> Any:
        if self.batch_sampler is None:  # batch_size=None: one item at a time, converted, not collated
            batch = self.collate_fn(self.dataset[indices])
        else:  # as PyTorch's own fetcher: the dataset's __getitems__ when it has one
            getitems = getattr(self.dataset, "__getitems__", None)
            batch = self.collate_fn(getitems(indices) if getitems else [self.dataset[i] for i in indices])
        if self.pin_memory and torch.cuda.is_available():
            return apply_to_collection(batch, Tensor, Tensor.pin_memory)
        return batch

    @override
    def __iter__(self) -> Iterator[Any]:
        # DataLoader's iterator draws its workers' base seed from `generator` first: so do we, so that a seeded
        # generator gives a shuffling sampler the same order as under a DataLoader
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        sampler = self.batch_sampler if self.batch_sampler is not None else self.sampler
        return _ordered_prefetch(self._fetch, iter(sampler), self.num_threads, self.prefetch_batches)


def _ordered_prefetch(fetch: Callable[[Any], Any], keys: Iterator[Any], threads: int, depth: int) -> Iterator[Any]:
    """``fetch(key)`` for every key, computed by ``threads`` threads at most ``depth`` ahead, yielded in order.

    Leaving early (``break``, an error, the generator closed) cancels what was not started and waits for the rest."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="ThreadedDataLoader")
    pending: deque[Future] = deque()
    try:
        for key in keys:
            pending.append(pool.submit(fetch, key))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
