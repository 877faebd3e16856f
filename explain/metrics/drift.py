"""``ExplanationDrift``: per-image rank correlation of a monitor set's maps with earlier evaluations.

One evaluation is ``update(maps, ids)`` over the monitor set (possibly sharded across processes), then
``compute()``, then ``reset()``. Unlike the other metrics, this one remembers earlier evaluations:

* ``compute()`` gathers the maps of every process by ``ids`` and returns ``{"vs_previous": mean rho,
  "vs_first": mean rho}`` against the maps of the previous and of the first evaluation of each id. On the very
  first evaluation there is nothing to compare with: the keys are absent (``{}``), not NaN, so nothing is logged.
  ``compute_per_image()`` gives the values per image (NaN where an id has no reference), aligned with the sorted
  ``ids``, e.g. for a W&B table.
* ``reset()`` ends the evaluation: its maps become the "previous" references (and the "first" ones of ids never
  seen before), then the accumulated states are cleared as in any torchmetrics Metric. Call it on every
  process, like ``compute()``: when the evaluation was not computed yet, it computes (and gathers) first.
* The references are part of ``state_dict()`` (``get_extra_state``), so a run resumed from a checkpoint
  logs the same drift as one that was never interrupted.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities.data import dim_zero_cat

from explain.metrics.base import ExplanationMetric
from explain.metrics.functional.drift import _check_ids_maps, merge_references, reference_spearman, unique_by_id

_REFERENCE_KEYS = ("first_ids", "first_maps", "previous_ids", "previous_maps")


def _cat(state: list[Tensor] | Tensor) -> Tensor | None:
    if isinstance(state, list):
        return dim_zero_cat(state) if state else None
    return state


class ExplanationDrift(ExplanationMetric):
    """Drift of explanations across evaluations of a fixed monitor set (module docstring).

    ``update(maps [B,H,W], ids [B])`` with stable sample ids; ``compute()`` -> ``{"vs_previous", "vs_first"}``
    mean Spearman rho (empty dict on the first evaluation); ``compute_per_image()`` -> ``{"ids", "vs_previous",
    "vs_first"}`` tensors; ``reset()`` advances the references. ``forward`` is not supported (drift compares
    whole evaluations, not batches).

    Raises:
        ValueError: at ``update``, ids that are not integers [B], maps that are not [B, H, W], or maps of another
            size than the earlier ones of the evaluation; at ``load_state_dict``, a state without this metric's keys.
        TypeError: the metric is called (``forward``).
        RuntimeError: at ``compute``, processes that explained the monitor set at different resolutions.

    >>> import torch
    >>> drift, maps, ids = ExplanationDrift(), torch.rand(3, 4, 4), torch.arange(3)
    >>> drift.update(maps=maps, ids=ids)
    >>> drift.compute()  # the first evaluation has nothing to compare with
    {}
    >>> drift.reset()
    >>> drift.update(maps=maps.flip(-1), ids=ids)
    >>> sorted(drift.compute())
    ['vs_first', 'vs_previous']
    >>> drift.reset()
    >>> drift.update(maps=maps.flip(-1), ids=ids)
    >>> drift.compute()["vs_previous"]  # unchanged maps: rho = 1
    tensor(1.)
    """

    requires = ("maps", "ids")
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # 1-D states (ids, flattened maps) so that processes holding different numbers of maps, or none,
        # gather without shape mismatches; the map size is synced separately
        self.add_state("ids", default=[], dist_reduce_fx="cat")
        self.add_state("flat_maps", default=[], dist_reduce_fx="cat")
        self.add_state("map_size", default=torch.zeros(2, dtype=torch.long), dist_reduce_fx="max")
        self._references: dict[str, Tensor | None] = dict.fromkeys(_REFERENCE_KEYS)
        self._evaluation: tuple[Tensor, Tensor] | None = None  # gathered maps of the computed evaluation
        self._per_image: dict[str, Tensor] | None = None

    @property
    def name(self) -> str:
        return "drift"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "ExplanationDrift compares whole evaluations of a monitor set: call update(maps=..., ids=...) for each "
            "batch, then compute() and reset() once per evaluation, instead of calling the metric"
        )

    def update(self, maps: Tensor, ids: Tensor) -> None:
        ids = torch.as_tensor(ids)
        _check_ids_maps(ids, maps)
        size = torch.tensor(maps.shape[1:], dtype=torch.long, device=self.map_size.device)
        if bool((self.map_size > 0).all()) and not torch.equal(self.map_size, size):
            raise ValueError(
                f"maps of size {tuple(size.tolist())} in an evaluation whose earlier maps are "
                f"{tuple(self.map_size.tolist())}"
            )
        self.map_size = size
        self.ids.append(ids.detach().to(self.device, torch.long))
        self.flat_maps.append(maps.detach().to(self.device, torch.float32).flatten())

    def sync(self, *args: Any, **kwargs: Any) -> None:
        """torchmetrics' ``sync``, after giving empty list states their true dtype: torchmetrics stands in for an
        empty list state with a float tensor of the metric's dtype, which cannot be gathered with other processes'
        int64 ids."""
        if not self.ids:
            self.ids = [torch.zeros(0, dtype=torch.long, device=self.device)]
        if not self.flat_maps:
            self.flat_maps = [torch.zeros(0, dtype=torch.float32, device=self.device)]
        super().sync(*args, **kwargs)

    def compute(self) -> dict[str, Tensor]:
        ids, flat_maps = _cat(self.ids), _cat(self.flat_maps)
        if ids is None or ids.numel() == 0:
            nothing = torch.zeros(0)
            self._evaluation = None
            self._per_image = {"ids": nothing.long(), "vs_previous": nothing, "vs_first": nothing}
            return {}
        height, width = self.map_size.tolist()
        if flat_maps.numel() != ids.numel() * height * width:
            raise RuntimeError(
                f"{flat_maps.numel()} map values for {ids.numel()} ids of size {height}x{width}: the processes "
                f"explained the monitor set at different resolutions"
            )
        ids, maps = unique_by_id(ids, flat_maps.view(-1, height, width))
        self._evaluation = (ids.cpu(), maps.cpu())
        refs = self._references
        per_image = {
            "ids": ids.cpu(),
            "vs_previous": reference_spearman(ids, maps, refs["previous_ids"], refs["previous_maps"]).cpu(),
            "vs_first": reference_spearman(ids, maps, refs["first_ids"], refs["first_maps"]).cpu(),
        }
        self._per_image = per_image
        means = {}
        for key, ref_ids in (("vs_previous", refs["previous_ids"]), ("vs_first", refs["first_ids"])):
            if ref_ids is None:
                continue
            referenced = torch.isin(per_image["ids"], ref_ids)
            if referenced.any():  # mean over the ids that have a reference (a NaN map still shows as NaN)
                means[key] = per_image[key][referenced].mean().float().to(self.device)
        return means

    def compute_per_image(self) -> dict[str, Tensor]:
        """``{"ids": sorted unique ids, "vs_previous": rho, "vs_first": rho}`` (CPU tensors, NaN where an id has
        no reference) of the current evaluation. Computes (and syncs) if needed: call it on every process."""
        self.compute()
        return dict(self._per_image)

    def reset(self) -> None:
        """End the evaluation: its maps become the references (see the module docstring), then clear states."""
        if self._per_image is None and (self.update_called or self._distributed()):
            # not computed yet: compute now, on every process (gathering is collective even for a process
            # that received no maps)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*was called before the ``update`` method")
                self.compute()
        if self._evaluation is not None:
            ids, maps = self._evaluation
            refs = self._references
            refs["previous_ids"], refs["previous_maps"] = merge_references(
                refs["previous_ids"], refs["previous_maps"], ids, maps, overwrite=True
            )
            refs["first_ids"], refs["first_maps"] = merge_references(
                refs["first_ids"], refs["first_maps"], ids, maps, overwrite=False
            )
        self._evaluation, self._per_image = None, None
        super().reset()

    def _distributed(self) -> bool:
        available = self.distributed_available_fn
        return bool(self.sync_on_compute and callable(available) and available())

    def get_extra_state(self) -> dict[str, Tensor | None]:
        """The reference maps (first and previous evaluation), saved in ``state_dict()``."""
        return {key: (None if value is None else value.clone()) for key, value in self._references.items()}

    def set_extra_state(self, state: dict[str, Tensor | None]) -> None:
        if not isinstance(state, dict) or set(state) != set(_REFERENCE_KEYS):
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"ExplanationDrift state must have the keys {list(_REFERENCE_KEYS)}, got {found}")
        self._references = {key: (None if state[key] is None else state[key].cpu().clone()) for key in _REFERENCE_KEYS}
        self._evaluation, self._per_image, self._computed = None, None, None
