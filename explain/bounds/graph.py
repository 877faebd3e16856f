"""Turn an ``nn.Module`` into the tree of bound-propagation nodes (:mod:`explain.bounds.node`).

Supported: ``nn.Sequential`` (also deel-torchlip's), ``Linear``, ``Conv2d``, ``BatchNorm1d/2d`` (eval, running
statistics), ``ReLU``, deel-torchlip ``GroupSort2``/``GroupSort(2)`` and ``MaxMin``, average pooling (also
adaptive and deel-torchlip's scaled ones), max pooling, L2-norm pooling (``LPPool2d(2)``, ``ScaledL2NormPool2d``,
``ScaledAdaptativeL2NormPool2d``), ``PixelUnshuffle``/``PixelShuffle`` (``InvertibleDownSampling``/
``InvertibleUpSampling``), ``Flatten``/``Unflatten``, ``Identity``/``Dropout``, residual blocks with attributes
``branch`` and ``merge`` (a deel-torchlip ``LipResidual``: ``merge(x, branch(x))``) and torchvision's
``BasicBlock``/``Bottleneck``. deel-torchlip networks are first exported with
``deel.torchlip.vanilla_model(model, in_place=False)`` (a copy: the caller's model is untouched). Anything else
raises :class:`UnsupportedLayerError` naming the layer's type and module path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explain.base import eval_mode
from explain.bounds.activations import MaxMin, PairSort, ReLU
from explain.bounds.containers import Chain, Residual
from explain.bounds.linear import ChannelAffine, Conv2d, Linear, PositiveLinear
from explain.bounds.node import Node
from explain.bounds.pooling import L2NormPool, MaxPool

SUPPORTED = (
    "Sequential, Linear, Conv2d, BatchNorm1d/2d (eval), ReLU, GroupSort2, MaxMin, AvgPool, AdaptiveAvgPool, MaxPool2d, "
    "L2-norm pooling (LPPool2d(2), ScaledL2NormPool2d, ScaledAdaptativeL2NormPool2d), PixelUnshuffle/"
    "InvertibleDownSampling, PixelShuffle, Flatten, Unflatten, Identity, Dropout, LipResidual blocks "
    "(attributes `branch` and `merge`), torchvision BasicBlock/Bottleneck"
)


class UnsupportedLayerError(TypeError):
    """A layer the bound propagation has no rule for (the message names its type and module path)."""


@dataclass
class BoundGraph:
    """A network ready for bound propagation: ``root`` is the node tree (the network in eval mode, holding
    detached copies of its weights), ``lipschitz_body`` whether everything but the last linear layer is
    declared 1-Lipschitz (L2)."""

    root: Chain
    lipschitz_body: bool
    #: per input shape, dtype and device: the Lipschitz constants of the nonlinear nodes' inputs
    #: (:func:`~explain.bounds.lipschitz.input_gains`)
    gains: dict[tuple, dict] = field(default_factory=dict, repr=False)

    @property
    def head(self) -> Linear | None:
        """The last node when it is a linear layer (needed by the Lipschitz bound)."""
        last = self.root.nodes[-1] if self.root.nodes else None
        return last if isinstance(last, Linear) else None


def build_graph(model: nn.Module, lipschitz_body: bool | None = None) -> BoundGraph:
    """Build the bound graph of ``model`` as it computes in eval mode (BatchNorm with its running statistics,
    Dropout off); the model's train/eval flags are left as they are.

    ``lipschitz_body`` defaults to the model's ``lipschitz_body`` attribute (False when absent).
    """
    if lipschitz_body is None:
        lipschitz_body = bool(getattr(model, "lipschitz_body", False))
    with eval_mode(model):  # vanilla_model switches the model it copies to eval
        root = _convert(_export(model), "")
    if not isinstance(root, Chain):
        root = Chain([root], "")
    return BoundGraph(root=root, lipschitz_body=lipschitz_body)


def check_graph(graph: BoundGraph, model: nn.Module, inputs: Tensor, rtol: float = 1e-3) -> None:
    """Raise if the graph evaluated at the points ``inputs`` does not give ``model(inputs)``.

    A cheap guard (one interval pass on zero-width boxes) against a layer whose forward differs from the
    class it derives from, or a deel-torchlip export that changed the function: the bounds would then be
    bounds of another network.
    """
    from explain.bounds.ibp import interval_bounds

    with torch.no_grad(), eval_mode(model):
        expected = model(inputs)
        got = interval_bounds(graph.root, inputs, inputs)[0]
    if got.shape != expected.shape:
        raise UnsupportedLayerError(
            f"the bound graph outputs shape {tuple(got.shape)} but the model outputs {tuple(expected.shape)}"
        )
    scale = expected.abs().max().clamp(min=1e-6)
    error = (got - expected).abs().max()
    if error > rtol * scale:
        raise UnsupportedLayerError(
            f"the bound graph does not reproduce the model's outputs (max difference {error.item():.3g} for "
            f"outputs up to {scale.item():.3g}): a layer computes something else than the class it derives from "
            "(a subclass with its own forward, or a deel-torchlip vanilla_export that changes the function)"
        )


def _export(model: nn.Module) -> nn.Module:
    """deel-torchlip layers -> plain layers (a copy); plain models are returned as they are."""
    if any(callable(getattr(module, "vanilla_export", None)) for module in model.modules()):
        from deel.torchlip import vanilla_model

        return vanilla_model(model, in_place=False)
    return model


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _unsupported(module: nn.Module, path: str, why: str = "") -> UnsupportedLayerError:
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    where = f"'{path}'" if path else "the model's root"
    reason = f" ({why})" if why else ""
    return UnsupportedLayerError(
        f"bound propagation does not support the layer {type(module).__name__} [{kind}] at {where}{reason}. "
        f"Supported layers: {SUPPORTED}."
    )


def _same_forward(module: nn.Module, base: type) -> bool:
    return type(module).forward is base.forward


def _chain(modules: list[tuple[str, nn.Module]], path: str) -> Chain:
    """A flat chain: nested chains are spliced in so that neighbouring layers see each other."""
    nodes: list[Node] = []
    for name, child in modules:
        node = _convert(child, _join(path, name))
        nodes.extend(node.nodes if isinstance(node, Chain) else [node])
    return Chain(nodes, path)


def _convert(module: nn.Module, path: str) -> Node:
    from deel.torchlip.modules import (
        GroupSort,
        InvertibleDownSampling,
        InvertibleUpSampling,
        LipResidual,
        ScaledAdaptativeL2NormPool2d,
        ScaledAdaptiveAvgPool2d,
        ScaledAvgPool2d,
    )
    from deel.torchlip.modules import MaxMin as LipMaxMin

    if isinstance(module, nn.Sequential):
        if not _same_forward(module, nn.Sequential):
            raise _unsupported(module, path, "a Sequential subclass with its own forward")
        return _chain(list(module.named_children()), path)
    merge, branch = getattr(module, "merge", None), getattr(module, "branch", None)
    if isinstance(merge, LipResidual) and isinstance(branch, nn.Module):
        weight = torch.sigmoid(merge.alpha.detach()).item()
        return Residual(Chain([], path), _chain([("branch", branch)], path), weight, 1.0 - weight, Chain([], path), path)
    residual = _torchvision_residual(module, path)
    if residual is not None:
        return residual

    # affine layers
    if isinstance(module, nn.Linear) and _same_forward(module, nn.Linear):
        return Linear(module.weight.detach(), _detach(module.bias), path)
    if isinstance(module, nn.Conv2d):
        if not (_same_forward(module, nn.Conv2d) or _identity_padded(module)):
            raise _unsupported(module, path, "a Conv2d subclass with its own forward")
        return Conv2d(module, module.weight.detach(), _detach(module.bias), path)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
        return _batch_norm(module, path)

    # monotone linear maps, run by their own forward: exact types only (a subclass could compute anything)
    if type(module) in (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout):
        return PositiveLinear(lambda x: x, path, transpose=lambda A, shape: A)
    if isinstance(module, nn.Flatten) and _same_forward(module, nn.Flatten):
        if module.start_dim == 0:  # would flatten the batch of boxes
            raise _unsupported(module, path, "Flatten must keep the batch dimension (start_dim >= 1)")
        return PositiveLinear(module, path, transpose=_reshape_transpose)
    if isinstance(module, nn.Unflatten) and _same_forward(module, nn.Unflatten):
        return PositiveLinear(module, path, transpose=_reshape_transpose)
    if type(module) in (nn.PixelUnshuffle, InvertibleDownSampling):
        factor = module.downscale_factor
        return PositiveLinear(module, path, transpose=lambda A, shape: _flat_apply(F.pixel_shuffle, A, factor))
    if type(module) in (nn.PixelShuffle, InvertibleUpSampling):
        factor = module.upscale_factor
        return PositiveLinear(module, path, transpose=lambda A, shape: _flat_apply(F.pixel_unshuffle, A, factor))
    average_pools = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
    if type(module) in (*average_pools, ScaledAvgPool2d, ScaledAdaptiveAvgPool2d):
        return PositiveLinear(module, path)

    # nonlinearities
    if type(module) is nn.ReLU:
        return ReLU(path)
    if isinstance(module, GroupSort):
        if module.group_size != 2:
            raise _unsupported(module, path, f"only group size 2 (GroupSort2), got {module.group_size}")
        return PairSort(path, scale=_lipschitz_factor(module, path))
    if isinstance(module, LipMaxMin):
        if module._dim not in (None, 1):
            raise _unsupported(module, path, f"MaxMin only along dim 1, got dim={module._dim}")
        return MaxMin(path, scale=_lipschitz_factor(module, path))
    if isinstance(module, (nn.LPPool2d, ScaledAdaptativeL2NormPool2d)):
        return _l2_pool(module, path)
    if type(module) is nn.MaxPool2d:
        if module.ceil_mode:
            raise _unsupported(module, path, "ceil_mode=True")
        return MaxPool(path, *(_pair(v) for v in (module.kernel_size, module.stride, module.padding, module.dilation)))
    raise _unsupported(module, path)


def _l2_pool(module: nn.Module, path: str) -> L2NormPool:
    """L2-norm pooling. Subclasses with their own forward (e.g. a NaN-safe square root) are accepted when a
    probe input shows they compute the same values."""
    from deel.torchlip.modules.pooling import ScaledAdaptativeL2NormPool2d, ScaledL2NormPool2d

    if isinstance(module, ScaledAdaptativeL2NormPool2d):
        node = L2NormPool(path, None, scale=_lipschitz_factor(module, path))
    else:
        if module.norm_type != 2:
            raise _unsupported(module, path, f"only the L2 norm (norm_type=2), got {module.norm_type}")
        kernel = _pair(module.kernel_size)
        stride = kernel if module.stride is None else _pair(module.stride)
        if stride != kernel or module.ceil_mode:
            raise _unsupported(module, path, "L2-norm pooling needs stride = kernel_size and ceil_mode=False")
        scale = _lipschitz_factor(module, path) if isinstance(module, ScaledL2NormPool2d) else 1.0
        node = L2NormPool(path, kernel, scale=scale)
    if type(module) not in (nn.LPPool2d, ScaledL2NormPool2d, ScaledAdaptativeL2NormPool2d):
        kernel = node.kernel or (2, 3)
        probe = torch.randn(2, 3, 2 * kernel[0] + 1, 3 * kernel[1], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = node.interval(probe, probe, {})[0]
            got = module(probe)
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise _unsupported(module, path, "its forward does not compute the L2-norm pooling of its base class")
    return node


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _detach(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach()


def _identity_padded(module: nn.Module) -> bool:
    """deel-torchlip's PadConv2d: a Conv2d whose forward only adds a (here: identity) padding."""
    return hasattr(module, "old_padding_mode") and module.old_padding_mode.lower() != "symmetric"


