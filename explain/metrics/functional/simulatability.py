"""Simulatability: how much an explanation helps to predict a model's decisions (Colin, Fel, Cadène and Serre,
NeurIPS 2022, "What I cannot predict, I do not understand: a human-centered evaluation framework for
explainability methods").

The paper's participants learned to predict a classifier's decisions from (image, decision) examples, shown
with or without the explanation, then predicted its decisions on NEW images, without explanations. Here a small
learned meta-predictor stands in for the participant:

* **observations**: pairs (image, the model's decision), split into train and test with disjoint images
  (:func:`observation_split`); ``budget`` training observations are used, the same ones by both predictors;
* **without**: a meta-predictor trained with cross-entropy on the decisions, images alone;
* **with**: the same network, the same initial weights, the same batches, plus a term that teaches it WHERE the
  model looks: the predictor (:class:`MetaPredictor`) pools its features with its own spatial attention ``a``,
  and ``loss = CE + explanation_weight * (-sum_p q_p log a_p)`` with ``q`` the explanation as a distribution
  (:func:`attention_guidance`). It never sees an explanation at test time, as the participants;
* **utility** ``= acc_with / acc_without - 1`` on the test observations, per seed; its mean and a Student-t
  confidence interval over the seeds (:func:`confidence_interval`). Each seed draws its own split and its own
  initial weights, shared by the two predictors of that seed (a paired comparison).

Why attention guidance. Masking the training images by the explanation shows the predictor images out of the
distribution of the test images (which it sees whole), so what it learns transfers by luck. A guidance term on the
predictor's input gradient, in the spirit of the harmonization loss (``1 - pearson(|grad|, explanation)``, tried
first), needs double backprop through a small network with a noisy gradient: on the toy task of the tests it left
the predictor at chance with the oracle map on all three seeds. Supervising the attention is first order, leaves the inputs as
they are in both phases and says exactly what an explanation tells a person: where the evidence is.

Controls, always reported beside a score (:func:`with_controls`): a **random** map (uniform noise on a coarse grid,
upsampled: a random region; utility about 0) and the **oracle** map, the region the model's decision really
depends on where it is known (the data's ``spurious_mask`` on the shortcut data): an upper reference.

A meta-predictor is a proxy of a person, not a person: report it beside the controls, never as ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explain.base import grad_enabled
from explain.validation import in_interval, positive_int

#: the names of the controls that :func:`with_controls` adds
RANDOM, ORACLE = "random", "oracle"


def observation_split(
    num_observations: int, test_fraction: float = 0.5, seed: int = 0, image_ids: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Indices ``(train, test)`` of a seeded random split of the observations with disjoint images.

    ``image_ids`` [N] names the image of each observation (several observations may share one, e.g. a decision
    of two models); all the observations of an image fall on the same side. None: every observation is its own
    image. About ``test_fraction`` of the images go to the test side; each side gets at least one.

    Raises:
        ValueError: fewer than two images, ``test_fraction`` outside (0, 1), ``image_ids`` of another length.
    """
    in_interval("test_fraction", test_fraction, 0, 1, low_open=True, high_open=True)
    ids = torch.arange(num_observations) if image_ids is None else image_ids.reshape(-1).cpu()
    if ids.shape[0] != num_observations:
        raise ValueError(f"image_ids has {ids.shape[0]} entries for {num_observations} observations")
    images, image_of = ids.unique(return_inverse=True)
    if images.shape[0] < 2:
        raise ValueError(f"observations of {images.shape[0]} image(s): a train/test split needs at least two")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(images.shape[0], generator=generator)
    num_test = min(max(round(test_fraction * images.shape[0]), 1), images.shape[0] - 1)
    is_test = torch.zeros(images.shape[0], dtype=torch.bool)
    is_test[order[:num_test]] = True
    test = is_test[image_of]
    return (~test).nonzero().squeeze(1), test.nonzero().squeeze(1)


