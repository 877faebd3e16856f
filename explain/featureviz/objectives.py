"""What a feature visualization maximises: ``objective(crops [N,3,h,w]) -> scores [N]``.

Any callable with that signature works with :func:`~explain.featureviz.maco`. The builders below return an
:class:`Objective`, which also carries the module it runs, so that ``maco`` runs it in eval mode on its device
(and restores its mode afterwards). Objectives add and scale like numbers::

    logit(model, 3)                                   # class logit 3
    channel(model, "layer3", 17)                      # mean activation of channel 17 of model.layer3
    neuron(model, "layer3", 17)                       # channel 17 at the centre of model.layer3's map
    concept_direction(craft.input_to_latent, craft.W[2])   # a CRAFT concept (dot x cosine^2)
    logit(model, 3) - 0.5 * logit(model, 5)           # class 3 and not class 5
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explain.validation import non_negative_int, one_of


class Objective:
    """A callable ``crops [N,3,h,w] -> scores [N]`` and the module it runs (``model``, or None).

    Raises:
        TypeError: ``fn`` not callable, or ``model`` neither an ``nn.Module`` nor None.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], model: nn.Module | None = None, name: str = "objective"):
        if not callable(fn):
            raise TypeError(f"fn must be callable (crops [N,3,h,w] -> scores [N]), got {type(fn).__name__}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        self.fn = fn
        self.model = model
        self.name = name

    def __call__(self, crops: Tensor) -> Tensor:
        return self.fn(crops)

    def __add__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective(lambda x: self(x) + other(x), _join(self.model, other.model), f"{self.name} + {other.name}")

    def __sub__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return self + (-1.0) * other

    def __mul__(self, factor: float) -> Objective:
        if not isinstance(factor, (int, float)) or isinstance(factor, bool):
            return NotImplemented
        return Objective(lambda x: factor * self(x), self.model, f"{factor:g} * {self.name}")

    __rmul__ = __mul__

    def __neg__(self) -> Objective:
        return (-1.0) * self

    def __repr__(self) -> str:
        return f"Objective({self.name})"


def _join(a: nn.Module | None, b: nn.Module | None) -> nn.Module | None:
    if a is None or b is None or a is b:
        return a if b is None else b
    return nn.ModuleList([a, b])  # registers both (no copy) so eval_mode and the device reach both


def _check_module(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _check_index(value: object, name: str) -> int:
    return non_negative_int(name, value)


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """``(name, module)`` of a layer of ``model`` given by its dotted name or by the module itself.

    Raises:
        TypeError: ``layer`` neither a submodule name nor an ``nn.Module``.
        ValueError: ``layer`` is no submodule of ``model``.
    """
    if isinstance(layer, str):
        try:
            return layer, model.get_submodule(layer)
        except AttributeError:
            names = [name for name, _ in model.named_modules() if name]
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise ValueError(f"model has no layer named {layer!r}; its layers are: {shown}") from None
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name or type(layer).__name__, layer
        raise ValueError(f"the layer {type(layer).__name__} given is not a submodule of the model")
    raise TypeError(f"layer must be a submodule name (str) or an nn.Module of the model, got {type(layer).__name__}")


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the layer is needed, so the forward pass stops there."""


def layer_output(model: nn.Module, layer: nn.Module, inputs: Tensor, name: str = "layer") -> Tensor:
    """The output of ``layer`` when ``model`` runs on ``inputs`` (its first call; the forward stops there).

    A forward hook captures the output and is removed before returning, even on error.

    Raises:
        RuntimeError: the model did not call the layer.
        TypeError: the layer returned something other than a tensor.
    """
    captured: list[Tensor] = []

    def hook(module: nn.Module, args: object, output: object) -> None:
        captured.append(output)
        raise _StopForward

    handle = layer.register_forward_hook(hook)
    try:
        model(inputs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"layer {name!r} was not called when the model ran, so it has no activation to maximise")
    if not isinstance(captured[0], Tensor):
        raise TypeError(f"layer {name!r} returned a {type(captured[0]).__name__}, not a tensor")
    return captured[0]


def logit(model: nn.Module, class_id: int) -> Objective:
    """The logit ``model(x)[:, class_id]`` (MACO's usual objective)."""
    model, class_id = _check_module(model), _check_index(class_id, "class_id")

    def score(crops: Tensor) -> Tensor:
        outputs = model(crops)
        if not isinstance(outputs, Tensor) or outputs.ndim != 2:
            shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
            raise ValueError(f"logit objective: the model must return logits [N, classes], got {shape}")
        if class_id >= outputs.shape[1]:
            raise ValueError(f"logit objective: class_id {class_id} out of range for {outputs.shape[1]} classes")
        return outputs[:, class_id]

    return Objective(score, model, f"logit_{class_id}")


def _channel_map(activation: Tensor, index: int, name: str) -> Tensor:
    if activation.ndim < 2:
        raise ValueError(f"layer {name!r} output has shape {tuple(activation.shape)}; expected [N, C, ...]")
    if index >= activation.shape[1]:
        raise ValueError(f"channel {index} out of range: layer {name!r} has {activation.shape[1]} channels")
    return activation[:, index]


def channel(model: nn.Module, layer: str | nn.Module, index: int) -> Objective:
    """Mean activation of channel ``index`` of ``layer``'s output [N, C, ...] (channels first)."""
    model, index = _check_module(model), _check_index(index, "index")
    name, module = resolve_layer(model, layer)

    def score(crops: Tensor) -> Tensor:
        activation = _channel_map(layer_output(model, module, crops, name), index, name)
        return activation.reshape(activation.shape[0], -1).mean(1)

    return Objective(score, model, f"channel_{name}_{index}")


def neuron(
    model: nn.Module, layer: str | nn.Module, index: int, position: tuple[int, int] | None = None
) -> Objective:
    """One unit: channel ``index`` of ``layer``'s map [N, C, h, w] at ``position`` (y, x), default the centre.

    For a layer with a vector output [N, C] the unit is ``output[:, index]`` (leave ``position`` None).

    Raises:
        ValueError: ``position`` is not a pair ``(y, x)``.
    """
    model, index = _check_module(model), _check_index(index, "index")
    name, module = resolve_layer(model, layer)
    if position is not None:
        if len(position) != 2:
            raise ValueError(f"position must be a pair (y, x), got {position!r}")
        position = (_check_index(position[0], "position y"), _check_index(position[1], "position x"))

    def score(crops: Tensor) -> Tensor:
        activation = _channel_map(layer_output(model, module, crops, name), index, name)
        if activation.ndim == 1:
            if position is not None:
                raise ValueError(f"layer {name!r} has no spatial map; leave position=None")
            return activation
        if activation.ndim != 3:
            raise ValueError(f"neuron objective: layer {name!r} output must be [N, C] or [N, C, h, w]")
        y, x = position if position is not None else (activation.shape[1] // 2, activation.shape[2] // 2)
        if y >= activation.shape[1] or x >= activation.shape[2]:
            raise ValueError(f"position {(y, x)} outside the {tuple(activation.shape[1:])} map of layer {name!r}")
        return activation[:, y, x]

    return Objective(score, model, f"neuron_{name}_{index}")


SIMILARITIES = ("dot_cossim", "dot", "cosine")


def direction_similarity(
    activations: Tensor, direction: Tensor, similarity: str = "dot_cossim", cossim_pow: float = 2.0
) -> Tensor:
    """Similarity [N] of activations [N, C] with a direction [C].

    ``dot``: ``a.d``; ``cosine``: ``a.d / (|a| |d|)``; ``dot_cossim`` (Lucid, Horama, Xplique's direction
    objective): ``a.d * max(cosine, 0.1)^cossim_pow``, which rewards both the projection and the alignment.
    """
    one_of("similarity", similarity, SIMILARITIES)
    direction = direction.to(device=activations.device, dtype=activations.dtype)
    dot = activations @ direction
    if similarity == "dot":
        return dot
    cosine = F.cosine_similarity(activations, direction[None], dim=1, eps=1e-8)
    if similarity == "cosine":
        return cosine
    return dot * cosine.clamp_min(0.1).pow(cossim_pow)


def concept_direction(
    feature_fn: Callable[[Tensor], Tensor],
    direction: Tensor,
    similarity: str = "dot_cossim",
    cossim_pow: float = 2.0,
) -> Objective:
    """A direction in a layer's channel space, e.g. a CRAFT concept: ``concept_direction(craft.input_to_latent,
    craft.W[k])``.

    The activations ``feature_fn(crops)`` are averaged over space ([N, C, h, w] channels first, or [N, T, C]
    tokens) as CRAFT does before its NMF, then compared with ``direction`` [C] by :func:`direction_similarity`.

    Raises:
        TypeError: ``feature_fn`` not callable.
        ValueError: ``direction`` not a finite, nonzero vector [C].
    """
    if not callable(feature_fn):
        raise TypeError(f"feature_fn must be callable (crops -> activations), got {type(feature_fn).__name__}")
    direction = torch.as_tensor(direction).detach().float()
    if direction.ndim != 1 or direction.numel() == 0:
        raise ValueError(f"direction must be a vector [C], got shape {tuple(direction.shape)}")
    if not torch.isfinite(direction).all() or direction.norm() == 0:
        raise ValueError("direction must be finite and nonzero")
    one_of("similarity", similarity, SIMILARITIES)
    channels = direction.numel()

    def score(crops: Tensor) -> Tensor:
        activations = feature_fn(crops)
        if activations.ndim == 4:  # [N, C, h, w]
            pooled, found = activations.mean((2, 3)), activations.shape[1]
        elif activations.ndim == 3:  # [N, T, C]
            pooled, found = activations.mean(1), activations.shape[2]
        elif activations.ndim == 2:
            pooled, found = activations, activations.shape[1]
        else:
            raise ValueError(
                f"feature_fn returned shape {tuple(activations.shape)}; expected [N,C,h,w], [N,T,C] or [N,C]"
            )
        if found != channels:
            raise ValueError(f"direction has {channels} entries but feature_fn gives {found} channels")
        return direction_similarity(pooled, direction, similarity, cossim_pow)

    model = feature_fn if isinstance(feature_fn, nn.Module) else None
    return Objective(score, model, f"direction_{similarity}")
