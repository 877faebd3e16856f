"""1-Lipschitz networks on deel-torchlip, as named ``nn.Sequential``s: ``center, stage1..stageN, pool, flatten,
head``.

The body (everything before ``head``) is 1-Lipschitz in L2: a centring shift, orthogonal convolutions
(``SpectralConv2d``: spectral normalisation + Bjorck orthogonalisation + the LConv coefficient), GroupSort2
activations, L2-norm pooling or invertible downsampling (a pixel-unshuffle, an isometry), and convex residual
merges. The head is a ``FrobeniusLinear`` whose rows have unit norm, so each logit is 1-Lipschitz and the margin
``f_i - f_j`` is ``||w_i - w_j||``-Lipschitz (see :mod:`align.certification`). Every Sequential carries
``lipschitz_body = True``.

Why the defaults of :func:`lip_vgg` use 1x1 convolutions after invertible downsampling (i.e. orthogonal 2x2
stride-2 convolutions): torchlip bounds a k x k convolution by scaling its orthogonal kernel by 1/k, so each 3x3
layer loses about two thirds of the signal's norm; a stack of them trains an order of magnitude slower. A 1x1
orthogonal convolution and a pixel-unshuffle lose nothing (the network stays gradient-norm preserving).

:func:`export_plain` turns a trained network into plain torch layers (``Conv2d``, ``Linear``) with the same
outputs, for fast inference and for the bound propagation of EVA.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
from deel import torchlip
from torch import Tensor, nn

from align.models.pooling import GlobalL2NormPool2d, L2NormPool2d
from explain.base import eval_mode

Pooling = Literal["l2", "invertible"]


class Shift(nn.Module):
    """``x - offset``: centres [0, 1] images on 0 (an isometry, so the network stays 1-Lipschitz in input space).

    A 1-Lipschitz network cannot rescale its input, and a large constant component (every pixel near 0.5) takes
    up its unit gain: centring speeds up training (on the shortcut data, 38% instead of 29% accuracy after 3
    epochs). Exported as an identity 1x1 ``Conv2d`` with bias ``-offset`` (plain torch, which bound propagation
    understands).
    """

    def __init__(self, offset: float = 0.5, channels: int = 3) -> None:
        super().__init__()
        self.channels = channels
        # a buffer, so that the exported Conv2d lands on the model's device and dtype (not in checkpoints)
        self.register_buffer("offset", torch.tensor(float(offset)), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x - self.offset

    def vanilla_export(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.channels, self.channels, 1, device=self.offset.device, dtype=self.offset.dtype)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(self.channels)[:, :, None, None])
            conv.bias.copy_(-self.offset.expand(self.channels))
        return conv

    def extra_repr(self) -> str:
        return f"offset={self.offset.item()}"


class LipResidualBlock(nn.Module):
    """``merge(x, branch(x)) = sigmoid(a) x + (1 - sigmoid(a)) branch(x)``: a convex combination of two
    1-Lipschitz maps, hence 1-Lipschitz (``merge`` is ``deel.torchlip.LipResidual``, ``a`` is learned)."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch
        self.merge = torchlip.LipResidual()

    def forward(self, x: Tensor) -> Tensor:
        return self.merge(x, self.branch(x))


