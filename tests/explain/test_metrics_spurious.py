"""SpuriousMass: the share of a map's positive mass on the spurious mask, by hand, at the edges and under DDP."""

from __future__ import annotations

import math
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from explain.metrics import SpuriousMass
from explain.metrics.functional.spurious import spurious_area, spurious_mass


def test_hand_computed_value():
    maps = torch.tensor(
        [
            [[4.0, 1.0, 0.0], [2.0, -5.0, 3.0]],  # positive mass 10, inside the mask 4 + 2 = 6 (the -5 ignored)
            [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],  # uniform: the mask's area share 2/6
        ]
    )
    mask = torch.tensor([[True, False, False], [True, True, False]])
    masks = torch.stack([mask, torch.tensor([[True, True, False], [False, False, False]])])
    assert spurious_mass(maps, masks).tolist() == pytest.approx([0.6, 2 / 6])
    assert spurious_mass(maps, mask).tolist() == pytest.approx([0.6, 3 / 6])  # one [H, W] mask for all
    assert spurious_area(masks).tolist() == pytest.approx([3 / 6, 2 / 6])
    metric = SpuriousMass()
    metric.update(maps=maps[:1], spurious_mask=masks[:1])
    metric.update(maps=maps[1:], spurious_mask=masks[1:])
    assert metric.compute().item() == pytest.approx((0.6 + 2 / 6) / 2)


def test_edges_empty_mask_zero_map_negative_map():
    empty = torch.zeros(1, 2, 2, dtype=torch.bool)
    some = torch.tensor([[[True, False], [False, False]]])
    assert spurious_mass(torch.rand(1, 2, 2) + 0.1, empty).tolist() == [0.0]  # empty mask: 0
    assert spurious_mass(torch.zeros(1, 2, 2), empty).tolist() == [0.0]  # ... whatever the map
    assert math.isnan(spurious_mass(torch.zeros(1, 2, 2), some).item())  # all-zero map: undefined
    assert math.isnan(spurious_mass(-torch.rand(1, 2, 2) - 0.1, some).item())  # all-negative map: undefined
    # the metric leaves the undefined images out of its average, and is NaN when none is left
    metric = SpuriousMass()
    metric.update(maps=torch.zeros(1, 2, 2), spurious_mask=some)
    assert math.isnan(metric.compute().item())
    metric.update(maps=-torch.ones(1, 2, 2), spurious_mask=some)
    assert math.isnan(metric.compute().item())
    metric.update(maps=torch.tensor([[[1.0, 3.0], [0.0, 0.0]]]), spurious_mask=some)  # 0.25
    metric.update(maps=torch.ones(1, 2, 2), spurious_mask=empty)  # 0
    assert metric.compute().item() == pytest.approx(0.125)


def test_every_value_lies_in_zero_one():
    maps = torch.randn(64, 8, 8)
    masks = torch.rand(64, 8, 8) < 0.2
    share = spurious_mass(maps, masks)
    assert ((share >= 0) & (share <= 1)).all()
    assert spurious_mass(maps.clamp_min(0) + 1, torch.ones(64, 8, 8, dtype=torch.bool)).tolist() == [1.0] * 64


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        spurious_mass(torch.rand(2, 4, 4), torch.zeros(2, 5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        spurious_mass(torch.rand(2, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="maps must be"):
        spurious_mass(torch.rand(4, 4), torch.zeros(4, 4, dtype=torch.bool))


def _ddp_worker(rank: int, world: int, init: str, maps: torch.Tensor, masks: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        metric = SpuriousMass()
        metric.update(maps=maps[rank::world], spurious_mask=masks[rank::world])  # each process its own shard
        value = metric.compute()  # torchmetrics syncs the sums across the processes
        torch.save(value, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_sync_to_the_single_process_value(tmp_path):
    maps = torch.randn(10, 6, 6)
    maps[3] = 0.0  # an undefined image on one shard only: the counts must be synced, not the means averaged
    masks = torch.rand(10, 6, 6) < 0.3
    single = SpuriousMass()
    single.update(maps=maps, spurious_mask=masks)
    init = f"file://{tempfile.mktemp(dir=tmp_path)}"
    out = str(tmp_path / "value")
    mp.start_processes(_ddp_worker, args=(2, init, maps, masks, out), nprocs=2, start_method="spawn")
    for rank in range(2):
        assert torch.load(f"{out}.{rank}").item() == pytest.approx(single.compute().item(), abs=1e-6)
    # an average of the two processes' own means would differ: the test can tell
    own = [SpuriousMass() for _ in range(2)]
    for rank, metric in enumerate(own):
        metric.update(maps=maps[rank::2], spurious_mask=masks[rank::2])
    assert (own[0].compute() + own[1].compute()).item() / 2 != pytest.approx(single.compute().item(), abs=1e-4)

