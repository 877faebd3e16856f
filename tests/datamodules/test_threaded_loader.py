"""ThreadedDataLoader and BufferPool: the batches of a plain DataLoader in the sampler's order, Lightning's sampler
injection, errors and early exits that leave no thread behind, and buffers reused only once nothing holds them."""

import pickle
import random
import threading
import time

import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods, _set_sampler_epoch
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, IterableDataset

from datamodules.mix_sampler import MixedBatchSampler
from datamodules.threaded_loader import BufferPool, ThreadedDataLoader


class Slow(Dataset):
    """Item ``i`` is ``{"x": tensor(i), "row": [i, i + 0.5]}`` after a random sleep (threads finish out of order);
    item ``fail`` raises."""

    def __init__(self, n: int, fail: int | None = None) -> None:
        self.n, self.fail, self.rng = n, fail, random.Random(0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        time.sleep(self.rng.random() * 2e-3)
        if i == self.fail:
            raise ValueError(f"record {i} is corrupt")
        return {"x": torch.tensor(i), "row": torch.tensor([i, i + 0.5])}


def loader_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("ThreadedDataLoader")}


def assert_same_batches(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("options", [dict(batch_size=4), dict(batch_size=5, drop_last=True), dict(batch_size=None)])
def test_same_batches_in_the_same_order_as_a_dataloader(threads, options):
    dataset = Slow(23)
    ours = ThreadedDataLoader(dataset, num_threads=threads, shuffle=True,
                              generator=torch.Generator().manual_seed(3), **options)
    theirs = DataLoader(dataset, shuffle=True, generator=torch.Generator().manual_seed(3), **options)
    assert len(ours) == len(theirs)
    assert_same_batches(list(ours), list(theirs))
    assert not loader_threads()  # the pool is gone at the end of the epoch


class Batched(Slow):
    """``Slow`` with ``__getitems__``, counting its calls."""

    calls = 0

    def __getitems__(self, indices: list[int]) -> list[dict]:
        Batched.calls += 1
        return [self[i] for i in indices]


def test_a_dataset_with_getitems_is_fetched_a_batch_at_a_time():
    Batched.calls = 0
    batches = list(ThreadedDataLoader(Batched(10), batch_size=4, num_threads=2))
    assert Batched.calls == 3 and [b["x"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_lightning_injects_its_distributed_sampler_and_keeps_the_threads():
    """Lightning's re-creation of the loader under DDP (as test_mix_sampler.py): the subclass, its thread count and
    the mixed batch sampler survive; every record is served once across 2 ranks, the same number of batches each."""
    n, unannotated = 40, 50
    dataset = Slow(n + unannotated)  # the ClickMe records, then the unannotated images
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        sampler = MixedBatchSampler(None, 8, False, 0.5, n, unannotated, seed=0)
        loader = ThreadedDataLoader(dataset, batch_sampler=sampler, num_threads=2, prefetch_batches=3)
    served, lengths = [], []
    for rank in range(2):
        ranked = _update_dataloader(loader, DistributedSampler(range(n), num_replicas=2, rank=rank, seed=7))
        assert isinstance(ranked, ThreadedDataLoader)
        assert (ranked.num_threads, ranked.prefetch_batches) == (2, 3)
        assert isinstance(ranked.batch_sampler.sampler, DistributedSampler)
        _set_sampler_epoch(ranked, 0)
        batches = list(ranked)
        lengths.append(len(batches))
        assert len(batches) == len(ranked)
        for batch in batches:
            assert (batch["x"][:4] < n).all() and (batch["x"][4:] >= n).all()  # the exact mix
            served += batch["x"][:4].tolist()
    assert lengths == [5, 5]
    assert sorted(served) == list(range(n))


def test_an_error_names_the_item_and_stops_the_threads():
    loader = ThreadedDataLoader(Slow(30, fail=13), batch_size=4, num_threads=2)
    with pytest.raises(ValueError, match="record 13 is corrupt"):
        list(loader)
    assert not loader_threads()


def test_leaving_early_stops_the_threads():
    loader = ThreadedDataLoader(Slow(200), batch_size=2, num_threads=2, prefetch_batches=6)
    iterator = iter(loader)
    first = [next(iterator) for _ in range(3)]
    assert [b["x"].tolist() for b in first] == [[0, 1], [2, 3], [4, 5]]
    assert loader_threads()
    iterator.close()  # what `break` and garbage collection do
    assert not loader_threads()


def test_arguments_are_checked():
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(ValueError, match="map-style"):
        ThreadedDataLoader(Stream(), num_threads=2)
    with pytest.raises(ValueError, match="num_threads, not num_workers"):
        ThreadedDataLoader(Slow(4), num_workers=2)
    with pytest.raises(ValueError, match="num_threads"):
        ThreadedDataLoader(Slow(4), num_threads=0)


# --------------------------------------------------------------------------------------------- BufferPool
def test_a_buffer_is_reused_once_nothing_holds_it():
    pool = BufferPool()
    first = pool.empty((4, 3), torch.float32)
    pointer = first.data_ptr()
    assert pool.empty((4, 3), torch.float32).data_ptr() != pointer  # `first` is alive: a second buffer
    view = first[1:]
    del first
    assert pool.empty((4, 3), torch.float32).data_ptr() != pointer  # a view keeps it busy
    del view
    again = pool.empty((4, 3), torch.float32)
    assert again.data_ptr() == pointer and again.dtype == torch.float32 and again.shape == (4, 3)
    assert pool.empty((4, 3), torch.uint8).dtype == torch.uint8  # another dtype: another buffer


def test_a_tensor_saved_by_autograd_keeps_its_buffer_busy():
    pool = BufferPool()
    images = pool.empty((2, 5), torch.float32).fill_(1.0)
    pointer = images.data_ptr()
    weight = torch.ones(5, requires_grad=True)
    loss = (images * weight).sum()  # autograd saves `images` for the weight's gradient
    del images
    reused = pool.empty((2, 5), torch.float32)
    assert reused.data_ptr() != pointer
    reused.fill_(7.0)
    loss.backward()
    assert weight.grad.tolist() == [2.0] * 5  # computed from the saved ones, not overwritten by the sevens
    del loss
    assert pool.empty((2, 5), torch.float32).data_ptr() == pointer


def test_pool_capacity_and_pickling():
    pool = BufferPool(capacity=2)
    held = [pool.empty((3,), torch.float32) for _ in range(4)]  # all busy: 2 kept, 2 plain
    assert len(pool) == 2
    del held
    pool.empty((5,), torch.float32)  # a new shape replaces a free buffer
    assert len(pool) == 2
    copy = pickle.loads(pickle.dumps(pool))
    assert len(copy) == 0 and copy.capacity == 2
    with pytest.raises(ValueError, match="capacity"):
        BufferPool(capacity=0)
