"""Validation batches in the data contract, and the fixed monitor set drawn once from the validation data.

Contract (what every callback of :mod:`explain.callbacks` reads): a dict with ``image`` float [B,C,H,W] and
``label`` int64 [B], optionally ``heatmap`` float [B,H,W] (a human importance map) and ``has_heatmap`` bool [B],
and optionally ``spurious_mask`` bool [B,H,W] (pixels a model right for the right reasons should ignore, e.g. a
watermark). Other keys are ignored.
Another project's batch gets there through a ``batch_adapter(batch) -> dict``; without one, a batch must be
that dict or an ``(image, label)`` pair.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, default_collate

BatchAdapter = Callable[[Any], Mapping[str, Any]]

_ADAPTER_HINT = (
    "pass batch_adapter=<function(batch) -> dict(image=[B,C,H,W] float, label=[B] int64, optional "
    "heatmap=[B,H,W], has_heatmap=[B] bool, spurious_mask=[B,H,W] bool)>"
)


def to_contract(batch: Any, adapter: BatchAdapter | None = None) -> dict[str, Tensor]:
    """The batch as the contract dict, checked: ``image``, ``label`` and, when the data has human maps,
    ``heatmap`` and ``has_heatmap`` (all True when the batch gives a heatmap without it), and ``spurious_mask``
    when the batch has one.

    A heatmap or a spurious mask [B,1,H,W] is accepted and squeezed to [B,H,W].

    Raises:
        KeyError: a dict batch without ``image`` or ``label``.
        ValueError: an ``image``, ``label``, ``heatmap``, ``has_heatmap`` or ``spurious_mask`` of the wrong shape or
            dtype.
        TypeError: ``batch_adapter`` returned no dict, or a batch is neither a dict nor an ``(image, label)`` pair.
    """
    if adapter is not None:
        data = adapter(batch)
        if not isinstance(data, Mapping):
            raise TypeError(f"batch_adapter must return a dict with 'image' and 'label', got {type(data).__name__}")
        source = "batch_adapter's result"
    elif isinstance(batch, Mapping):
        data, source = batch, "the batch dict"
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        data, source = {"image": batch[0], "label": batch[1]}, "the (image, label) batch"
    else:
        kind = type(batch).__name__
        if isinstance(batch, (tuple, list)):
            kind = f"a {kind} of length {len(batch)}"
        raise TypeError(
            f"cannot read the validation batch ({kind}): a batch must be a dict with 'image' and 'label' or an "
            f"(image, label) pair; otherwise {_ADAPTER_HINT}"
        )
    missing = [key for key in ("image", "label") if key not in data]
    if missing:
        raise KeyError(f"{source} has no {missing} (keys: {sorted(data)}); {_ADAPTER_HINT}")
    image, label = data["image"], data["label"]
    if not isinstance(image, Tensor) or image.ndim != 4 or not image.is_floating_point():
        got = f"{tuple(image.shape)} {image.dtype}" if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"'image' in {source} must be a float tensor [B, C, H, W], got {got}")
    label = torch.as_tensor(label)
    if label.ndim == 2 and label.shape[0] == image.shape[0] and label.shape[1] > 1:
        raise ValueError(
            f"'label' in {source} looks one-hot {tuple(label.shape)}; the monitor needs class indices [B]: "
            "pass batch_adapter=lambda b: {'image': ..., 'label': <one-hot>.argmax(1)}"
        )
    if label.ndim != 1 or label.shape[0] != image.shape[0] or label.is_floating_point():
        raise ValueError(
            f"'label' in {source} must be integer class indices [B] with B={image.shape[0]}, got "
            f"{tuple(label.shape)} {label.dtype}"
        )
    out = {"image": image, "label": label.long()}
    heatmap = data.get("heatmap")
    if heatmap is not None:
        if heatmap.ndim == 4 and heatmap.shape[1] == 1:
            heatmap = heatmap[:, 0]
        if heatmap.shape != (image.shape[0], *image.shape[-2:]):
            raise ValueError(
                f"'heatmap' in {source} must be [B, H, W] = {(image.shape[0], *image.shape[-2:])} like the "
                f"images, got {tuple(heatmap.shape)}"
            )
        has = data.get("has_heatmap")
        has = torch.ones(image.shape[0], dtype=torch.bool) if has is None else torch.as_tensor(has).bool()
        if has.shape != (image.shape[0],):
            raise ValueError(f"'has_heatmap' in {source} must be bool [B={image.shape[0]}], got {tuple(has.shape)}")
        out["heatmap"] = heatmap.float()
        out["has_heatmap"] = has.to(image.device)
    mask = data.get("spurious_mask")
    if mask is not None:
        if mask.ndim == 4 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.shape != (image.shape[0], *image.shape[-2:]) or mask.dtype != torch.bool:
            raise ValueError(
                f"'spurious_mask' in {source} must be bool [B, H, W] = {(image.shape[0], *image.shape[-2:])} like "
                f"the images (True = a pixel to ignore), got {tuple(mask.shape)} {mask.dtype}"
            )
        out["spurious_mask"] = mask
    return out


def slice_contract(data: Mapping[str, Tensor], count: int) -> dict[str, Tensor]:
    """The first ``count`` samples of a contract dict."""
    return {key: value[:count] for key, value in data.items()}


def concat_contracts(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Samples of several contract dicts in one (the keys of the first; every part must have them)."""
    return {key: torch.cat([part[key].cpu() for part in parts]) for key in parts[0]}


