"""Any captum attribution method as an explainer of this package's API (captum is an optional extra).

``from_captum(method, **init_kwargs)`` returns a factory ``(model, **options) -> CaptumExplainer``, so a
captum method is used like the built-in explainers::

    IntegratedGradients = from_captum(captum.attr.IntegratedGradients)   # or from_captum("IntegratedGradients")
    explainer = IntegratedGradients(model, batch_size=16, n_steps=32)    # unknown options go to .attribute()
    maps = explainer(images, targets)                                    # [B, H, W]

``method`` is a captum attribution class, its name in ``captum.attr``, or any callable
``(model, **init_kwargs) -> attribution`` (e.g. ``lambda m: NoiseTunnel(Saliency(m))``); ``init_kwargs`` go
to it after the model (e.g. ``layer=model.features`` for layer methods). Attributions [B,C,H,W] are reduced
over channels by ``reduce`` (default ``"absmax"``, like :class:`~explain.attributions.saliency.Saliency`);
layer attributions at a smaller resolution (GradCAM) are resized bilinearly to the image, as captum's
``LayerAttribution.interpolate`` (for GradCAM pass ``relu_attributions=True``, as in the paper, since the
default ``"absmax"`` would turn negative evidence positive).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explain.attributions.saliency import ChannelReducingExplainer, Reduce, check_logits
from explain.batching import BatchSize

_INSTALL_HINT = (
    "from_captum needs captum, an optional dependency: pip install 'aligned-vision[dev]' "
    "(or 'aligned-vision[bench]', or pip install captum)"
)


def _captum_attr():
    try:
        import captum.attr
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return captum.attr


def _resolve(method: type | str | Callable[..., Any]) -> Callable[..., Any]:
    if isinstance(method, str):
        attr = _captum_attr()
        if not hasattr(attr, method):
            raise ValueError(f"captum.attr has no attribution method named {method!r}")
        return getattr(attr, method)
    if not callable(method):
        raise TypeError(f"method must be a captum attribution class, its name, or a callable, got {method!r}")
    return method


class CaptumExplainer(ChannelReducingExplainer):
    """A captum attribution method behind the ``Explainer(model)(images, targets) -> [B,H,W]`` call.

    Args:
        model: the network.
        method: captum attribution class, its name in ``captum.attr``, or a callable
            ``(model, **init_kwargs) -> attribution``.
        init_kwargs: passed to ``method`` after the model.
        batch_size: images per ``attribute`` call (methods that expand each image, like IntegratedGradients,
            send more rows through the model: bound those with captum's own ``internal_batch_size``).
        seed: captum draws from the global RNG; the call runs in a forked RNG seeded with ``seed`` so the
            result is deterministic and the caller's RNG is left untouched (None: no seeding).
        reduce: channel reduction of [B,C,H,W] attributions (see :func:`~explain.attributions.saliency.reduce_channels`).
        **attribute_kwargs: passed unchanged to every ``attribute`` call (``n_steps``, ``baselines``,
            ``feature_mask``...); a tensor with one entry per image needs ``batch_size`` >= the batch.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``method`` did not build a captum attribution.
        ValueError: ``batch_size`` not a positive int, an unknown ``reduce`` or method name, or ``inputs`` /
            ``target`` among the options (the call sets them).
        ImportError: ``method`` is a name and captum is missing.

    >>> import torch
    >>> from torch import nn
    >>> from captum.attr import InputXGradient
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    >>> explainer = CaptumExplainer(model, InputXGradient, reduce="sum")
    >>> explainer(torch.rand(2, 3, 8, 8), torch.tensor([0, 1])).shape
    torch.Size([2, 8, 8])
    """

    def __init__(
        self,
        model: nn.Module,
        method: type | str | Callable[..., Any],
        init_kwargs: dict[str, Any] | None = None,
        batch_size: BatchSize = 64,
        seed: int | None = 0,
        reduce: Reduce = "absmax",
        **attribute_kwargs: Any,
    ) -> None:
        super().__init__(model, batch_size=batch_size, seed=seed, reduce=reduce)
        for reserved in ("inputs", "target"):
            if reserved in attribute_kwargs:
                raise ValueError(f"{reserved!r} is set by the explainer call; do not pass it as an option")
        self.method = _resolve(method)
        self.init_kwargs = dict(init_kwargs or {})
        self.attribution = self.method(model, **self.init_kwargs)
        if not hasattr(self.attribution, "attribute"):
            raise TypeError(f"{self.method!r} did not build a captum attribution (no .attribute method)")
        self.attribute_kwargs = attribute_kwargs

    @property
    def name(self) -> str:
        return type(self.attribution).__name__.lower()

    def _attribute(self, images: Tensor, targets: Tensor) -> Tensor:
        if isinstance(self.attribution, _captum_attr().GradientAttribution):
            images = images.detach().requires_grad_(True)  # what captum would do, without its warning
        attributions = self.attribution.attribute(images, target=targets, **self.attribute_kwargs)
        if isinstance(attributions, tuple):  # e.g. (attributions, delta) with return_convergence_delta
            attributions = attributions[0]
        if attributions.ndim == 4:
            attributions = self.to_maps(attributions)
        if attributions.ndim != 3 or attributions.shape[0] != images.shape[0]:
            raise RuntimeError(
                f"{type(self.attribution).__name__} returned attributions of shape {tuple(attributions.shape)}, "
                f"expected [B, C, H, W] or [B, H, W] with B = {images.shape[0]}"
            )
        if attributions.shape[-2:] != images.shape[-2:]:
            attributions = F.interpolate(
                attributions[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False
            )[:, 0]
        return attributions.detach()

    def explain(self, images: Tensor, targets: Tensor) -> Tensor:
        with torch.no_grad():  # one forward to turn a bad target into a clear error, not an index error
            check_logits(self.model(images[:1]), targets)
        chunks = zip(images.split(self.batch_size), targets.split(self.batch_size))
        if self.seed is None:
            return torch.cat([self._attribute(x, y) for x, y in chunks])
        cuda = images.device.type == "cuda"
        with torch.random.fork_rng(devices=[images.device] if cuda else []):
            torch.default_generator.manual_seed(self.seed)  # only the forked generators, not every device's
            if cuda:
                with torch.cuda.device(images.device):
                    torch.cuda.manual_seed(self.seed)
            return torch.cat([self._attribute(x, y) for x, y in chunks])

    def __repr__(self) -> str:
        return f"CaptumExplainer({type(self.attribution).__name__}, batch_size={self.batch_size})"


def from_captum(
    method: type | str | Callable[..., Any], **init_kwargs: Any
) -> Callable[..., CaptumExplainer]:
    """Factory ``(model, **options) -> CaptumExplainer`` for a captum attribution ``method`` (module docstring).

    ``options`` are :class:`CaptumExplainer`'s (``batch_size``, ``seed``, ``reduce``) and captum
    ``attribute`` keywords.

    Raises:
        ImportError: captum is missing (the message names the extra to install).
        ValueError: ``method`` names no attribution method of ``captum.attr``.
        TypeError: ``method`` is neither a class, a name nor a callable.

    >>> import torch
    >>> from torch import nn
    >>> IntegratedGradients = from_captum("IntegratedGradients")
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    >>> explainer = IntegratedGradients(model, n_steps=8)  # unknown options go to .attribute()
    >>> explainer.name, explainer(torch.rand(2, 3, 8, 8), torch.tensor([0, 1])).shape
    ('integratedgradients', torch.Size([2, 8, 8]))
    """
    _captum_attr()
    method = _resolve(method)
    factory = functools.partial(CaptumExplainer, method=method, init_kwargs=init_kwargs)
    factory.__name__ = getattr(method, "__name__", "captum").lower()  # the callbacks' default logging key
    return factory
