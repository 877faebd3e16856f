"""Optimizer parameter groups: weight decay on weights only, as in the reference harmonization recipe."""

from __future__ import annotations

from typing import Any

from torch import nn

#: modules whose parameters never get weight decay
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups: ``weight_decay`` on weight matrices/kernels, 0 on biases, scalars and the parameters
    of normalization layers (BatchNorm, LayerNorm, GroupNorm, ...). Frozen parameters are left out; empty groups
    are dropped."""
    decay, no_decay, seen = [], [], set()
    for owner in module.modules():
        for parameter in owner.parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            if isinstance(owner, NORM_LAYERS) or parameter.ndim <= 1:
                no_decay.append(parameter)
            else:
                decay.append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
