"""Standard (unconstrained) baselines as named ``nn.Sequential``s ending in ``pool, flatten, head``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torchvision
from torch import nn


def small_cnn(
    num_classes: int,
    in_channels: int = 3,
    widths: Sequence[int] = (16, 32, 64),
    depth: int = 2,
    kernel_size: int = 3,
    batch_norm: bool = True,
) -> nn.Sequential:
    """Plain CNN of the same shape as :func:`align.models.lip_vgg`: ``len(widths)`` stages of ``depth`` x
    (Conv2d [+ BatchNorm2d] + ReLU), 2x max pooling between stages, global average pooling, a linear head."""
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