def _conv(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Module:
    return torchlip.SpectralConv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


def _downsample(pooling: Pooling, channels: int) -> tuple[nn.Module, int]:
    """A 1-Lipschitz 2x downsampling and the number of channels it outputs (see :mod:`align.models.pooling`)."""
    if pooling == "l2":
        return L2NormPool2d(kernel_size=2), channels
    if pooling == "invertible":
        return torchlip.InvertibleDownSampling(2), 4 * channels
    raise ValueError(f"pooling must be 'l2' or 'invertible', got {pooling!r}")


def _check(num_classes: int, widths: Sequence[int]) -> None:
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not widths or any(w < 2 or w % 2 for w in widths):
        raise ValueError(f"widths must be a non-empty list of even ints (GroupSort2 pairs channels), got {widths}")


def _start(center: float | None, in_channels: int) -> OrderedDict[str, nn.Module]:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if center is not None:
        layers["center"] = Shift(center, in_channels)
    return layers


def _finish(layers: OrderedDict, width: int, num_classes: int) -> nn.Sequential:
    layers["pool"] = GlobalL2NormPool2d()
    layers["flatten"] = nn.Flatten()
    layers["head"] = torchlip.FrobeniusLinear(width, num_classes, disjoint_neurons=True)
    model = nn.Sequential(layers)
    model.lipschitz_body = True
    return model


def lip_vgg(
    num_classes: int,
    in_channels: int = 3,
    widths: Sequence[int] = (16, 32, 64, 128),
    depth: int = 1,
    kernel_size: int = 1,
    pooling: Pooling = "invertible",
    center: float | None = 0.5,
) -> nn.Sequential:
    """VGG-like 1-Lipschitz CNN: ``len(widths)`` stages of ``depth`` x (SpectralConv2d + GroupSort2), a 2x
    1-Lipschitz downsampling between stages (``"l2"``: L2-norm pooling, ``"invertible"``:
    ``InvertibleDownSampling``), a global L2-norm pooling and a ``FrobeniusLinear`` head. ``center``: subtract
    this value from the input first (:class:`Shift`; None: no shift)."""
    _check(num_classes, widths)
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    layers = _start(center, in_channels)
    channels = in_channels
    for index, width in enumerate(widths):
        stage: list[nn.Module] = []
        if index > 0:
            down, channels = _downsample(pooling, channels)
            stage.append(down)
        for _ in range(depth):
            stage += [_conv(channels, width, kernel_size), torchlip.GroupSort2()]
            channels = width
        layers[f"stage{index + 1}"] = nn.Sequential(*stage)
    return _finish(layers, channels, num_classes)


def lip_resnet(
    num_classes: int,
    in_channels: int = 3,
    widths: Sequence[int] = (16, 32, 64),
    blocks: int | Sequence[int] = 1,
    kernel_size: int = 3,
    pooling: Pooling = "l2",
    stem_downsample: int = 0,
    center: float | None = 0.5,
) -> nn.Sequential:
    """Residual 1-Lipschitz network: a stem conv, then per stage a 2x downsampling (not in the first), a conv to
    the stage width and ``blocks`` residual blocks ``LipResidualBlock(conv-GS2-conv-GS2)``; global L2-norm
    pooling and a ``FrobeniusLinear`` head. ``stem_downsample`` extra 2x downsamplings after the stem (e.g. 2 for
    224x224 inputs); ``center`` as in :func:`lip_vgg`."""
    _check(num_classes, widths)
    blocks = [blocks] * len(widths) if isinstance(blocks, int) else list(blocks)
    if len(blocks) != len(widths) or any(b < 0 for b in blocks):
        raise ValueError(f"blocks must be an int or one non-negative int per width, got {blocks} for {widths}")
    layers = _start(center, in_channels)
    stem: list[nn.Module] = [_conv(in_channels, widths[0], kernel_size), torchlip.GroupSort2()]
    channels = widths[0]
    for _ in range(stem_downsample):
        down, channels = _downsample(pooling, channels)
        stem += [down, _conv(channels, widths[0], 1), torchlip.GroupSort2()]
        channels = widths[0]
    layers["stem"] = nn.Sequential(*stem)
    for index, (width, count) in enumerate(zip(widths, blocks)):
        stage: list[nn.Module] = []
        if index > 0:
            down, channels = _downsample(pooling, channels)
            stage += [down, _conv(channels, width, kernel_size), torchlip.GroupSort2()]
            channels = width
        for _ in range(count):
            branch = nn.Sequential(
                _conv(width, width, kernel_size),
                torchlip.GroupSort2(),
                _conv(width, width, kernel_size),
                torchlip.GroupSort2(),
            )
            stage.append(LipResidualBlock(branch))
        layers[f"stage{index + 1}"] = nn.Sequential(*stage)
    return _finish(layers, channels, num_classes)


def export_plain(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every torchlip layer replaced by its plain torch counterpart
    (``deel.torchlip.vanilla_model(model, in_place=False)``), in eval mode; ``model`` keeps its train/eval state.

    The copy computes the same function as ``model`` in eval mode (the constrained weights are frozen into
    ordinary ``Conv2d``/``Linear`` weights) and keeps the child names and ``lipschitz_body``.
    """
    with eval_mode(model):  # vanilla_model switches the source model to eval and never switches it back
        plain = torchlip.vanilla_model(model, in_place=False)
    return plain.eval()
