"""The ``nn.Module`` type -> node builder table, filled next to each operator by :func:`converts`.

A new layer is one class in one operator module with its ``@converts(ModuleType)`` builder beside it;
:func:`explain.bounds.graph.build_graph` looks a module's type up here (nearest registered base class first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

SUPPORTED = (
    "Sequential, Linear, Conv2d, BatchNorm1d/2d (eval), ReLU, GroupSort2, MaxMin, AvgPool, AdaptiveAvgPool, MaxPool2d, "
    "L2-norm pooling (LPPool2d(2), ScaledL2NormPool2d, ScaledAdaptativeL2NormPool2d), PixelUnshuffle/"
    "InvertibleDownSampling, PixelShuffle, Flatten, Unflatten, Identity, Dropout, LipResidual blocks "
    "(attributes `branch` and `merge`), torchvision BasicBlock/Bottleneck and ResNet, ReLU6/Hardtanh, timm "
    "Conv2dSame (TF 'same' padding), BatchNormAct2d, SelectAdaptivePool2d (avg), DepthwiseSeparableConv/"
    "InvertedResidual without squeeze-excitation, EfficientNet (tf_efficientnet_lite*)"
)

#: ``nn.Module`` type -> ``builder(module, path) -> Node``
CONVERTERS: dict[type, Callable[[Any, str], Any]] = {}


class UnsupportedLayerError(TypeError):
    """A layer the bound propagation has no rule for (the message names its type and module path)."""


def converts(*types: type) -> Callable:
    """Register the decorated ``builder(module, path) -> Node`` for modules of ``types`` and their subclasses
    (a builder refuses a subclass it cannot trust with :func:`unsupported`)."""

    def register(builder: Callable) -> Callable:
        for kind in types:
            CONVERTERS[kind] = builder
        return builder

    return register


def converter(module: nn.Module) -> Callable | None:
    """The builder registered for the nearest class of ``module``'s type (None when there is none)."""
    for kind in type(module).__mro__:
        if kind in CONVERTERS:
            return CONVERTERS[kind]
    return None


def unsupported(module: nn.Module, path: str, why: str = "") -> UnsupportedLayerError:
    """The error for a layer without a rule: its type, module path, and the list of supported layers."""
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    where = f"'{path}'" if path else "the model's root"
    reason = f" ({why})" if why else ""
    return UnsupportedLayerError(
        f"bound propagation does not support the layer {type(module).__name__} [{kind}] at {where}{reason}. "
        f"Supported layers: {SUPPORTED}."
    )


def same_forward(module: nn.Module, base: type) -> bool:
    """True when ``module`` runs ``base``'s forward (not a subclass's own)."""
    return type(module).forward is base.forward


def exact_type(module: nn.Module, path: str, *types: type) -> None:
    """Raise unless ``module``'s type is one of ``types`` exactly (a subclass could compute anything).

    Raises:
        UnsupportedLayerError: ``type(module)`` is not one of ``types``.
    """
    if type(module) not in types:
        raise unsupported(module, path)


def pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def detach(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach()


def lipschitz_factor(module: nn.Module, path: str) -> float:
    """deel-torchlip's ``k_coef_lip`` scale of an activation or pooling layer (1 when absent).

    Raises:
        UnsupportedLayerError: a factor that is not positive.
    """
    factor = float(getattr(module, "_coefficient_lip", 1.0))
    if not factor > 0:
        raise unsupported(module, path, f"Lipschitz factor must be positive, got {factor}")
    return factor
