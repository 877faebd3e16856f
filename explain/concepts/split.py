"""Split a classifier into ``input_to_latent`` (g) and ``latent_to_logit`` (h), with ``model = h o g``.

CRAFT factorizes the activations of ``g`` (Fel et al. 2023). :func:`split_model` handles

* ``nn.Sequential`` models (the project's networks: ``features``..., a global pooling child, ``flatten``,
  ``head``), split after a named child, by default the child just before the first global pooling layer;
* torchvision ResNets (whose ``forward`` flattens before ``fc``), by default after ``layer4``;
* timm models, through their ``forward_features`` / ``forward_head``: CNNs as they are ([B, C, h, w] features),
  vision transformers by their patch tokens reshaped to [B, C, h, w] (the class/register tokens are dropped,
  which is exact when the head pools the patch tokens: ``global_pool="avg"``, ``"max"`` or ``"avgmax"``).
* class-token vision transformers (timm's default ``global_pool="token"``, every pretrained ViT-S/16): split
  before the last block. The latent is the tokens that leave block L-1: the patch tokens as [B, C, h, w], with the
  P prefix (class/register) tokens appended as P C more channels, the same at every location
  (:class:`TimmTokensBeforeLastBlock`); ``latent_to_logit`` reads the prefix tokens back as the spatial mean of
  those channels and runs the last block, the norm and the head on the class token
  (:class:`TimmLastBlockHead`). Exact on the model's own latents; concepts of the patch tokens then drive the
  logit through the last block's attention (and a concept also carries its part of the class token).
Transformer tokens are signed: use ``sign_split=True`` for NMF (other dictionaries take signed activations).

CRAFT needs ``g >= 0``. 1-Lipschitz networks with GroupSort2/MaxMin activations have signed activations:
``sign_split=True`` makes the split exact for them too, with ``g'(x) = cat(relu(z), relu(-z))`` (``z = g(x)``,
twice the channels, nonnegative) and ``h'(p, n) = h(p - n)``, since ``relu(z) - relu(-z) = z``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd


class SignSplit(nn.Module):
    """``z -> cat(relu(z), relu(-z))`` along ``dim`` (channels): nonnegative, and exactly invertible."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, z: Tensor) -> Tensor:
        return torch.cat([z.clamp_min(0), (-z).clamp_min(0)], dim=self.dim)


