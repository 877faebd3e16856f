"""Standard (unconstrained) networks: baselines as named ``nn.Sequential``s ending in ``pool, flatten, head``,
and any timm or torchvision model by name, optionally from a local weights file."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torchvision
from torch import nn

from align.models.pretrained import load_matching


def small_cnn(
    num_classes: int,
    in_channels: int = 3,
    widths: Sequence[int] = (16, 32, 64),
    depth: int = 2,
    kernel_size: int = 3,
    batch_norm: bool = True,
) -> nn.Sequential:
    """Plain CNN of the same shape as :func:`align.models.lip_vgg`: ``len(widths)`` stages of ``depth`` x
    (Conv2d [+ BatchNorm2d] + ReLU), 2x max pooling between stages, global average pooling, a linear head.

    Raises:
        ValueError: ``num_classes < 2``, no width, or ``depth < 1``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not widths or depth < 1:
        raise ValueError(f"need at least one width and depth >= 1, got widths={widths}, depth={depth}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = in_channels
    for index, width in enumerate(widths):
        stage: list[nn.Module] = [nn.MaxPool2d(2)] if index > 0 else []
        for _ in range(depth):
            stage.append(nn.Conv2d(channels, width, kernel_size, padding=kernel_size // 2, bias=not batch_norm))
            if batch_norm:
                stage.append(nn.BatchNorm2d(width))
            stage.append(nn.ReLU(inplace=True))
            channels = width
        layers[f"stage{index + 1}"] = nn.Sequential(*stage)
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["head"] = nn.Linear(channels, num_classes)
    return nn.Sequential(layers)


def _torchvision_resnet(builder, num_classes: int, weights: str | None) -> nn.Sequential:
    net = builder(weights=weights, num_classes=num_classes)
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    layers = OrderedDict((name, getattr(net, name)) for name in names)
    layers["pool"] = net.avgpool
    layers["flatten"] = nn.Flatten()
    layers["head"] = net.fc
    return nn.Sequential(layers)


def resnet18(num_classes: int = 1000, weights: str | None = None) -> nn.Sequential:
    """torchvision's ResNet-18 (no pretrained weights by default) with children ``conv1 ... layer4, pool, flatten,
    head`` (torchvision's ``avgpool`` and ``fc``)."""
    return _torchvision_resnet(torchvision.models.resnet18, num_classes, weights)


def resnet50(num_classes: int = 1000, weights: str | None = None) -> nn.Sequential:
    """torchvision's ResNet-50 (no pretrained weights by default), children as in :func:`resnet18`."""
    return _torchvision_resnet(torchvision.models.resnet50, num_classes, weights)


def timm_model(
    name: str,
    num_classes: int,
    pretrained_file: str | Path | None = None,
    model_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Any timm model by name: ``timm.create_model(name, num_classes=num_classes, **model_kwargs, **kwargs)``
    (e.g. ``img_size``, ``patch_size``, ``drop_path_rate``; timm's own ``pretrained=True`` downloads, where there
    is internet). In YAML, put them under ``model_kwargs`` (LightningCLI cannot see through timm's ``**kwargs``).

    ``pretrained_file``: a local ``.safetensors`` file or torch state dict; every tensor whose name and shape
    match is loaded (:func:`align.models.pretrained.load_matching`), so a classifier of another size starts
    fresh. Nothing is downloaded. Example, an ImageNet ViT-S/16 fine-tuned on 4 classes::

        timm_model("vit_small_patch16_224", 4, pretrained_file="vit_small_patch16_224.safetensors")
    """
    import timm

    model = timm.create_model(name, num_classes=num_classes, **_merge(model_kwargs, kwargs))
    if pretrained_file is not None:
        load_matching(model, pretrained_file)
    return model


def torchvision_model(
    name: str,
    num_classes: int,
    weights_file: str | Path | None = None,
    model_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Any torchvision classification model by name: ``torchvision.models.get_model(name, num_classes=...,
    **model_kwargs, **kwargs)`` (torchvision's own ``weights="IMAGENET1K_V1"`` passes through and downloads).
    ``weights_file``: a local state dict or ``.safetensors`` file, loaded as in :func:`timm_model`.

    Raises:
        ValueError: ``name`` is not a torchvision classification model, or an option is given both in
            ``model_kwargs`` and as a keyword argument; see :func:`align.models.load_matching` for the file's errors.
    """
    kwargs = _merge(model_kwargs, kwargs)
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"{name!r} is not a torchvision classification model; see torchvision.models.list_models()")
    weights = kwargs.pop("weights", None)
    model = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
    if weights is not None:  # torchvision refuses weights with num_classes != 1000: load them, then match
        load_matching(model, torchvision.models.get_model(name, weights=weights, **kwargs).state_dict())
    if weights_file is not None:
        load_matching(model, weights_file)
    return model


def _merge(model_kwargs: dict[str, Any] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    both = set(model_kwargs or {}) & set(kwargs)
    if both:
        raise ValueError(f"{sorted(both)} given both in model_kwargs and as keyword arguments")
    return {**(model_kwargs or {}), **kwargs}