def first_dataloader(dataloaders: Any) -> DataLoader | None:
    """The first validation dataloader of what ``trainer.val_dataloaders`` holds (one, a list or a dict)."""
    if isinstance(dataloaders, Mapping):
        dataloaders = list(dataloaders.values())
    if isinstance(dataloaders, (list, tuple)):
        return dataloaders[0] if dataloaders else None
    return dataloaders


def _is_map_style(dataset: Any) -> bool:
    return (
        dataset is not None
        and not isinstance(dataset, IterableDataset)
        and hasattr(dataset, "__getitem__")
        and hasattr(dataset, "__len__")
    )


def _collate(dataloader: DataLoader, samples: list[Any]) -> Any:
    collate = getattr(dataloader, "collate_fn", None) or default_collate
    return collate(samples)


def draw_monitor_set(
    dataloader: DataLoader,
    num_samples: int,
    seed: int,
    adapter: BatchAdapter | None = None,
) -> dict[str, Tensor]:
    """``num_samples`` validation samples (CPU contract dict plus ``ids`` [N], their dataset indices).

    A map-style dataset is indexed directly at ``num_samples`` indices drawn with a generator seeded by
    ``seed`` (so every process draws the same set, whatever the sampler, and no global RNG is used). An
    iterable dataset gives its first ``num_samples`` samples, ``ids`` being their positions.
    The caller wraps this in :func:`~explain.callbacks.isolation.preserved_rng` (datasets may draw random
    numbers).

    Raises:
        ValueError: the validation dataset or dataloader is empty; a batch as :func:`to_contract` refuses.
    """
    dataset = getattr(dataloader, "dataset", None)
    if _is_map_style(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        ids = order[:num_samples].sort().values
        data = to_contract(_collate(dataloader, [dataset[i] for i in ids.tolist()]), adapter)
        data = {key: value.cpu() for key, value in data.items()}
    else:
        parts, count = [], 0
        for batch in dataloader:
            part = slice_contract(to_contract(batch, adapter), num_samples - count)
            parts.append(part)
            count += part["label"].shape[0]
            if count >= num_samples:
                break
        if not parts:
            raise ValueError("the validation dataloader is empty: the monitor needs validation samples")
        data = concat_contracts(parts)
        ids = torch.arange(data["label"].shape[0])
    if data["label"].shape[0] == 0:
        raise ValueError("the validation dataset is empty: the monitor needs validation samples")
    data["ids"] = ids.long()
    return data


def collect_class_samples(
    dataloader: DataLoader,
    classes: list[int],
    per_class: int,
    seed: int,
    adapter: BatchAdapter | None = None,
    chunk: int = 64,
) -> dict[int, dict[str, Tensor]]:
    """Up to ``per_class`` validation samples of each class in ``classes`` (CPU contract dicts with ``ids``).

    A map-style dataset is read in a seeded random order, ``chunk`` samples at a time, until every class
    has enough (or the dataset ends); an iterable one in its own order.
    """
    wanted = {int(c): [] for c in classes}
    counts = dict.fromkeys(wanted, 0)

    def take(data: dict[str, Tensor], ids: Tensor) -> bool:
        for c in wanted:
            room = per_class - counts[c]
            if room <= 0:
                continue
            rows = (data["label"].cpu() == c).nonzero().flatten()[:room]
            if rows.numel():
                part = {key: value.cpu()[rows] for key, value in data.items()}
                part["ids"] = ids[rows]
                wanted[c].append(part)
                counts[c] += rows.numel()
        return all(count >= per_class for count in counts.values())

    dataset = getattr(dataloader, "dataset", None)
    if _is_map_style(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        for ids in order.split(chunk):
            data = to_contract(_collate(dataloader, [dataset[i] for i in ids.tolist()]), adapter)
            if take(data, ids):
                break
    else:
        seen = 0
        for batch in dataloader:
            data = to_contract(batch, adapter)
            size = data["label"].shape[0]
            if take(data, torch.arange(seen, seen + size)):
                break
            seen += size
    return {c: concat_contracts(parts) for c, parts in wanted.items() if parts}