def enrich_errors(decisions: Tensor, labels: Tensor, error_share: float = 0.5, seed: int = 0) -> Tensor:
    """Indices of a "failure cases" scenario: every observation where the model errs (``decision != label``) and
    as many right ones, drawn at random, as make errors ``error_share`` of the result (all the right ones when
    there are too few errors to reach it is impossible: fewer right ones are then dropped, never errors).

    Raises:
        ValueError: ``error_share`` outside (0, 1], shapes that differ, or no error at all.
    """
    in_interval("error_share", error_share, 0, 1, low_open=True)
    if decisions.shape != labels.shape:
        raise ValueError(f"decisions {tuple(decisions.shape)} and labels {tuple(labels.shape)} differ in shape")
    wrong = (decisions != labels.to(decisions.device)).cpu()
    errors, right = wrong.nonzero().squeeze(1), (~wrong).nonzero().squeeze(1)
    if errors.numel() == 0:
        raise ValueError("the model makes no error on these observations: no failure-cases scenario to build")
    keep_right = min(right.numel(), round(errors.numel() * (1 - error_share) / error_share))
    generator = torch.Generator().manual_seed(seed)
    chosen = right[torch.randperm(right.numel(), generator=generator)[:keep_right]]
    return torch.cat([errors, chosen]).sort().values


def random_region_maps(shape: Sequence[int], cells: int = 8, seed: int = 0) -> Tensor:
    """The random control: [B,H,W] maps of uniform noise on a ``cells x cells`` grid, upsampled bilinearly (a
    random region of the same spatial scale as an explanation, not pixel noise)."""
    batch, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    grid = torch.rand(batch, 1, cells, cells, generator=generator)
    return F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[:, 0]


