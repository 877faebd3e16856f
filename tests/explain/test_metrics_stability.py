"""AverageStability against exact properties; MeGe/ReCo against constructed cases, sklearn's ROC curve and a
loop implementation of xplique's pair selection."""

import functools

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_curve
from torch import nn

from explain.base import Explainer
from explain.metrics import AverageStability, mege_reco
from explain.metrics.functional import average_stability, fold_pair_distances, reco_score, spearman_distance


def channel_sum(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return images.sum(1)


def channel_square(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return images.pow(2).sum(1)


class InputGradient(Explainer):
    """|d f(x)[y] / dx| max over channels, written here so the test does not depend on explain.attributions."""

    def explain(self, images, targets):
        images.requires_grad_(True)
        score = self.model(images).gather(1, targets[:, None]).sum()
        (grad,) = torch.autograd.grad(score, images)
        return grad.abs().amax(1)


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_constant_explainer_is_perfectly_stable():
    images, targets = torch.rand(4, 3, 6, 6), torch.zeros(4, dtype=torch.long)
    constant = torch.rand(6, 6)

    def explainer(x, y):
        return constant.expand(x.shape[0], 6, 6)

    assert (average_stability(explainer, images, targets, radius=0.5, nb_samples=5) == 0).all()


def test_distance_scales_exactly_with_radius_for_a_linear_explainer():
    images, targets = torch.rand(3, 3, 6, 6), torch.zeros(3, dtype=torch.long)
    unit = {d: average_stability(channel_sum, images, targets, radius=1.0, nb_samples=6, distance=d)
            for d in ("l1", "l2", "linf", "squared_l2")}
    for r in (0.05, 0.3):
        for d, power in (("l1", 1), ("l2", 1), ("linf", 1), ("squared_l2", 2)):
            value = average_stability(channel_sum, images, targets, radius=r, nb_samples=6, distance=d)
            torch.testing.assert_close(value, unit[d] * r**power, rtol=1e-4, atol=1e-6)


def test_distance_grows_with_radius():
    images, targets = torch.rand(3, 3, 6, 6), torch.zeros(3, dtype=torch.long)
    # x >= 0 and noise >= 0: every pixel of (x + r u)^2 - x^2 grows with r, so must the distance
    values = [average_stability(channel_square, images, targets, radius=r, nb_samples=4) for r in (0.0, 0.01, 0.1, 1.0)]
    assert (values[0] == 0).all()
    for smaller, larger in zip(values, values[1:]):
        assert (smaller < larger).all()
    # an Explainer of a nonlinear network: zero at radius 0, larger on average for larger noise
    explainer = InputGradient(small_net())
    values = [average_stability(explainer, images, targets, radius=r, nb_samples=8).mean() for r in (0.0, 0.05, 1.0)]
    assert values[0] == 0 and values[0] < values[1] < values[2]


def test_average_stability_matches_a_loop_and_ignores_batch_size():
    images, targets = torch.rand(3, 3, 6, 6), torch.tensor([0, 1, 2])
    explainer = InputGradient(small_net())
    maps = explainer(images, targets)
    chunked = average_stability(explainer, images, targets, radius=0.2, nb_samples=5, batch_size=2, seed=7, maps=maps)
    whole = average_stability(explainer, images, targets, radius=0.2, nb_samples=5, batch_size=100, seed=7)
    torch.testing.assert_close(chunked, whole)
    # the neighbours, drawn image after image from the same generator
    noise = torch.rand(15, 3, 6, 6, generator=torch.Generator().manual_seed(7)).view(3, 5, 3, 6, 6)
    for i in range(3):
        neighbours = explainer(images[i] + 0.2 * noise[i], targets[i].repeat(5))
        expected = np.mean([np.linalg.norm((n - maps[i]).numpy()) for n in neighbours])
        assert chunked[i].item() == pytest.approx(expected, rel=1e-5)
    with torch.inference_mode():
        inside = average_stability(explainer, images, targets, radius=0.2, nb_samples=5, seed=7)
    torch.testing.assert_close(inside, whole)


def test_average_stability_metric_merges_and_validates():
    images, targets = torch.rand(4, 3, 6, 6), torch.zeros(4, dtype=torch.long)
    maps = channel_square(images, targets)
    whole, first, second = (AverageStability(radius=0.1, nb_samples=3) for _ in range(3))
    whole.update(explainer=channel_square, images=images, targets=targets, maps=maps)
    first.update(explainer=channel_square, images=images[:1], targets=targets[:1], maps=maps[:1])
    second.update(explainer=channel_square, images=images[1:], targets=targets[1:], maps=maps[1:])
    first.merge_state(second)
    expected = average_stability(channel_square, images, targets, radius=0.1, nb_samples=3, maps=maps)
    # each update draws its noise from the same seed, so compare per-update expectations
    halves = torch.cat([
        average_stability(channel_square, images[:1], targets[:1], radius=0.1, nb_samples=3),
        average_stability(channel_square, images[1:], targets[1:], radius=0.1, nb_samples=3),
    ])
    assert whole.compute().item() == pytest.approx(expected.mean().item(), rel=1e-6)
    assert first.compute().item() == pytest.approx(halves.mean().item(), rel=1e-6)
    assert AverageStability.requires == ("explainer", "images", "targets", "maps")
    with pytest.raises(ValueError, match="distance must be one of"):
        AverageStability(distance="cosine")


# ---------------------------------------------------------------- MeGe / ReCo


class TableModel(nn.Module):
    """Predicts ``table[n]`` for the image whose pixel (0, 0, 0) holds its index ``n``."""

    def __init__(self, table, num_classes: int = 3):
        super().__init__()
        self.register_buffer("table", torch.as_tensor(table))
        self.num_classes = num_classes

    def forward(self, x):
        index = x[:, 0, 0, 0].round().long()
        return nn.functional.one_hot(self.table[index], self.num_classes).float()


def coded_images(n: int) -> torch.Tensor:
    images = torch.rand(n, 3, 8, 8)
    images[:, 0, 0, 0] = torch.arange(n).float()
    return images


def test_identical_maps_give_mege_one():
    n, k = 12, 3
    images, labels = coded_images(n), torch.randint(0, 3, (n,))
    tables = [labels.clone() for _ in range(k)]
    tables[1][:4] = (labels[:4] + 1) % 3  # model 1 wrong on 4 images: some one-right pairs
    models = [TableModel(t) for t in tables]
    folds = torch.arange(n) % k

    def explainer(model):
        return lambda x, y: x[:, 1]  # the same map whatever the model

    mege, reco = mege_reco(models, images, labels, folds, explainer, batch_size=5)
    assert mege.item() == pytest.approx(1.0)
    assert reco.item() == pytest.approx(0.0)  # all distances are 0: nothing separates the two sets


def test_separable_distances_give_reco_one():
    n, k = 15, 3
    images, labels = coded_images(n), torch.randint(0, 3, (n,))
    tables = [labels.clone() for _ in range(k)]
    tables[0][::2] = (labels[::2] + 1) % 3
    tables[2][1::3] = (labels[1::3] + 2) % 3
    models = [TableModel(t) for t in tables]
    noise = torch.rand(n, 8, 8)

    def explainer(model):
        def explain(x, y):
            right = model(x).argmax(1) == y
            # right models agree on the image's own map; a wrong model looks at unrelated noise
            return torch.where(right[:, None, None], x[:, 1], noise[x[:, 0, 0, 0].round().long()])

        return explain

    mege, reco = mege_reco(models, images, labels, torch.arange(n) % k, explainer)
    assert mege.item() == pytest.approx(1.0)
    assert reco.item() == pytest.approx(1.0)


def test_reco_score_is_youden_index_of_sklearn_roc():
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        consistent = (torch.rand(40, generator=generator) * 10).round() / 10  # ties
        inconsistent = (torch.rand(25, generator=generator) * 10 + 2).round() / 10
        labels = np.r_[np.zeros(40), np.ones(25)]
        fpr, tpr, _ = roc_curve(labels, np.r_[consistent.numpy(), inconsistent.numpy()])
        assert reco_score(consistent, inconsistent).item() == pytest.approx(np.max(tpr - fpr))
    assert torch.isnan(reco_score(torch.rand(3), torch.zeros(0)))


def xplique_pair_distances(maps, predictions, labels, folds):
    """Loop over model pairs (i, j) and images of fold i or j, as xplique's MeGe._pairwise_distances."""
    same, different = [], []
    k = len(maps)
    for i in range(k):
        for j in range(i + 1, k):
            for n in range(len(labels)):
                if folds[n] not in (i, j):
                    continue
                right_i, right_j = predictions[i][n] == labels[n], predictions[j][n] == labels[n]
                if not (right_i or right_j):
                    continue
                rho = spearmanr(maps[i][n].flatten(), maps[j][n].flatten())[0]
                (same if right_i and right_j else different).append(np.sqrt(1 - abs(rho)))
    return np.sort(same), np.sort(different)


def test_pair_distances_match_xplique_loop():
    n, k = 20, 4
    images, labels = coded_images(n), torch.randint(0, 3, (n,))
    tables = [torch.where(torch.rand(n) < 0.7, labels, torch.randint(0, 3, (n,))) for _ in range(k)]
    models = [TableModel(t) for t in tables]
    maps = torch.rand(k, n, 8, 8)
    folds = torch.randint(0, k, (n,))

    def explainer(model):
        index = next(i for i, m in enumerate(models) if m is model)
        return lambda x, y: maps[index][x[:, 0, 0, 0].round().long()]

    same, different = fold_pair_distances(models, images, labels, folds, explainer, batch_size=6)
    expected_same, expected_different = xplique_pair_distances(
        maps.numpy(), [t.numpy() for t in tables], labels.numpy(), folds.numpy()
    )
    np.testing.assert_allclose(np.sort(same.numpy()), expected_same, atol=1e-5)
    np.testing.assert_allclose(np.sort(different.numpy()), expected_different, atol=1e-5)
    mege, reco = mege_reco(models, images, labels, folds, explainer)
    assert mege.item() == pytest.approx(1 / (1 + expected_same.mean()), rel=1e-5)


def test_mege_reco_with_real_explainer_class_and_validation():
    models = [small_net() for _ in range(3)]
    images, labels = torch.rand(6, 3, 6, 6), torch.randint(0, 3, (6,))
    folds = torch.tensor([0, 1, 2, 0, 1, 2])
    mege, reco = mege_reco(models, images, labels, folds, functools.partial(InputGradient, batch_size=4))
    assert torch.isnan(mege) or 0 < mege <= 1
    assert torch.isnan(reco) or 0 <= reco <= 1
    with pytest.raises(ValueError, match=r"fold_of_sample must be in \[0, 3\)"):
        mege_reco(models, images, labels, folds + 1, InputGradient)
    with pytest.raises(ValueError, match="at least 2"):
        mege_reco(models[:1], images, labels, folds * 0, InputGradient)


def test_spearman_distance_bounds():
    a = torch.rand(3, 5, 5)
    distance = spearman_distance(a, torch.stack([a[0], -a[1], torch.ones(5, 5)]))
    torch.testing.assert_close(distance[:2], torch.zeros(2, dtype=torch.float64), atol=1e-7, rtol=0)  # |rho| = 1
    assert distance[2].item() == pytest.approx(1.0)  # constant map: rho = 0


def test_average_stability_metric_options_are_the_functions_checked_when_built():
    import inspect

    metric = AverageStability()
    options = (metric.radius, metric.nb_samples, metric.distance, metric.batch_size, metric.seed)
    assert options == (0.1, 20, "l2", 64, 0)
    for bad in ({"radius": -0.1}, {"nb_samples": 0}, {"batch_size": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AverageStability(**bad)
    with pytest.raises(ValueError, match="distance"):
        AverageStability(distance="cosine")
    images, targets = torch.rand(2, 3, 4, 4), torch.tensor([0, 1])
    by_position, by_keyword = AverageStability(nb_samples=2), AverageStability(nb_samples=2)
    by_position.update(channel_square, images, targets, channel_square(images, targets))  # in `requires` order
    maps = channel_square(images, targets)
    by_keyword.update(maps=maps, explainer=channel_square, images=images, targets=targets)
    assert torch.equal(by_position.compute(), by_keyword.compute()) and by_position.compute() > 0
    # mege_reco shows (and takes) exactly fold_pair_distances' arguments
    assert inspect.signature(mege_reco) == inspect.signature(fold_pair_distances)
    with pytest.raises(TypeError):
        two_folds = torch.tensor([0, 1])
        mege_reco([nn.Linear(2, 2)] * 2, torch.rand(2, 3, 2, 2), two_folds, two_folds, channel_sum, 64, "extra")
