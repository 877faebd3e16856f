"""Load a local weights file into a model: every tensor whose name and shape match, nothing downloaded.

Used by :func:`align.models.timm_model` and :func:`align.models.torchvision_model`. A head of another size (an
ImageNet file, 1000 classes, into a 4-class model) is skipped by its shape and keeps its fresh initialisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn


@dataclass
class LoadReport:
    """What :func:`load_matching` did: ``loaded`` names, and the names ``missing`` from the file, present with
    another ``mismatched`` shape (name -> (file shape, model shape)), and ``unused`` from the file."""

    loaded: list[str]
    missing: list[str]
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    unused: list[str]


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file or of a torch state dict (``torch.load(weights_only=True)``; a
    checkpoint holding it under ``"state_dict"`` or ``"model"`` works too).

    Raises:
        FileNotFoundError: no such file. ValueError: the file cannot be read or holds no tensors (names the path).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any reader's error: say which file, and why
        raise ValueError(f"cannot read the weights file {path}: {type(error).__name__}: {error}") from error
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"the weights file {path} holds a {type(state).__name__}, not a state dict")
    tensors = {name: value for name, value in state.items() if isinstance(value, Tensor)}
    if not tensors:
        raise ValueError(f"the weights file {path} holds no tensors")
    return tensors


def load_matching(model: nn.Module, weights: str | Path | Mapping[str, Tensor]) -> LoadReport:
    """Copy into ``model`` every tensor of ``weights`` (a file path, see :func:`read_state_dict`, or a state
    dict) whose name and shape match one of the model's (parameters and buffers), leave the rest of the model as
    it is, and log what was loaded and skipped.

    Raises:
        ValueError: no tensor matches the model (a file for another architecture, or with another naming), or
        the file cannot be read (see :func:`read_state_dict`).
    """
    if isinstance(weights, Mapping):
        source, path = dict(weights), "state dict"
    else:
        source, path = read_state_dict(weights), weights
    target = model.state_dict()
    matching, mismatched = {}, {}
    for name, value in source.items():
        if name in target:
            if value.shape == target[name].shape:
                matching[name] = value
            else:
                mismatched[name] = (tuple(value.shape), tuple(target[name].shape))
    if not matching:
        raise ValueError(
            f"no tensor of the weights ({path}) matches {type(model).__name__} by name and shape "
            f"(file: {_sample(source)}; model: {_sample(target)})"
        )
    model.load_state_dict(matching, strict=False)
    report = LoadReport(
        loaded=sorted(matching),
        missing=sorted(set(target) - set(source)),
        mismatched=mismatched,
        unused=sorted(set(source) - set(target)),
    )
    rank_zero_info(
        f"{path}: loaded {len(report.loaded)} of {len(target)} tensors of {type(model).__name__}"
        + "".join(
            f"; {label}: {', '.join(items)}"
            for label, items in (
                ("kept fresh (shape differs)", [f"{n} {a}->{b}" for n, (a, b) in mismatched.items()]),
                ("kept fresh (not in file)", report.missing),
                ("not used from file", report.unused),
            )
            if items
        )
    )
    return report


def _sample(names: Mapping[str, Tensor], count: int = 4) -> str:
    keys = list(names)
    return ", ".join(keys[:count]) + (f" ... ({len(keys)} in all)" if len(keys) > count else "")
