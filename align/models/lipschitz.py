"""1-Lipschitz, gradient-norm-preserving networks, as named ``nn.Sequential``s: ``center, stem, stage1..stageN,
pool, flatten, head``.

The body (everything before ``head``) is 1-Lipschitz in L2, and at initialisation it keeps the norm of the
gradient (GNP, Anil et al. 2019; Boissin et al. 2025), so a deep stack still trains:

* ``center``: ``x - 0.5`` (:class:`Shift`), an isometry;
* ``stem``: pixel-unshuffles (deel-torchlip's ``InvertibleDownSampling``, an isometry) that trade resolution for
  channels before the first convolution. A layer that widens the signal from ``d`` to ``D`` dimensions passes
  back only about ``sqrt(d / D)`` of a gradient's norm; with 3 input channels a first conv to 16 channels keeps
  0.43 of it, after one unshuffle (12 channels) 0.87;
* orthogonal convolutions of any kernel size: orthogonium's Adaptive Orthogonal Convolution (``conv="aoc"``,
  Boissin et al. 2025, explicit kernels from block-orthogonal BCOP/RKO factors), or its skew-orthogonal
  ``"soc"`` (a truncated matrix exponential: the layer-wise certificate measures it 1.5% above 1-Lipschitz, so
  it is there for comparison only), or deel-torchlip's ``SpectralConv2d`` (``"spectral"``: Björck-orthogonalised, then rescaled by
  1/k for a k x k kernel, so it loses gain at every layer: kept for comparison, see BENCHMARKS.md). Circular
  padding by default: an orthogonal kernel then gives an exactly orthogonal layer; with zero padding the layer
  stays 1-Lipschitz but loses gain at the borders;
* GroupSort2 activations (a permutation of each pair: GNP);
* between stages a 2x downsampling: ``"invertible"`` (pixel-unshuffle, an isometry) or ``"l2"`` (L2-norm
  pooling, whose backward pass is an isometry too);
* residual blocks ``sigmoid(a) x + (1 - sigmoid(a)) branch(x)`` (deel-torchlip's ``LipResidual``, a convex
  combination of 1-Lipschitz maps). Such a merge keeps only ``sqrt(s^2 + (1 - s)^2)`` of a gradient's norm when
  the branch is a random orthogonal map (0.71 at deel-torchlip's default s = 0.5: 8 blocks keep 6%), so
  ``a`` starts at ``logit(residual_init)`` with ``residual_init = 0.95`` (0.95 per block): the branches start
  small, as the zero-initialised last BatchNorm of a standard ResNet (Goyal et al. 2017), and ``a`` is learned;
* a global L2-norm pooling (its backward pass is an isometry);
* a ``FrobeniusLinear`` head with unit-norm rows, so each logit is 1-Lipschitz and the margin ``f_i - f_j`` is
  ``||w_i - w_j||``-Lipschitz (see :mod:`align.certification`).

Every Sequential carries ``lipschitz_body = True``. :func:`export_plain` turns a trained network into plain torch
layers (``Conv2d`` with the materialised orthogonal kernel, ``Linear``) with the same outputs, for fast inference
and for the bound propagation of EVA.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from deel import torchlip
from torch import Tensor, nn

from align.models.pooling import GlobalL2NormPool2d, L2NormPool2d
from explain.base import eval_mode
from explain.validation import in_interval, non_negative_int, one_of, positive_int

Pooling = Literal["l2", "invertible"]
ConvKind = Literal["aoc", "soc", "spectral"]
PaddingMode = Literal["circular", "zeros"]


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


class OrthoConv2d(nn.Module):
    """An orthogonal convolution of orthogonium (``kind="aoc"``: ``AdaptiveOrthoConv2d``; ``"soc"``:
    ``AdaptiveSOCConv2d``), stride 1, "same" padding. Its weight is recomputed from free parameters at every
    forward (a torch parametrization); ``vanilla_export`` freezes it into a plain ``nn.Conv2d``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        kind: Literal["aoc", "soc"] = "aoc",
        padding_mode: PaddingMode = "circular",
    ) -> None:
        super().__init__()
        from orthogonium.layers.conv.adaptiveSOC import AdaptiveSOCConv2d
        from orthogonium.layers.conv.AOC import AdaptiveOrthoConv2d
        from orthogonium.reparametrizers import L2Normalize

        factory = {"aoc": AdaptiveOrthoConv2d, "soc": AdaptiveSOCConv2d}[one_of("kind", kind, ("aoc", "soc"))]
        conv = factory(in_channels, out_channels, kernel_size, padding=kernel_size // 2, padding_mode=padding_mode)
        explicit = conv.weight.shape[-1]  # SOC's explicit kernel is larger than kernel_size (7 for 3)
        if explicit != kernel_size:
            conv = factory(in_channels, out_channels, kernel_size, padding=explicit // 2, padding_mode=padding_mode)
        for module in conv.modules():
            if isinstance(module, L2Normalize):
                # it fixes the dtype of its norm at creation, so model.double() would fail: norm in the input's dtype
                module.dtype = None
        self.conv = conv
        # AOC's layer is an nn.Conv2d whose `weight` is a parametrization: its forward can take a given kernel
        self._explicit = isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward
        self._kernel_memo: dict[str, Tensor] | None = None  # set by `orthogonal_kernels_once`

    def forward(self, x: Tensor) -> Tensor:
        # orthogonium's power iteration assigns its products to float32 parametrized vectors, which fails under
        # autocast (bf16-mixed): the layer runs in the weight's precision, autocast off (the next layer casts back)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(next(self.conv.parameters()).dtype)
            if self._kernel_memo is None or not self._explicit:
                return self.conv(x)
            if "weight" not in self._kernel_memo:
                self._kernel_memo["weight"] = self.conv.weight  # the parametrization, evaluated once
            return self._convolve(x, self._kernel_memo["weight"])

    def _convolve(self, x: Tensor, weight: Tensor) -> Tensor:
        """``nn.Conv2d.forward`` of the wrapped layer with the given kernel (its padding mode included)."""
        conv = self.conv
        if conv.padding_mode == "zeros":
            return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        pad = [amount for amount in reversed(conv.padding) for _ in range(2)]
        padded = F.pad(x, pad, mode=conv.padding_mode)
        return F.conv2d(padded, weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)

    def vanilla_export(self) -> nn.Conv2d:
        source = self.conv
        weight = source.weight.detach()  # evaluates the parametrization once
        plain = nn.Conv2d(
            source.in_channels,
            source.out_channels,
            tuple(weight.shape[-2:]),
            stride=source.stride,
            padding=source.padding,
            dilation=source.dilation,
            groups=source.groups,
            bias=source.bias is not None,
            padding_mode=source.padding_mode,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            plain.weight.copy_(weight)
            if source.bias is not None:
                plain.bias.copy_(source.bias)
        return plain


@contextmanager
def orthogonal_kernels_once(model: nn.Module) -> Iterator[None]:
    """Within the block, each AOC :class:`OrthoConv2d` of ``model`` computes its orthogonal kernel at its first
    call and reuses that tensor (and its autograd graph) in later calls; outside, every call recomputes it.

    For several forward passes that share one optimizer step (the split harmonized step: the annotated images
    with the double backprop, the others plain), the kernels are then computed once, as in one full-batch pass.
    ``torch.nn.utils.parametrize.cached()`` cannot do this: it also caches the parametrized singular vectors of
    orthogonium's power iteration, which reads back what it assigns, so the iteration freezes and the spectral
    normalisation goes wrong (training diverges). Here the kernel's parametrization runs normally, once.
    SOC layers (whose forward is not a plain convolution) recompute as usual.
    """
    layers = [module for module in model.modules() if isinstance(module, OrthoConv2d)]
    for layer in layers:
        layer._kernel_memo = {}
    try:
        yield
    finally:
        for layer in layers:
            layer._kernel_memo = None


class LipResidualBlock(nn.Module):
    """``merge(x, branch(x)) = sigmoid(a) x + (1 - sigmoid(a)) branch(x)``: a convex combination of two
    1-Lipschitz maps, hence 1-Lipschitz (``merge`` is ``deel.torchlip.LipResidual``, ``a`` is learned and starts
    at ``logit(identity_weight)``)."""

    def __init__(self, branch: nn.Module, identity_weight: float = 0.5) -> None:
        super().__init__()
        in_interval("identity_weight", identity_weight, 0.0, 1.0, low_open=True, high_open=True)
        self.branch = branch
        self.merge = torchlip.LipResidual()
        with torch.no_grad():
            self.merge.alpha.fill_(math.log(identity_weight / (1 - identity_weight)))

    def forward(self, x: Tensor) -> Tensor:
        return self.merge(x, self.branch(x))


def _conv(kind: ConvKind, in_channels: int, out_channels: int, kernel_size: int, padding_mode: PaddingMode):
    if kind == "spectral":
        return torchlip.SpectralConv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, padding_mode=padding_mode
        )
    return OrthoConv2d(in_channels, out_channels, kernel_size, kind, padding_mode)


def _downsample(pooling: Pooling, channels: int) -> tuple[nn.Module, int]:
    """A 1-Lipschitz 2x downsampling and the number of channels it outputs (see :mod:`align.models.pooling`)."""
    if pooling == "l2":
        return L2NormPool2d(kernel_size=2), channels
    return torchlip.InvertibleDownSampling(2), 4 * channels


def _check(num_classes: int, widths: Sequence[int], pooling: str, conv: str, padding_mode: str) -> None:
    if positive_int("num_classes", num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 2 or w % 2 for w in widths):
        raise ValueError(f"widths must be a non-empty list of even ints (GroupSort2 pairs channels), got {widths}")
    one_of("pooling", pooling, ("l2", "invertible"))
    one_of("conv", conv, ("aoc", "soc", "spectral"))
    one_of("padding_mode", padding_mode, ("circular", "zeros"))


def _start(center: float | None, in_channels: int, stem_downsample: int) -> tuple[OrderedDict, int]:
    """``center`` and the pixel-unshuffles of the stem, and the number of channels they output."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if center is not None:
        layers["center"] = Shift(center, in_channels)
    non_negative_int("stem_downsample", stem_downsample)
    if stem_downsample:
        layers["stem"] = nn.Sequential(*(torchlip.InvertibleDownSampling(2) for _ in range(stem_downsample)))
    return layers, in_channels * 4**stem_downsample


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
    widths: Sequence[int] = (16, 32, 64),
    depth: int = 1,
    kernel_size: int = 3,
    pooling: Pooling = "invertible",
    stem_downsample: int = 1,
    conv: ConvKind = "aoc",
    padding_mode: PaddingMode = "circular",
    center: float | None = 0.5,
) -> nn.Sequential:
    """VGG-like 1-Lipschitz CNN (module docstring): ``center``, ``stem_downsample`` pixel-unshuffles, then
    ``len(widths)`` stages of ``depth`` x (orthogonal conv + GroupSort2) with a 2x downsampling between stages
    (``"invertible"`` or ``"l2"``), a global L2-norm pooling and a ``FrobeniusLinear`` head.

    With the defaults a 32 x 32 image is seen at 16, 8 and 4 pixels by the three stages. ``conv``: ``"aoc"``
    (default), ``"soc"`` or ``"spectral"`` (deel-torchlip); ``center``: subtract this value from the input first
    (:class:`Shift`; None: no shift)."""
    _check(num_classes, widths, pooling, conv, padding_mode)
    positive_int("depth", depth)
    positive_int("kernel_size", kernel_size)
    layers, channels = _start(center, in_channels, stem_downsample)
    for index, width in enumerate(widths):
        stage: list[nn.Module] = []
        if index > 0:
            down, channels = _downsample(pooling, channels)
            stage.append(down)
        for _ in range(depth):
            stage += [_conv(conv, channels, width, kernel_size, padding_mode), torchlip.GroupSort2()]
            channels = width
        layers[f"stage{index + 1}"] = nn.Sequential(*stage)
    return _finish(layers, channels, num_classes)


def lip_resnet(
    num_classes: int,
    in_channels: int = 3,
    widths: Sequence[int] = (16, 32, 64),
    blocks: int | Sequence[int] = 1,
    kernel_size: int = 3,
    pooling: Pooling = "invertible",
    stem_downsample: int = 1,
    conv: ConvKind = "aoc",
    padding_mode: PaddingMode = "circular",
    residual_init: float = 0.95,
    center: float | None = 0.5,
) -> nn.Sequential:
    """Residual 1-Lipschitz network (module docstring): ``center``, ``stem_downsample`` pixel-unshuffles, then
    per stage a 2x downsampling (not in the first), an orthogonal conv to the stage width + GroupSort2, and
    ``blocks`` residual blocks ``LipResidualBlock(conv-GS2-conv-GS2)`` whose identity weight starts at
    ``residual_init``; global L2-norm pooling and a ``FrobeniusLinear`` head. Use ``stem_downsample=2`` for
    224 x 224 inputs (the first stage then runs at 56 x 56 on 48 channels).

    Raises:
        ValueError: bad ``num_classes``, ``widths``, ``pooling``, ``conv``, ``padding_mode``, ``kernel_size`` or
            ``residual_init``, or ``blocks`` neither an int nor one non-negative int per width.
    """
    _check(num_classes, widths, pooling, conv, padding_mode)
    positive_int("kernel_size", kernel_size)
    blocks = [blocks] * len(widths) if isinstance(blocks, int) else list(blocks)
    if len(blocks) != len(widths) or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in blocks):
        raise ValueError(f"blocks must be an int or one non-negative int per width, got {blocks} for {widths}")
    layers, channels = _start(center, in_channels, stem_downsample)
    for index, (width, count) in enumerate(zip(widths, blocks)):
        stage: list[nn.Module] = []
        if index > 0:
            down, channels = _downsample(pooling, channels)
            stage.append(down)
        stage += [_conv(conv, channels, width, kernel_size, padding_mode), torchlip.GroupSort2()]
        channels = width
        for _ in range(count):
            branch = nn.Sequential(
                _conv(conv, width, width, kernel_size, padding_mode),
                torchlip.GroupSort2(),
                _conv(conv, width, width, kernel_size, padding_mode),
                torchlip.GroupSort2(),
            )
            stage.append(LipResidualBlock(branch, residual_init))
        layers[f"stage{index + 1}"] = nn.Sequential(*stage)
    return _finish(layers, channels, num_classes)


def export_plain(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every constrained layer replaced by its plain torch counterpart
    (``deel.torchlip.vanilla_model(model, in_place=False)``, which calls each layer's ``vanilla_export``: torchlip
    layers and :class:`OrthoConv2d` become ``Conv2d``/``Linear``), in eval mode; ``model`` keeps its train/eval
    state.

    The copy computes the same function as ``model`` in eval mode (the constrained weights are frozen into
    ordinary ``Conv2d``/``Linear`` weights) and keeps the child names and ``lipschitz_body``.
    """
    with eval_mode(model):  # vanilla_model switches the source model to eval and never switches it back
        plain = torchlip.vanilla_model(model, in_place=False)
    return plain.eval()