def _lipschitz_factor(module: nn.Module, path: str) -> float:
    factor = float(getattr(module, "_coefficient_lip", 1.0))
    if not factor > 0:
        raise _unsupported(module, path, f"Lipschitz factor must be positive, got {factor}")
    return factor


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, path: str) -> ChannelAffine:
    if module.running_mean is None or module.running_var is None:
        raise _unsupported(module, path, "BatchNorm without running statistics uses batch statistics in eval")
    scale = torch.rsqrt(module.running_var.detach() + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.detach()
    shift = -module.running_mean.detach() * scale
    if module.bias is not None:
        shift = shift + module.bias.detach()
    return ChannelAffine(scale, shift, path)


def _reshape_transpose(A: Tensor, in_shape: torch.Size) -> Tensor:
    return A.reshape(*A.shape[:2], *in_shape)


def _flat_apply(fn, A: Tensor, factor: int) -> Tensor:
    out = fn(A.flatten(0, 1), factor)
    return out.view(*A.shape[:2], *out.shape[1:])


def _torchvision_residual(module: nn.Module, path: str) -> Residual | None:
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # torchvision is optional for explain/
        return None
    if type(module) is BasicBlock:
        names = ["conv1", "bn1", "relu", "conv2", "bn2"]
    elif type(module) is Bottleneck:
        names = ["conv1", "bn1", "relu", "conv2", "bn2", "relu", "conv3", "bn3"]
    else:
        return None
    branch = _chain([(name, getattr(module, name)) for name in names], path)
    downsample = [] if module.downsample is None else [("downsample", module.downsample)]
    shortcut = _chain(downsample, path)
    return Residual(shortcut, branch, 1.0, 1.0, Chain([ReLU(_join(path, "relu"))], path), path)