class SignMerge(nn.Module):
    """``cat(p, n) -> p - n`` along ``dim``: the inverse of :class:`SignSplit`."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, latent: Tensor) -> Tensor:
        positive, negative = latent.chunk(2, dim=self.dim)
        return positive - negative


def is_global_pooling(module: nn.Module) -> bool:
    """An adaptive average/max pooling to 1 x 1 (deel-torchlip's scaled and L2-norm variants included)."""
    if not isinstance(module, (_AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd)):
        return False
    size = module.output_size
    sizes = size if isinstance(size, (tuple, list)) else (size,)
    return all(s == 1 for s in sizes)


class TimmFeatures(nn.Module):
    """``model.forward_features(x)``, with a vision transformer's patch tokens [B, prefix + h w, C] reshaped to
    [B, C, h, w] (the ``prefix`` class/register tokens dropped).

    Raises:
        ValueError: at the call, patch tokens that do not form the grid of the image.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        features = self.model.forward_features(x)
        if features.ndim != 3:
            return features
        prefix = getattr(self.model, "num_prefix_tokens", 0)
        patch = self.model.patch_embed.patch_size
        height, width = x.shape[-2] // patch[0], x.shape[-1] // patch[1]
        tokens = features[:, prefix:]
        if tokens.shape[1] != height * width:
            raise ValueError(
                f"{type(self.model).__name__} gives {tokens.shape[1]} patch tokens for a {tuple(x.shape[-2:])} image, "
                f"not the {height} x {width} grid of its {tuple(patch)} patches"
            )
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, height, width)


class TimmHead(nn.Module):
    """``model.forward_head`` on [B, C, h, w] features (for a vision transformer: back to tokens, with zeros in
    the places of the class/register tokens, which its patch-pooling head ignores)."""

    def __init__(self, model: nn.Module, tokens: bool) -> None:
        super().__init__()
        self.model, self.tokens = model, tokens

    def forward(self, features: Tensor) -> Tensor:
        if self.tokens:
            features = features.flatten(2).transpose(1, 2)
            prefix = getattr(self.model, "num_prefix_tokens", 0)
            features = torch.cat([features.new_zeros(features.shape[0], prefix, features.shape[2]), features], 1)
        return self.model.forward_head(features)


def _patch_grid(model: nn.Module, x: Tensor) -> tuple[int, int]:
    patch = model.patch_embed.patch_size
    return x.shape[-2] // patch[0], x.shape[-1] // patch[1]


class TimmTokensBeforeLastBlock(nn.Module):
    """The tokens that leave block L-1 of a timm vision transformer: patches [B, C, h, w], then the P prefix
    tokens as P C channels broadcast over the grid: [B, (1 + P) C, h, w] (module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        model = self.model
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        tokens = model.blocks[:-1](tokens)
        prefix, height, width = model.num_prefix_tokens, *_patch_grid(model, x)
        batch, count, channels = tokens.shape
        if count != prefix + height * width:
            raise ValueError(
                f"{type(model).__name__} gives {count - prefix} patch tokens for a {tuple(x.shape[-2:])} image, not "
                f"the {height} x {width} grid of its patches"
            )
        patches = tokens[:, prefix:].transpose(1, 2).reshape(batch, channels, height, width)
        extra = tokens[:, :prefix].reshape(batch, prefix * channels, 1, 1).expand(-1, -1, height, width)
        return torch.cat([patches, extra], dim=1)


class TimmLastBlockHead(nn.Module):
    """The last block, the norm and the head of a timm vision transformer on the latent of
    :class:`TimmTokensBeforeLastBlock` (prefix tokens: the spatial mean of their channels)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, latent: Tensor) -> Tensor:
        model = self.model
        prefix, channels = model.num_prefix_tokens, model.embed_dim
        batch = latent.shape[0]
        patches = latent[:, :channels].flatten(2).transpose(1, 2)
        extra = latent[:, channels:].mean(dim=(2, 3)).reshape(batch, prefix, channels)
        tokens = model.blocks[-1](torch.cat([extra, patches], dim=1))
        return model.forward_head(model.norm(tokens))


def _is_transformer(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")


def _split_timm(model: nn.Module, at: str | None) -> tuple[nn.Module, nn.Module]:
    if at is not None:
        raise ValueError(
            f"at={at!r}: a timm model is split between forward_features and forward_head only; leave at=None"
        )
    transformer = _is_transformer(model)
    if transformer:
        pooling = getattr(model, "global_pool", None)
        if pooling == "token" and getattr(model, "attn_pool", None) is None and hasattr(model, "blocks"):
            return TimmTokensBeforeLastBlock(model), TimmLastBlockHead(model)
        if pooling not in ("avg", "max", "avgmax"):
            raise ValueError(
                f"{type(model).__name__} reads its logits with global_pool={pooling!r}: split_model handles the "
                "patch-pooling heads ('avg', 'max', 'avgmax') and the class token ('token'). Build it with "
                "global_pool='avg' or 'token' (e.g. align.models.timm_model(name, num_classes, global_pool='avg')), "
                "or pass your own input_to_latent / latent_to_logit to Craft"
            )
    return TimmFeatures(model), TimmHead(model, transformer)


def _children(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], bool]:
    """Named children in forward order, and whether ``flatten`` must be inserted after global pooling."""
    if isinstance(model, nn.Sequential):
        return list(model.named_children()), False
    try:
        from torchvision.models import ResNet
    except ImportError:  # pragma: no cover - torchvision is a dependency
        ResNet = ()  # noqa: N806
    if isinstance(model, ResNet):
        return list(model.named_children()), True
    raise TypeError(
        f"split_model handles nn.Sequential models, torchvision ResNets and timm models, got {type(model).__name__}: "
        "write the two parts yourself, e.g. input_to_latent = lambda x: ...features(x) (activations >= 0) and "
        "latent_to_logit = lambda a: ...head(a), and pass them to Craft"
    )


def split_model(
    model: nn.Module, at: str | None = None, *, sign_split: bool = False
) -> tuple[nn.Module, nn.Module]:
    """``(input_to_latent, latent_to_logit)``: two ``nn.Sequential`` sharing ``model``'s modules (module docstring).

    ``at``: name of the last child of ``input_to_latent`` (e.g. ``"layer3"``, ``"features"``); by default the
    child before the first global pooling layer (timm models: None only, the split is ``forward_features``).
    ``sign_split``: make signed activations nonnegative, exactly.

    Raises:
        ValueError: with ``at=None``, no global pooling child after the first child; else ``at`` names no child,
            or the last one.
    """
    if not isinstance(model, nn.Sequential) and hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        features, head = _split_timm(model, at)
        body, tail = [("features", features)], [("head", head)]
        if sign_split:
            body.append(("sign_split", SignSplit()))
            tail.insert(0, ("sign_merge", SignMerge()))
        return nn.Sequential(OrderedDict(body)), nn.Sequential(OrderedDict(tail))
    children, flatten_before_linear = _children(model)
    names = [name for name, _ in children]
    if at is None:
        pooling = [i for i, (_, module) in enumerate(children) if is_global_pooling(module)]
        if not pooling or pooling[0] == 0:
            raise ValueError(
                f"no global pooling child (AdaptiveAvgPool2d(1), ...) found after a first child in "
                f"{type(model).__name__} with children {names}: pass at=<name of the last child of "
                "input_to_latent>"
            )
        cut = pooling[0]
    elif at in names:
        cut = names.index(at) + 1
        if cut == len(names):
            raise ValueError(f"at={at!r} is the last child of the model: latent_to_logit would be empty")
    else:
        raise ValueError(f"at={at!r} is not a child of {type(model).__name__}; its children are {names}")
    head = list(children[cut:])
    if flatten_before_linear:
        linear = next((i for i, (_, m) in enumerate(head) if isinstance(m, nn.Linear)), len(head))
        head.insert(linear, ("flatten", nn.Flatten(1)))
    body = list(children[:cut])
    if sign_split:
        body.append(("sign_split", SignSplit()))
        head.insert(0, ("sign_merge", SignMerge()))
    return nn.Sequential(OrderedDict(body)), nn.Sequential(OrderedDict(head))
