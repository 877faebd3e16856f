"""Stability of explanations: to the input (AverageStability) and to the training data (MeGe, ReCo).

* **AverageStability** (Bhatt et al. 2020, "Evaluating and aggregating feature-based model explanations",
  def. 2; xplique ``AverageStability``): ``mean_m d(g(x), g(x + eps_m))`` over ``nb_samples`` noisy neighbours,
  ``eps_m ~ U(0, radius)`` per input value (DESIGN section 5). The maps are compared as they come, without
  normalisation (as xplique). Lower is better.
* **MeGe and ReCo** (Fel, Vigouroux et al. 2022, "How good is your explanation? Algorithmic stability measures
  to assess the quality of explanations for deep neural networks"; xplique ``MeGe``): ``k`` models, model ``i``
  trained without fold ``i``. For an image of fold ``f``, the maps of model ``f`` (which never saw it) and of each
  other model ``j`` are compared with ``d = sqrt(1 - |spearman rho|)`` (the pairs xplique uses: one model of the
  pair did not see the image). Pairs where both models are right form ``S=``, pairs where exactly one is right
  ``S!=`` (pairs where both are wrong are not used). A constant map has no ranking: rho = 0 here, so ``d = 1``
  (xplique gets NaN from scipy and drops the pair).
  ``MeGe = 1 / (1 + mean S=)``; ``ReCo = max_gamma TPR + TNR - 1`` for the test "``d > gamma`` means exactly
  one model is right", over every threshold.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from explain.base import check_images_targets, eval_mode, model_device
from explain.metrics.functional.alignment import rowwise_spearman
from explain.validation import in_interval, one_of, positive_int

MapFn = Callable[[Tensor, Tensor], Tensor]


def _l1(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).abs().sum(1)


def _l2(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).pow(2).sum(1).sqrt()


def _squared_l2(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).pow(2).sum(1)


def _linf(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).abs().amax(1)


#: Distances between flattened maps [n, N] -> [n]. ``"squared_l2"`` is what xplique calls ``"l2"``.
DISTANCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "l1": _l1,
    "l2": _l2,
    "squared_l2": _squared_l2,
    "linf": _linf,
}


def resolve_distance(distance: str | Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """The distance function named ``distance`` in :data:`DISTANCES`, or ``distance`` itself if callable."""
    if callable(distance):
        return distance
    return DISTANCES[one_of("distance", distance, sorted(DISTANCES))]


def _average_stability_arg_validation(
    radius: float, nb_samples: int, distance: str | Callable[[Tensor, Tensor], Tensor], batch_size: int
) -> None:
    """The checks shared by :func:`average_stability` and the ``AverageStability`` metric."""
    in_interval("radius", radius, 0)
    positive_int("nb_samples", nb_samples)
    resolve_distance(distance)
    positive_int("batch_size", batch_size)


def average_stability(
    explainer: MapFn,
    images: Tensor,
    targets: Tensor | int,
    *,
    radius: float = 0.1,
    nb_samples: int = 20,
    distance: str | Callable[[Tensor, Tensor], Tensor] = "l2",
    batch_size: int = 64,
    seed: int | None = 0,
    maps: Tensor | None = None,
) -> Tensor:
    """AverageStability [B]: ``mean_m d(g(x), g(x + eps_m))``, ``eps_m ~ U(0, radius)`` per input value.

    ``explainer(images, targets) -> maps`` (any :class:`~explain.base.Explainer`); ``maps`` are the maps of
    ``images`` when already computed (else the explainer makes them). ``distance``: ``"l2"`` (Euclidean),
    ``"l1"``, ``"squared_l2"`` (xplique's ``"l2"``), ``"linf"`` or a callable on flattened maps ``[n,N]``.
    The explainer gets at most ``batch_size`` noisy images per call. The noise comes from a generator seeded
    with ``seed`` on the images' device (the global RNG when None).

    Raises:
        TypeError: ``explainer`` is not callable.
        ValueError: ``radius`` negative or not finite, ``nb_samples`` or ``batch_size`` not a positive int, an
            unknown ``distance``, or ``maps`` that do not match the images.

    >>> import torch
    >>> brightness = lambda images, targets: images.mean(1)  # a "map": the pixel brightness
    >>> average_stability(brightness, torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), radius=0.0, nb_samples=2)
    tensor([0., 0.])
    """
    if not callable(explainer):
        raise TypeError(f"explainer must be callable (images, targets) -> maps, got {type(explainer).__name__}")
    _average_stability_arg_validation(radius, nb_samples, distance, batch_size)
    distance_fn = resolve_distance(distance)
    images, targets = check_images_targets(images, targets)
    targets = targets.to(images.device)  # indexed below by positions on the images' device
    if maps is None:
        maps = explainer(images, targets)
    if maps.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(
            f"maps must be [B, H, W] = {(images.shape[0], *images.shape[-2:])}, got {tuple(maps.shape)}"
        )
    generator = None if seed is None else torch.Generator(images.device).manual_seed(seed)
    b = images.shape[0]
    flat_maps = maps.to(images.device).flatten(1).float()
    distances = []
    for index in torch.arange(b * nb_samples, device=images.device).split(batch_size):
        image = index // nb_samples
        noise = torch.rand(
            (index.shape[0], *images.shape[1:]), generator=generator, device=images.device, dtype=images.dtype
        )
        noisy_maps = explainer(images[image] + radius * noise, targets[image])
        distances.append(distance_fn(noisy_maps.to(images.device).flatten(1).float(), flat_maps[image]))
    return torch.cat(distances).view(b, nb_samples).mean(1)


def spearman_distance(maps_a: Tensor, maps_b: Tensor) -> Tensor:
    """``sqrt(1 - |rho|)`` [B] between paired maps [B, ...] (rho = Spearman over the flattened maps; a constant
    map has rho = 0, so distance 1).

    Raises:
        ValueError: paired maps of different shapes.
    """
    if maps_a.shape != maps_b.shape:
        raise ValueError(f"paired maps must have the same shape, got {tuple(maps_a.shape)} and {tuple(maps_b.shape)}")
    rho = rowwise_spearman(maps_a.flatten(1), maps_b.flatten(1))
    return (1.0 - rho.abs()).clamp_min(0.0).sqrt()


def mege_score(consistent: Tensor) -> Tensor:
    """MeGe = ``1 / (1 + mean S=)`` from the distances of the pairs where both models are right (NaN if none)."""
    if consistent.numel() == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return 1.0 / (1.0 + consistent.double().mean())


def reco_score(consistent: Tensor, inconsistent: Tensor) -> Tensor:
    """ReCo = ``max_gamma TPR(gamma) + TNR(gamma) - 1`` (Youden's J), where a pair is declared "exactly one model
    right" when its distance is ``> gamma``: TPR = share of ``S!=`` (``inconsistent``) above gamma, TNR = share
    of ``S=`` (``consistent``) at or below gamma. Every distinct threshold is tried (NaN if a set is empty).

    xplique tries every ``len // 20 + 1``-th sorted distance only, with strict inequalities on both sides; this is
    the exact maximum.
    """
    if consistent.numel() == 0 or inconsistent.numel() == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    consistent, inconsistent = consistent.double().flatten(), inconsistent.double().flatten()
    consistent, inconsistent = consistent.sort().values, inconsistent.sort().values
    gammas = torch.cat([consistent.new_tensor([-float("inf")]), torch.cat([consistent, inconsistent]).unique()])
    tnr = torch.searchsorted(consistent, gammas, right=True) / consistent.numel()
    tpr = 1.0 - torch.searchsorted(inconsistent, gammas, right=True) / inconsistent.numel()
    return (tpr + tnr - 1.0).max()


def _predictions(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    device = model_device(model, default=images.device)
    with torch.no_grad(), eval_mode(model):
        return torch.cat([model(chunk.to(device)).argmax(1).to(images.device) for chunk in images.split(batch_size)])


def fold_pair_distances(
    models: Sequence[nn.Module],
    images: Tensor,
    labels: Tensor,
    fold_of_sample: Tensor,
    explainer: Callable[[nn.Module], MapFn],
    batch_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """The distances ``(S=, S!=)`` of MeGe/ReCo (module docstring): for image ``n`` of fold ``f``, the pairs
    (model ``f``, model ``j``) for every ``j != f``; ``batch_size`` images are explained at a time.

    Raises:
        ValueError: fewer than 2 models, ``fold_of_sample`` without one integer fold in ``[0, k)`` per image, or
            a ``batch_size`` that is not a positive int.
    """
    models = list(models)
    k = len(models)
    if k < 2:
        raise ValueError(f"MeGe/ReCo need at least 2 fold models, got {k}")
    images, labels = check_images_targets(images, labels)
    labels = labels.to(images.device)  # compared below with predictions on the images' device
    fold_of_sample = torch.as_tensor(fold_of_sample).reshape(-1).to(images.device)
    if fold_of_sample.shape[0] != images.shape[0] or fold_of_sample.is_floating_point():
        raise ValueError(
            f"fold_of_sample must hold one integer fold per image ({images.shape[0]}), got "
            f"{tuple(fold_of_sample.shape)} of dtype {fold_of_sample.dtype}"
        )
    if fold_of_sample.numel() and (fold_of_sample.min() < 0 or fold_of_sample.max() >= k):
        raise ValueError(
            f"fold_of_sample must be in [0, {k}) (model i was trained without fold i), got values in "
            f"[{int(fold_of_sample.min())}, {int(fold_of_sample.max())}]"
        )
    positive_int("batch_size", batch_size)
    explainers = [explainer(model) for model in models]
    consistent, inconsistent = [], []
    for start in range(0, images.shape[0], batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        folds = fold_of_sample[start : start + batch_size]
        right = torch.stack([_predictions(model, x, batch_size) == y for model in models])  # [k, n]
        maps = torch.stack([explain(x, y).to(x.device).float() for explain in explainers])  # [k, n, H, W]
        for i in range(k):
            for j in range(i + 1, k):
                use = (folds == i) | (folds == j)
                both, one = use & right[i] & right[j], use & (right[i] ^ right[j])
                pairs = both | one
                if not pairs.any():
                    continue
                distance = spearman_distance(maps[i][pairs], maps[j][pairs])
                consistent.append(distance[both[pairs]])
                inconsistent.append(distance[one[pairs]])
    empty = torch.zeros(0, dtype=torch.float32, device=images.device)
    return torch.cat([empty, *consistent]), torch.cat([empty, *inconsistent])


def mege_reco(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """``(MeGe, ReCo)`` of an explanation method (Fel et al. 2022): :func:`mege_score` and :func:`reco_score` of the
    pairs of :func:`fold_pair_distances`, called with the same arguments
    ``(models, images, labels, fold_of_sample, explainer, batch_size=64)`` (its signature is this one's).

    ``models[i] was trained on every fold but ``i``; ``fold_of_sample[n]`` is the fold of image ``n``;
    ``explainer(model) -> callable(images, targets) -> maps`` (an :class:`~explain.base.Explainer` class, or a
    ``functools.partial`` of one with its options). The maps explain the true ``labels``, as in xplique. NaN
    where a set of pairs is empty (MeGe: no pair with both models right; ReCo: either set empty).

    Raises:
        ValueError: fewer than 2 models, ``fold_of_sample`` without one fold in ``[0, k)`` per image, or a
            ``batch_size`` that is not a positive int.

    >>> import torch
    >>> from torch import nn
    >>> from explain import Saliency
    >>> _ = torch.manual_seed(0)
    >>> models = [nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)) for _ in range(3)]
    >>> images, labels = torch.rand(6, 3, 4, 4), torch.tensor([0, 1, 0, 1, 0, 1])
    >>> mege, reco = mege_reco(models, images, labels, torch.tensor([0, 1, 2, 0, 1, 2]), Saliency)
    >>> mege.dtype, bool(mege.isnan() or 0 < mege <= 1), bool(reco.isnan() or -1 <= reco <= 1)
    (torch.float64, True, True)
    """
    consistent, inconsistent = fold_pair_distances(*args, **kwargs)
    return mege_score(consistent), reco_score(consistent, inconsistent)


mege_reco.__signature__ = inspect.signature(fold_pair_distances)  # help(), IDEs and jsonargparse see the arguments
