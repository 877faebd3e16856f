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
from torch import Tensor, nn

import explain.bounds.activations  # noqa: F401  (each operator module registers its builders)
import explain.bounds.families  # noqa: F401
import explain.bounds.linear  # noqa: F401
import explain.bounds.pooling  # noqa: F401
from explain.base import eval_mode
from explain.bounds.activations import ReLU
from explain.bounds.containers import Chain, Residual
from explain.bounds.convert import SUPPORTED, UnsupportedLayerError, converter, same_forward, unsupported
from explain.bounds.linear import Linear
from explain.bounds.node import Node

__all__ = ["SUPPORTED", "BoundGraph", "UnsupportedLayerError", "build_graph", "check_graph"]


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

    Raises:
        UnsupportedLayerError: the graph's output differs from the model's (beyond ``rtol``), or has another shape.
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


def _chain(modules: list[tuple[str, nn.Module]], path: str) -> Chain:
    """A flat chain: nested chains are spliced in so that neighbouring layers see each other."""
    nodes: list[Node] = []
    for name, child in modules:
        node = _convert(child, _join(path, name))
        nodes.extend(node.nodes if isinstance(node, Chain) else [node])
    return Chain(nodes, path)


def _convert(module: nn.Module, path: str) -> Node:
    """Containers and residual blocks here; every other layer by its type's builder
    (:data:`explain.bounds.convert.CONVERTERS`, registered next to each operator)."""
    if isinstance(module, nn.Sequential):
        if not same_forward(module, nn.Sequential):
            raise unsupported(module, path, "a Sequential subclass with its own forward")
        return _chain(list(module.named_children()), path)
    residual = _lip_residual(module, path) or _torchvision_residual(module, path)
    if residual is not None:
        return residual
    build = converter(module)
    if build is None:
        raise unsupported(module, path)
    return build(module, path)


def _lip_residual(module: nn.Module, path: str) -> Residual | None:
    """The project's residual contract: ``merge(x, branch(x))`` with a deel-torchlip ``LipResidual``."""
    from deel.torchlip.modules import LipResidual

    merge, branch = getattr(module, "merge", None), getattr(module, "branch", None)
    if not (isinstance(merge, LipResidual) and isinstance(branch, nn.Module)):
        return None
    weight = torch.sigmoid(merge.alpha.detach()).item()
    return Residual(Chain([], path), _chain([("branch", branch)], path), weight, 1.0 - weight, Chain([], path), path)


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


