"""Model families people explain: torchvision ResNets and timm EfficientNets (``tf_efficientnet_lite0``...),
written as chains and residual sums of the operators (:mod:`explain.bounds.graph` converts them).

Each builder checks the module's exact type (a subclass could compute anything) and the options it reads
(no squeeze-excitation, no space-to-depth stem, average pooling only, ...); anything else raises
:class:`~explain.bounds.convert.UnsupportedLayerError` naming the module. ``check_graph`` then compares the
graph's outputs with the model's on the images.
"""

from __future__ import annotations

from torch import nn

from explain.bounds.convert import converts, exact_type, unsupported
from explain.bounds.linear import Conv2d, Identity, PositiveLinear, batch_norm_affine, global_average_pool


try:  # timm is a dependency of the project, not of every user of explain/
    from timm.layers import BatchNormAct2d, Conv2dSame, DropPath, SelectAdaptivePool2d
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
    from timm.models.efficientnet import EfficientNet
except ImportError:  # pragma: no cover
    EfficientNet = None

if EfficientNet is not None:

    @converts(Conv2dSame)
    def _conv_same(module: Conv2dSame, path: str) -> Conv2d:
        exact_type(module, path, Conv2dSame)
        return Conv2d(module, module.weight.detach(), None if module.bias is None else module.bias.detach(), path,
                      same=True)

    @converts(DropPath)
    def _drop_path(module: DropPath, path: str) -> Identity:
        exact_type(module, path, DropPath)  # the identity in eval
        return Identity(path)

    @converts(BatchNormAct2d)
    def _batch_norm_act(module: BatchNormAct2d, path: str):
        """BatchNorm (eval) then its ``drop`` and ``act`` modules."""
        from explain.bounds.containers import Chain
        from explain.bounds.graph import _chain

        exact_type(module, path, BatchNormAct2d)
        rest = _chain([("drop", module.drop), ("act", module.act)], path)
        return Chain([batch_norm_affine(module, path), *rest.nodes], path)

    @converts(SelectAdaptivePool2d)
    def _select_pool(module: SelectAdaptivePool2d, path: str) -> PositiveLinear:
        exact_type(module, path, SelectAdaptivePool2d)
        if module.pool_type != "avg" or not isinstance(module.pool, nn.AdaptiveAvgPool2d) or \
                module.pool.output_size not in (1, (1, 1)):
            raise unsupported(module, path, f"only global average pooling, got pool_type={module.pool_type!r}")
        return global_average_pool(path, flatten=isinstance(module.flatten, nn.Flatten))

    def _block(module: nn.Module, path: str, names: list[str]):
        from explain.bounds.containers import Chain, Residual
        from explain.bounds.graph import _chain

        if getattr(module, "conv_s2d", None) is not None:
            raise unsupported(module, path, "space-to-depth stem (conv_s2d)")
        if not isinstance(module.se, nn.Identity):
            raise unsupported(module, path, "squeeze-and-excitation (a product of two bounded values)")
        if not module.has_skip:
            return _chain([(name, getattr(module, name)) for name in names], path)
        branch = _chain([(name, getattr(module, name)) for name in [*names, "drop_path"]], path)
        return Residual(Chain([], path), branch, 1.0, 1.0, Chain([], path), path)

    @converts(DepthwiseSeparableConv)
    def _depthwise_separable(module: DepthwiseSeparableConv, path: str):
        exact_type(module, path, DepthwiseSeparableConv)
        return _block(module, path, ["conv_dw", "bn1", "aa", "se", "conv_pw", "bn2"])

    @converts(InvertedResidual)
    def _inverted_residual(module: InvertedResidual, path: str):
        exact_type(module, path, InvertedResidual)
        return _block(module, path, ["conv_pw", "bn1", "conv_dw", "bn2", "aa", "se", "conv_pwl", "bn3"])

    @converts(EfficientNet)
    def _efficientnet(module: EfficientNet, path: str):
        """``forward_features`` then ``forward_head`` (dropout is off in eval)."""
        from explain.bounds.graph import _chain

        exact_type(module, path, EfficientNet)
        names = ["conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", "classifier"]
        return _chain([(name, getattr(module, name)) for name in names], path)


def _torchvision_resnet(module: nn.Module, path: str):
    """torchvision ``ResNet.forward``: stem, four stages, average pooling, flatten, fc."""
    from explain.bounds.graph import _chain

    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    modules = [(name, getattr(module, name)) for name in names]
    return _chain([*modules, ("flatten", nn.Flatten()), ("fc", module.fc)], path)


try:
    from torchvision.models.resnet import ResNet
except ImportError:  # pragma: no cover
    ResNet = None

if ResNet is not None:

    @converts(ResNet)
    def _resnet(module: nn.Module, path: str):
        exact_type(module, path, ResNet)
        return _torchvision_resnet(module, path)
