"""Gradient explainers: Saliency, SmoothGrad and Gradient x Input.

* Saliency (Simonyan et al. 2014): ``g = d f(x)[y] / d x``.
* SmoothGrad (Smilkov et al. 2017): ``mean_s g(x + eps_s)``, ``eps_s ~ N(0, noise^2)``; the defaults
  ``nb_samples=50, noise=0.2`` are those of xplique and of the paper (noise 10-20% of the input range, which
  is [0, 1] here). As in xplique, the same ``nb_samples`` noise tensors are used for every image of a call,
  so a batch gives the same maps as its images one at a time.
* Gradient x Input (Shrikumar et al. 2016): ``x * g``.

Each gives a [B, C, H, W] tensor that :func:`reduce_channels` turns into a map [B, H, W]; the default
``"absmax"`` (``max_c |.|``) is the model map of the reference alignment evaluation (Fel et al. 2022).
Gradients are taken with :func:`torch.autograd.grad` w.r.t. the inputs only, so no parameter's ``.grad``
changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Union

import torch
from torch import Tensor, nn

from explain.base import Explainer
from explain.batching import BatchSize
from explain.registry import register_explainer
from explain.validation import in_interval, one_of, positive_int

Reduce = Union[Literal["absmax", "max", "sum", "abssum", "mean", "absmean"], Callable[[Tensor], Tensor]]
REDUCTIONS: tuple[str, ...] = ("absmax", "max", "sum", "abssum", "mean", "absmean")


def reduce_channels(attributions: Tensor, reduce: Reduce = "absmax") -> Tensor:
    """Reduce attributions [B, C, H, W] over channels to maps [B, H, W].

    ``"absmax"``: ``max_c |a_c|``; ``"max"``: ``max_c a_c``; ``"sum"`` / ``"abssum"``: ``sum_c a_c`` /
    ``sum_c |a_c|``; ``"mean"`` / ``"absmean"``: the same divided by C; or a callable [B,C,H,W] -> [B,H,W].

    Raises:
        ValueError: ``attributions`` not [B, C, H, W], or an unknown ``reduce``.
    """
    if attributions.ndim != 4:
        raise ValueError(f"attributions must be [B, C, H, W], got shape {tuple(attributions.shape)}")
    if callable(reduce):
        return reduce(attributions)
    if reduce == "absmax":
        return attributions.abs().amax(dim=1)
    if reduce == "max":
        return attributions.amax(dim=1)
    if reduce == "sum":
        return attributions.sum(dim=1)
    if reduce == "abssum":
        return attributions.abs().sum(dim=1)
    if reduce == "mean":
        return attributions.mean(dim=1)
    if reduce == "absmean":
        return attributions.abs().mean(dim=1)
    raise ValueError(f"reduce must be one of {REDUCTIONS} or a callable, got {reduce!r}")


def channel_reduction(reduce: Reduce) -> Reduce:
    """``reduce`` if it is a callable or one of :data:`REDUCTIONS` (the check every explainer with a ``reduce``
    option makes, returning what it accepted as the checks of :mod:`explain.validation` do).

    Raises:
        ValueError: ``"reduce must be one of <REDUCTIONS>, got <reduce>"``.
    """
    return reduce if callable(reduce) else one_of("reduce", reduce, REDUCTIONS)


def check_logits(logits: Tensor, targets: Tensor) -> None:
    """Raise a clear error unless ``logits`` is [N, classes] and every target is a class index of it.

    Raises:
        ValueError: ``logits`` not [N, classes], or a target outside ``[0, classes)``.
    """
    if logits.ndim != 2:
        raise ValueError(f"the model must return logits of shape [N, classes], got shape {tuple(logits.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        raise ValueError(
            f"targets must be class indices in [0, {logits.shape[1]}) for a model with {logits.shape[1]} "
            f"outputs, got values in [{int(targets.min())}, {int(targets.max())}]"
        )


def input_gradients(model: nn.Module, images: Tensor, targets: Tensor, batch_size: int = 64) -> Tensor:
    """``d f(x_b)[y_b] / d x_b`` for every image: [B, C, H, W], ``batch_size`` images per backward pass.

    Must run with grad enabled (an :class:`~explain.base.Explainer` takes care of it). Parameters' ``.grad``
    are not touched: the gradient is taken w.r.t. the inputs only.
    """
    grads = []
    for i, (x, y) in enumerate(zip(images.split(batch_size), targets.split(batch_size))):
        x = x.detach().requires_grad_(True)
        logits = model(x)
        if i == 0:
            check_logits(logits, targets)
        (grad,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), x)
        grads.append(grad)
    return torch.cat(grads) if grads else torch.empty_like(images)


def smoothgrad_gradients(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    noise: Tensor,
    batch_size: int = 64,
) -> Tensor:
    """SmoothGrad: ``mean_s d f(x_b + noise_s)[y_b] / d x`` [B, C, H, W] for ``noise`` [S, C, H, W].

    The B * S noisy inputs are sent through the model ``batch_size`` at a time (rows of several images share
    a pass).

    Raises:
        ValueError: ``noise`` not [S, C, H, W] with the images' C, H, W;
            at the first pass, logits or targets as :func:`check_logits` refuses.
    """
    nb_images, nb_samples = images.shape[0], noise.shape[0]
    if noise.shape[1:] != images.shape[1:]:
        raise ValueError(f"noise must be [S, {', '.join(map(str, images.shape[1:]))}], got {tuple(noise.shape)}")
    total = torch.zeros_like(images)
    rows = torch.arange(nb_images * nb_samples, device=images.device)
    for i, chunk in enumerate(rows.split(batch_size)):
        image_index, sample_index = chunk // nb_samples, chunk % nb_samples
        noisy = (images[image_index] + noise[sample_index]).requires_grad_(True)
        logits = model(noisy)
        if i == 0:
            check_logits(logits, targets)
        (grad,) = torch.autograd.grad(logits.gather(1, targets[image_index, None]).sum(), noisy)
        total.index_add_(0, image_index, grad)
    return total / nb_samples


class ChannelReducingExplainer(Explainer):
    """Base of the explainers whose method gives attributions [B, C, H, W]: the option ``reduce`` (checked once,
    here) turns them into maps [B, H, W] with :meth:`to_maps`."""

    def __init__(
        self, model: nn.Module, batch_size: BatchSize = 64, seed: int | None = 0, reduce: Reduce = "absmax"
    ) -> None:
        super().__init__(model, batch_size=batch_size, seed=seed)
        self.reduce = channel_reduction(reduce)

    def to_maps(self, attributions: Tensor) -> Tensor:
        """``reduce_channels(attributions, self.reduce)``: [B, C, H, W] -> [B, H, W]."""
        return reduce_channels(attributions, self.reduce)


class _GradientExplainer(ChannelReducingExplainer):
    """An explainer whose only options are ``batch_size`` and the channel reduction ``reduce`` (no randomness)."""

    def __init__(self, model: nn.Module, batch_size: BatchSize = 64, reduce: Reduce = "absmax") -> None:
        super().__init__(model, batch_size=batch_size, seed=None, reduce=reduce)


@register_explainer("saliency")
class Saliency(_GradientExplainer):
    """Saliency map (Simonyan et al. 2014): ``reduce_c(d f(x)[y] / d x)``, by default ``max_c |grad|``.

    ``Saliency(model, batch_size=64, reduce="absmax")(images [B,C,H,W], targets [B]) -> [B,H,W]``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``batch_size`` not a positive int, or ``reduce`` neither a callable nor one of
            :data:`REDUCTIONS`; at the call, images/targets of the wrong shape or type.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    >>> maps = Saliency(model)(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))
    >>> maps.shape, bool((maps >= 0).all())
    (torch.Size([4, 8, 8]), True)
    >>> weights = model[1].weight.view(2, 3, 8, 8)  # a linear model's gradient is its weight row
    >>> torch.equal(maps[1], weights[1].abs().amax(0))
    True
    """

    def explain(self, images: Tensor, targets: Tensor) -> Tensor:
        return self.to_maps(input_gradients(self.model, images, targets, self.batch_size))


@register_explainer("gradient_input")
class GradientInput(_GradientExplainer):
    """Gradient x Input (Shrikumar et al. 2016): ``reduce_c(x * d f(x)[y] / d x)``, by default ``max_c |.|``.

    Pass ``reduce="sum"`` for the signed first-order Taylor contribution of each pixel.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``batch_size`` not a positive int, or an unknown ``reduce``.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2, bias=False))
    >>> images = torch.rand(2, 3, 8, 8)
    >>> maps = GradientInput(model, reduce="sum")(images, torch.tensor([0, 1]))
    >>> logits = model(images)  # linear and no bias: the contributions add up to the logit
    >>> torch.allclose(maps.sum((1, 2)), logits.gather(1, torch.tensor([[0], [1]]))[:, 0], atol=1e-5)
    True
    """

    def explain(self, images: Tensor, targets: Tensor) -> Tensor:
        grads = input_gradients(self.model, images, targets, self.batch_size)
        return self.to_maps(images * grads)


@register_explainer("smoothgrad")
class SmoothGrad(ChannelReducingExplainer):
    """SmoothGrad (Smilkov et al. 2017): ``reduce_c(mean_s grad(x + eps_s))``, ``eps_s ~ N(0, noise^2)``.

    ``nb_samples`` noisy copies per image (default 50) with Gaussian noise of standard deviation ``noise``
    (default 0.2, for inputs in [0, 1]); ``batch_size`` bounds the noisy inputs per pass; the noise is drawn
    from ``self.generator`` (``seed``; ``seed=None`` uses the global RNG, as captum's NoiseTunnel does).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``nb_samples`` or ``batch_size`` not a positive int, ``noise`` negative or not finite, or an
            unknown ``reduce``.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    >>> explainer = SmoothGrad(model, nb_samples=8, noise=0.1)
    >>> images, targets = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    >>> maps = explainer(images, targets)
    >>> maps.shape, torch.equal(maps, explainer(images, targets))  # seeded noise: the same maps every call
    (torch.Size([2, 8, 8]), True)
    """

    def __init__(
        self,
        model: nn.Module,
        nb_samples: int = 50,
        noise: float = 0.2,
        batch_size: BatchSize = 64,
        seed: int | None = 0,
        reduce: Reduce = "absmax",
    ) -> None:
        super().__init__(model, batch_size=batch_size, seed=seed, reduce=reduce)
        self.nb_samples = positive_int("nb_samples", nb_samples)
        self.noise = in_interval("noise", noise, 0)  # a standard deviation

    def explain(self, images: Tensor, targets: Tensor) -> Tensor:
        shape = (self.nb_samples, *images.shape[1:])
        noise = torch.randn(shape, generator=self.generator(images.device), device=images.device, dtype=images.dtype)
        grads = smoothgrad_gradients(self.model, images, targets, noise * self.noise, self.batch_size)
        return self.to_maps(grads)
