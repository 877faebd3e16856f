"""MixedBatchSampler: the exact mix, the same number of batches on every rank, every record once per epoch, a seeded
shuffle per epoch, and Lightning's own re-instantiation of the batch sampler with its DistributedSampler."""

from collections import Counter

import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods, _set_sampler_epoch
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from datamodules.mix_sampler import MixedBatchSampler, annotated_per_batch

LENGTHS = (7, 13, 3, 11, 6)  # the unequal shards of the issue: 40 records
N = sum(LENGTHS)


class Indices(Dataset):
    """Item ``i`` is ``i``; ``len`` is the annotated count, as ClickMeSamples (unannotated items above it)."""

    def __init__(self, annotated: int, unannotated: int) -> None:
        self.annotated, self.unannotated = annotated, unannotated

    def __len__(self) -> int:
        return self.annotated

    def __getitem__(self, i: int) -> int:
        assert 0 <= i < self.annotated + self.unannotated
        return i


def lightning_loaders(world: int, batch_size: int, ratio: float, unannotated: int = 50, drop_last=False, seed=7,
                      num_workers=0):
    """What Lightning does under DDP: the hook builds the loader (init arguments recorded), then each rank gets it
    re-created with ``DistributedSampler(dataset, world, rank, shuffle=True, seed)`` injected as ``sampler``."""
    dataset = Indices(N, unannotated)
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        sampler = MixedBatchSampler(None, batch_size, drop_last, ratio, N, unannotated, seed=0)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=list)
    loaders = []
    for rank in range(world):
        distributed = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        loaders.append(_update_dataloader(loader, distributed))
    return loaders


def epoch(loaders, number):
    batches = []
    for loader in loaders:
        _set_sampler_epoch(loader, number)  # what the fit loop calls at the start of every epoch
        batches.append(list(loader))
    return batches


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_rank_same_batches_exact_mix_every_record_once(world):
    batch_size, ratio = 10, 0.2  # 2 annotated per batch; 40 = 2 * 2 * 10 = 4 * 2 * 5
    loaders = lightning_loaders(world, batch_size, ratio)
    for loader in loaders:
        assert isinstance(loader.batch_sampler, MixedBatchSampler)
        assert isinstance(loader.batch_sampler.sampler, DistributedSampler)
        assert loader.batch_sampler.num_replicas == world
    per_rank = epoch(loaders, 0)
    assert {len(batches) for batches in per_rank} == {N // (2 * world)}
    assert all(len(loader) == N // (2 * world) for loader in loaders)  # the progress bar's epoch length
    annotated, unannotated = [], []
    for batches in per_rank:
        for batch in batches:
            assert len(batch) == batch_size
            assert all(i < N for i in batch[:2]) and all(i >= N for i in batch[2:])
            annotated += batch[:2]
            unannotated += batch[2:]
    assert sorted(annotated) == list(range(N))  # every record exactly once across the ranks
    # the unannotated stream: the ranks draw disjoint items, each used about equally often
    counts = Counter(unannotated)
    assert max(counts.values()) - min(counts.values()) <= world
    if world > 1:  # within one pass over the pool (its first ceil(50 / world) items), the ranks are disjoint
        share = -(-50 // world)
        first, second = (set([b for batch in batches for b in batch[2:]][:share]) for batches in per_rank[:2])
        assert len(first) == len(second) == share
        assert len(first & second) <= share * world - 50  # DistributedSampler's padding only


def test_with_workers_every_record_once():
    loaders = lightning_loaders(2, 8, 0.5, num_workers=2)
    batches = [batch for per_rank in epoch(loaders, 0) for batch in per_rank]
    assert sorted(i for batch in batches for i in batch if i < N) == list(range(N))


def test_remainder_is_padded_or_dropped_as_documented():
    # 40 records, 2 ranks, 3 annotated per batch: 20 per rank -> 6 full groups + 2 left
    padded = epoch(lightning_loaders(2, 6, 0.5), 0)
    assert [len(batches) for batches in padded] == [7, 7]
    served = Counter(i for batches in padded for batch in batches for i in batch[:3])
    assert set(served) == set(range(N))  # every record at least once
    assert sum(served.values()) - N == 2 * 3 * 7 - N == 2  # world * k * ceil(N / (world * k)) - N served twice
    dropped = epoch(lightning_loaders(2, 6, 0.5, drop_last=True), 0)
    assert [len(batches) for batches in dropped] == [6, 6]
    served = Counter(i for batches in dropped for batch in batches for i in batch[:3])
    assert max(served.values()) == 1 and len(served) == N - 4  # 2 records skipped on each rank
    # uneven split over the ranks (DistributedSampler pads 41 -> 42): still the same number of batches
    assert [len(batches) for batches in epoch(lightning_loaders(3, 4, 0.5), 0)] == [7, 7, 7]


def test_shuffle_is_seeded_and_new_every_epoch():
    first = epoch(lightning_loaders(2, 10, 0.2), 0)
    again = epoch(lightning_loaders(2, 10, 0.2), 0)
    later = epoch(lightning_loaders(2, 10, 0.2), 1)
    other_seed = epoch(lightning_loaders(2, 10, 0.2, seed=8), 0)
    assert first == again
    assert first != later and first != other_seed
    annotated = sorted(i for batches in later for batch in batches for i in batch[:2])
    assert annotated == list(range(N))  # a new order, still every record once
    # the unannotated stream continues across epochs instead of restarting
    assert [batch[2:] for batch in first[0]] != [batch[2:] for batch in later[0]]


def test_single_process_default_sampler_is_seeded_and_follows_set_epoch():
    sampler = MixedBatchSampler(None, 4, annotated_ratio=1.0, num_annotated=N, seed=3)
    orders = []
    for number in (0, 0, 1):
        sampler.sampler.set_epoch(number)
        orders.append([i for batch in sampler for i in batch])
    assert orders[0] == orders[1] != orders[2]
    assert sorted(orders[2]) == list(range(N)) and len(sampler) == 10


def test_annotated_per_batch_and_arguments():
    assert annotated_per_batch(64, 0.2) == 13  # round(12.8), the reference mix at batch 64
    assert annotated_per_batch(8, 0.5) == 4
    with pytest.raises(ValueError, match="rounds to 0"):
        annotated_per_batch(4, 0.1)
    with pytest.raises(ValueError, match="unannotated items per batch are asked for"):
        MixedBatchSampler(None, 8, annotated_ratio=0.5, num_annotated=10, num_unannotated=0)
    with pytest.raises(ValueError, match="annotated_ratio"):
        MixedBatchSampler(None, 8, annotated_ratio=1.5, num_annotated=10)
    with pytest.raises(ValueError, match="batch_size"):
        MixedBatchSampler(None, True, num_annotated=10)
    assert torch.utils.data.BatchSampler in type(MixedBatchSampler(None, 2, num_annotated=4)).__mro__
