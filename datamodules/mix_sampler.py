"""``MixedBatchSampler``: batches with an exact number of annotated (ClickMe) items, the rest unannotated.

The reference trained on 20% ClickMe images (with human maps) and 80% ImageNet images (without). Here every batch
holds exactly ``k = round(annotated_ratio * batch_size)`` annotated items and ``batch_size - k`` unannotated ones,
on every rank.

How it meets DDP (Lightning). The batch sampler is a ``torch.utils.data.BatchSampler`` with a ``sampler`` argument
over the ANNOTATED items: Lightning records its init arguments when a ``*_dataloader`` hook builds it, and under DDP
re-creates it with ``sampler=`` its own ``DistributedSampler(dataset, shuffle=True, seed=<seed_everything seed>)``
(``lightning.pytorch.utilities.data._dataloader_init_kwargs_resolve_sampler``) and calls that sampler's
``set_epoch`` every epoch. So the annotated items are split over the ranks by Lightning, and this class never reads
the rank itself: it takes ``num_replicas``/``rank``/``seed``/``epoch`` from the sampler it is given (a plain
single-process ``DistributedSampler(num_replicas=1, rank=0)`` by default, for a seeded shuffle that changes with
``set_epoch``). DataLoader workers receive whole batches from the main process, so no record is split by worker.

Epoch and remainder. An epoch is one pass over the annotated items. ``DistributedSampler`` gives every rank
``ceil(N / world)`` of them (padding with records from the start of the epoch's order), and the last batch of a
rank, if it has fewer than ``k``, is completed from the start of that rank's order (``drop_last=False``, default:
``world * k * ceil(N / (world * k)) - N`` records are served twice, every record at least once) or dropped
(``drop_last=True``: up to ``world * k - 1`` records skipped, different ones each epoch). When ``N`` is a multiple
of ``world * k`` every record is served exactly once either way. Every rank gets the same number of batches.

Unannotated items are a stream per rank that continues across epochs: cycle ``c`` of it is the rank's share of a
permutation of all ``M`` of them (``DistributedSampler(range(M), world, rank, seed=seed + 1).set_epoch(c)``), so
the ranks draw disjoint items, each item is used about equally often, and the stream is fixed by the seed.

Indices: annotated item ``i`` is ``i`` (``0 <= i < N``); unannotated item ``j`` is ``N + j``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

from torch.utils.data import BatchSampler, DistributedSampler, Sampler

from explain.validation import in_interval, non_negative_int, positive_int


def annotated_per_batch(batch_size: int, annotated_ratio: float) -> int:
    """``round(annotated_ratio * batch_size)`` (Python's rounding), at least 1 and at most ``batch_size``.

    Raises:
        ValueError: ``annotated_ratio * batch_size`` rounds to no annotated item per batch.
    """
    count = round(annotated_ratio * batch_size)
    if not 1 <= count <= batch_size:
        raise ValueError(
            f"annotated_ratio={annotated_ratio} x batch_size={batch_size} rounds to {count} annotated items per "
            "batch: raise the ratio or the batch size so that every batch holds at least one"
        )
    return count


class MixedBatchSampler(BatchSampler):
    """Batches of ``k`` annotated indices (from ``sampler``) then ``batch_size - k`` unannotated ones (module doc).

    Args:
        sampler: sampler over the annotated items ``range(N)``; Lightning puts its ``DistributedSampler`` here under
            DDP. ``None``: a seeded single-process ``DistributedSampler`` over ``range(num_annotated)``.
        batch_size: items per batch.
        drop_last: drop a rank's last incomplete annotated group instead of completing it (module docstring).
        annotated_ratio: share of annotated items; ``k = round(annotated_ratio * batch_size)``.
        num_annotated: ``N``, the number of annotated items (offset of the unannotated indices).
        num_unannotated: ``M``; 0 when there are none (then ``annotated_ratio`` must give ``k = batch_size``).
        seed: seed of the default sampler and of the unannotated stream when the sampler carries no ``seed``.

    Raises:
        ValueError: unannotated items asked for but none given, or more draws than annotated items allow.
    """

    def __init__(
        self,
        sampler: Sampler[int] | None,
        batch_size: int,
        drop_last: bool = False,
        annotated_ratio: float = 1.0,
        num_annotated: int = 0,
        num_unannotated: int = 0,
        seed: int = 0,
    ) -> None:
        positive_int("batch_size", batch_size)
        in_interval("annotated_ratio", annotated_ratio, 0, 1, low_open=True)
        positive_int("num_annotated", num_annotated)
        non_negative_int("num_unannotated", num_unannotated)
        if sampler is None:
            sampler = DistributedSampler(range(num_annotated), num_replicas=1, rank=0, shuffle=True, seed=seed)
        super().__init__(sampler, batch_size, drop_last)
        self.annotated_ratio, self.num_annotated, self.num_unannotated = annotated_ratio, num_annotated, num_unannotated
        self.seed = int(getattr(sampler, "seed", seed))
        self.annotated = annotated_per_batch(batch_size, annotated_ratio)
        if self.annotated < batch_size and num_unannotated == 0:
            raise ValueError(
                f"{batch_size - self.annotated} unannotated items per batch are asked for (annotated_ratio="
                f"{annotated_ratio}) but there are none: give unannotated items or set annotated_ratio=1"
            )
        if isinstance(sampler, Sized) and len(sampler) > num_annotated:
            raise ValueError(f"the sampler draws {len(sampler)} items from only num_annotated={num_annotated}")

    @property
    def num_replicas(self) -> int:
        return int(getattr(self.sampler, "num_replicas", 1))

    @property
    def rank(self) -> int:
        return int(getattr(self.sampler, "rank", 0))

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def __len__(self) -> int:
        count = len(self.sampler)
        return count // self.annotated if self.drop_last else math.ceil(count / self.annotated)

    def _annotated_groups(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        full, left = divmod(len(order), self.annotated)
        for b in range(full):
            yield order[b * self.annotated : (b + 1) * self.annotated]
        if left and not self.drop_last:  # complete from the start of this rank's order
            tail = order[full * self.annotated :]
            yield tail + (order * self.annotated)[: self.annotated - left]

    def _unannotated_stream(self) -> Iterator[int]:
        """This rank's unannotated indices for this epoch, skipping what earlier epochs used."""
        per_epoch = len(self) * (self.batch_size - self.annotated)
        share = DistributedSampler(
            range(self.num_unannotated), self.num_replicas, self.rank, shuffle=True, seed=self.seed + 1
        )
        cycle, skip = divmod(self.epoch * per_epoch, len(share))
        while True:
            share.set_epoch(cycle)
            for j in list(share)[skip:]:
                yield self.num_annotated + j
            cycle, skip = cycle + 1, 0

    def __iter__(self) -> Iterator[list[int]]:
        others = self._unannotated_stream() if self.annotated < self.batch_size else iter(())
        for group in self._annotated_groups():
            yield group + [next(others) for _ in range(self.batch_size - self.annotated)]
