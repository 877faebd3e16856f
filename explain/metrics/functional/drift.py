"""Explanation drift over training: how much the map of each image of a fixed monitor set changes.

The maps of one evaluation are matched by image id with reference maps (those of the previous evaluation, or of
the first one) and compared with the per-image Spearman rank correlation (1: same ranking of the pixels).
"""

from __future__ import annotations

import torch
from torch import Tensor

from explain.metrics.functional.alignment import rowwise_spearman


def _check_ids_maps(ids: Tensor, maps: Tensor) -> None:
    if ids.ndim != 1 or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"ids must be integer sample indices [B], got shape {tuple(ids.shape)} dtype {ids.dtype}")
    if maps.ndim != 3 or maps.shape[0] != ids.shape[0]:
        raise ValueError(f"maps must be [B, H, W] with one map per id ({ids.shape[0]}), got {tuple(maps.shape)}")


def unique_by_id(ids: Tensor, maps: Tensor) -> tuple[Tensor, Tensor]:
    """Ids sorted ascending without repeats, with their maps (the first occurrence of a repeated id wins, e.g. the
    samples a ``DistributedSampler`` repeats to even out the ranks)."""
    _check_ids_maps(ids, maps)
    sorted_ids, order = ids.sort(stable=True)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    return sorted_ids[first], maps[order[first]]


def merge_references(
    ref_ids: Tensor | None, ref_maps: Tensor | None, ids: Tensor, maps: Tensor, overwrite: bool
) -> tuple[Tensor, Tensor]:
    """Reference maps updated with the maps of an evaluation: ids not yet referenced are added; the maps of ids
    already referenced are replaced when ``overwrite`` (the previous evaluation) and kept otherwise (the first).

    Raises:
        ValueError: maps of another size than the reference maps.
    """
    if ref_ids is None or ref_maps is None:
        return unique_by_id(ids, maps)
    if ref_maps.shape[1:] != maps.shape[1:]:
        raise ValueError(
            f"maps of size {tuple(maps.shape[1:])} cannot be compared with reference maps of size "
            f"{tuple(ref_maps.shape[1:])}: the monitor set must be explained at the same resolution every time"
        )
    maps = maps.to(ref_maps.device, ref_maps.dtype)
    ids = ids.to(ref_ids.device)
    if overwrite:
        return unique_by_id(torch.cat([ids, ref_ids]), torch.cat([maps, ref_maps]))
    return unique_by_id(torch.cat([ref_ids, ids]), torch.cat([ref_maps, maps]))


def reference_spearman(ids: Tensor, maps: Tensor, ref_ids: Tensor | None, ref_maps: Tensor | None) -> Tensor:
    """Spearman rho [B] (float64) of each map with the reference map of the same id (``ref_ids`` sorted ascending,
    as :func:`unique_by_id` leaves them); NaN where the id has no reference.

    Raises:
        ValueError: maps of another size than the reference maps.
    """
    _check_ids_maps(ids, maps)
    rho = torch.full((ids.shape[0],), float("nan"), dtype=torch.float64, device=maps.device)
    if ref_ids is None or ref_maps is None or ref_ids.numel() == 0 or ids.numel() == 0:
        return rho
    if ref_maps.shape[1:] != maps.shape[1:]:
        raise ValueError(
            f"maps of size {tuple(maps.shape[1:])} cannot be compared with reference maps of size "
            f"{tuple(ref_maps.shape[1:])}: the monitor set must be explained at the same resolution every time"
        )
    ref_ids, ref_maps = ref_ids.to(ids.device), ref_maps.to(maps.device)
    position = torch.searchsorted(ref_ids, ids).clamp_max(ref_ids.numel() - 1)
    found = ref_ids[position] == ids
    if found.any():
        rho[found] = rowwise_spearman(maps[found].flatten(1), ref_maps[position[found]].flatten(1))
    return rho
