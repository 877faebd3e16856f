"""Optimizer parameter groups with the weight decay of the reference harmonization recipe.

The reference (serre-lab/Harmonization, ``harmonization/training/loss.py``) adds ``1e-5 * sum(v^2) / 2`` over every
trainable variable except those whose name says they belong to a normalization layer (``bn/``, ``normalization``,
``norm``, ``Norm``), an embedding (``embed``: positional embeddings, and the patch embedding of its ViT) or the class
token (``class_token``). Biases of convolutions and linear layers ARE decayed. The gradient of that term is
``1e-5 * v``: the same as ``weight_decay=1e-5`` in an optimizer's parameter group (SGD, Adam; not AdamW's decoupled
decay).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from explain.validation import in_interval

#: modules whose parameters never get weight decay (whatever their name)
NO_DECAY_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,  # the lazy variants subclass these
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.Embedding,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
#: parameters whose qualified name (lower case) holds one of these never get weight decay: the reference's name
#: filter, in the names torch and timm use (``norm1.weight``, ``pos_embed``, ``patch_embed.proj.weight``,
#: ``cls_token``)
NO_DECAY_NAMES = ("norm", "embed", "class_token", "cls_token")


def decays(name: str, owner: nn.Module) -> bool:
    """Whether the parameter ``name`` (qualified, e.g. ``backbone.fc.bias``) of module ``owner`` is decayed."""
    lowered = name.lower()
    return not isinstance(owner, NO_DECAY_LAYERS) and not any(part in lowered for part in NO_DECAY_NAMES)


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups, as the reference: ``weight_decay`` on every trainable parameter (weights AND biases of
    convolutions and linear layers, scalars) except those of normalization layers, embeddings and the class token
    (:func:`decays`), which get 0. Frozen parameters are left out; empty groups are dropped."""
    in_interval("weight_decay", weight_decay, 0)
    decay, no_decay, seen = [], [], set()
    for owner_name, owner in module.named_modules():
        for name, parameter in owner.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            qualified = f"{owner_name}.{name}" if owner_name else name
            (decay if decays(qualified, owner) else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