def with_controls(maps: Mapping[str, Tensor], oracle: Tensor | None = None, seed: int = 0) -> dict[str, Tensor]:
    """``maps`` plus the controls: ``"random"`` (:func:`random_region_maps`) and, when given, ``"oracle"``.

    Raises:
        ValueError: no map, maps of different shapes, or a name that is a control's.
    """
    if not maps:
        raise ValueError("maps is empty: pass at least one explanation {name: maps [N, H, W]}")
    shapes = {name: tuple(value.shape) for name, value in maps.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 3:
        raise ValueError(f"every map must be [N, H, W] of one shape, got {shapes}")
    taken = sorted({RANDOM, ORACLE} & set(maps))
    if taken:
        raise ValueError(f"{taken}: names of the controls, give your maps other names")
    shape = next(iter(shapes.values()))
    out = {**maps, RANDOM: random_region_maps(shape, seed=seed)}
    if oracle is not None:
        if tuple(oracle.shape) != shape:
            raise ValueError(f"the oracle map has shape {tuple(oracle.shape)}, the maps {shape}")
        out[ORACLE] = oracle.float()
    return out


class MetaPredictor(nn.Module):
    """The participant: a small CNN (3 GELU convolutions, stride 1-2-2) whose features are pooled by its own
    spatial attention, ``logits = W sum_p a_p f_p + b`` with ``a = softmax_p(attention(f))`` over the
    ``H/4 x W/4`` positions. ``forward`` returns ``(logits [B,K], attention log-probabilities [B,H/4,W/4])``."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.GELU(),
        )
        self.attention = nn.Conv2d(2 * width, 1, 1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.features(images)
        log_attention = self.attention(features).flatten(1).log_softmax(1)  # [B, P]
        pooled = (features.flatten(2) * log_attention.exp()[:, None]).sum(2)
        return self.head(pooled), log_attention.view(features.shape[0], *features.shape[-2:])


def attention_guidance(log_attention: Tensor, explanations: Tensor) -> Tensor:
    """``mean_b -sum_p q_bp log a_bp``: cross-entropy of the predictor's attention ``a`` [B,h,w] (log-probabilities)
    against the explanation taken as a distribution, ``q = relu(e)`` average-pooled to ``h x w`` and normalised to
    sum 1; images whose explanation has no positive mass are left out (0 when none has)."""
    target = F.adaptive_avg_pool2d(explanations.clamp_min(0)[:, None].to(log_attention), log_attention.shape[-2:])
    target = target.flatten(1)
    mass = target.sum(1)
    informative = mass > 0
    if not informative.any():
        return log_attention.sum() * 0
    target = target[informative] / mass[informative, None]
    return -(target * log_attention.flatten(1)[informative]).sum(1).mean()


def train_meta_predictor(
    network: MetaPredictor,
    images: Tensor,
    decisions: Tensor,
    explanations: Tensor | None = None,
    *,
    steps: int = 150,
    batch_size: int = 32,
    lr: float = 3e-3,
    explanation_weight: float = 1.0,
    seed: int = 0,
) -> MetaPredictor:
    """Train ``network`` in place on (image, decision) pairs with Adam for ``steps`` steps of ``batch_size``
    observations drawn by a ``seed``-ed generator (the same batches for every call with the same seed); with
    ``explanations`` [N,H,W], add ``explanation_weight * attention_guidance(attention, explanation)`` to the
    cross-entropy. Returns the network in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    network.train()
    with grad_enabled():
        for _ in range(steps):
            batch = torch.randint(images.shape[0], (min(batch_size, images.shape[0]),), generator=generator)
            logits, log_attention = network(images[batch])
            loss = F.cross_entropy(logits, decisions[batch])
            if explanations is not None:
                loss = loss + explanation_weight * attention_guidance(log_attention, explanations[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return network.eval()


@torch.no_grad()
def _accuracy(network: nn.Module, images: Tensor, decisions: Tensor, batch_size: int = 256) -> float:
    right = sum(
        int((network(x)[0].argmax(1) == y).sum()) for x, y in zip(images.split(batch_size), decisions.split(batch_size))
    )
    return right / max(decisions.shape[0], 1)


def simulatability_arg_validation(
    test_fraction: float = 0.5,
    budget: int | None = None,
    seeds: int | Sequence[int] = 5,
    steps: int = 150,
    batch_size: int = 32,
    lr: float = 3e-3,
    width: int = 16,
    explanation_weight: float = 1.0,
) -> list[int]:
    """Check the options of :func:`simulatability` (shared with :class:`~explain.metrics.Simulatability`);
    returns the list of seeds.

    Raises:
        ValueError: an option out of its domain (named).
    """
    in_interval("test_fraction", test_fraction, 0, 1, low_open=True, high_open=True)
    positive_int("budget", budget, allow_none=True)
    positive_int("steps", steps)
    positive_int("batch_size", batch_size)
    positive_int("width", width)
    in_interval("lr", lr, 0, low_open=True)
    in_interval("explanation_weight", explanation_weight, 0)
    seed_list = list(range(positive_int("seeds", seeds))) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("seeds is empty: pass a number of seeds or a list of them")
    return seed_list


def simulatability(
    images: Tensor,
    decisions: Tensor,
    maps: Mapping[str, Tensor],
    *,
    num_classes: int | None = None,
    image_ids: Tensor | None = None,
    test_fraction: float = 0.5,
    budget: int | None = None,
    seeds: int | Sequence[int] = 5,
    steps: int = 150,
    batch_size: int = 32,
    lr: float = 3e-3,
    width: int = 16,
    explanation_weight: float = 1.0,
) -> dict[str, Tensor | dict[str, Tensor]]:
    """Utility of each explanation of ``maps`` for predicting the model's ``decisions`` (module docstring).

    Args:
        images: [N,C,H,W] observation images. decisions: [N] the model's decision on each (its argmax class).
        maps: ``{name: explanations [N,H,W]}`` (e.g. from :func:`with_controls`); each is used for training only.
        num_classes: classes of the decisions (default: ``max(decisions) + 1``).
        image_ids: [N] image of each observation, for a split with disjoint images (default: one image each).
        test_fraction: share of the images held out to measure the predictors.
        budget: training observations per predictor (default: the whole train side).
        seeds: the seeds, or how many (``0 .. seeds-1``); each seed draws its split, its batches and its initial
            weights, shared by the "with" and "without" predictors of that seed.
        steps, batch_size, lr, width, explanation_weight: the meta-predictors' training
            (:class:`MetaPredictor`, :func:`train_meta_predictor`).

    Returns:
        ``accuracy_without`` [S] (one per seed), ``accuracy_with`` ``{name: [S]}``, ``utility``
        ``{name: [S]}`` (``acc_with / acc_without - 1``) and ``seeds`` [S]; float64 tensors.

    Raises:
        ValueError: images not [N,C,H,W], decisions or maps of other lengths or sizes, a decision out of
            ``[0, num_classes)``, a ``budget`` of 0, or an invalid option.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    decisions = decisions.reshape(-1).long().to(images.device)
    if decisions.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {decisions.shape[0]} decisions")
    if not maps:
        raise ValueError("maps is empty: pass at least one explanation {name: maps [N, H, W]}")
    for name, value in maps.items():
        if tuple(value.shape) != (images.shape[0], *images.shape[-2:]):
            raise ValueError(f"maps {name!r} has shape {tuple(value.shape)}, expected {(images.shape[0], *images.shape[-2:])}")
    num_classes = int(decisions.max()) + 1 if num_classes is None else positive_int("num_classes", num_classes)
    if int(decisions.min()) < 0 or int(decisions.max()) >= num_classes:
        raise ValueError(f"decisions must lie in [0, {num_classes}), got {int(decisions.min())}..{int(decisions.max())}")
    seed_list = simulatability_arg_validation(test_fraction, budget, seeds, steps, batch_size, lr, width,
                                              explanation_weight)
    options = dict(steps=steps, batch_size=batch_size, lr=lr)

    without, with_maps = [], {name: [] for name in maps}
    for seed in seed_list:
        train, test = observation_split(images.shape[0], test_fraction, seed, image_ids)
        if budget is not None:
            train = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))[:budget]]
        train, test = train.to(images.device), test.to(images.device)
        torch.manual_seed(seed)  # the initial weights of this seed's two predictors
        initial = MetaPredictor(images.shape[1], num_classes, width).to(images.device)
        state = {key: value.clone() for key, value in initial.state_dict().items()}
        network = train_meta_predictor(initial, images[train], decisions[train], seed=seed, **options)
        without.append(_accuracy(network, images[test], decisions[test]))
        for name, explanation in maps.items():
            network = MetaPredictor(images.shape[1], num_classes, width).to(images.device)
            network.load_state_dict(state)
            explanation = explanation.to(images.device, torch.float32)[train]
            network = train_meta_predictor(
                network, images[train], decisions[train], explanation, seed=seed,
                explanation_weight=explanation_weight, **options,
            )  # fmt: skip
            with_maps[name].append(_accuracy(network, images[test], decisions[test]))
    acc_without = torch.tensor(without, dtype=torch.float64)
    acc_with = {name: torch.tensor(values, dtype=torch.float64) for name, values in with_maps.items()}
    return {
        "seeds": torch.tensor(seed_list),
        "accuracy_without": acc_without,
        "accuracy_with": acc_with,
        "utility": {name: values / acc_without.clamp_min(1e-12) - 1 for name, values in acc_with.items()},
    }


def confidence_interval(values: Tensor, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` [S] and its Student-t interval ``mean ± t_{(1+level)/2, S-1}
    s / sqrt(S)`` (s the sample std); the interval is the mean itself for one value.

    Raises:
        ValueError: no value, or ``level`` outside (0, 1).
    """
    from scipy.stats import t as student_t

    in_interval("level", level, 0, 1, low_open=True, high_open=True)
    values = values.double().reshape(-1)
    if values.numel() == 0:
        raise ValueError("confidence_interval of no value")
    mean = float(values.mean())
    if values.numel() == 1:
        return mean, mean, mean
    half = float(student_t.ppf((1 + level) / 2, values.numel() - 1)) * float(values.std()) / math.sqrt(values.numel())
    return mean, mean - half, mean + half
