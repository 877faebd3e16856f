"""Deletion / Insertion / MuFidelity against closed forms on a linear model and against loop implementations of
the xplique formulas (numpy argsort, np.linspace stages, scipy.stats.spearmanr)."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from explain.metrics import Deletion, Insertion, MuFidelity
from explain.metrics.functional import auc, deletion_curve, insertion_curve, mufidelity, random_cell_masks

C, H, W, K = 3, 6, 6, 4


def linear_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K))


def conv_model() -> nn.Module:
    # Dropout and BatchNorm make train mode visible: the metrics must run the model in eval mode
    return nn.Sequential(
        nn.Conv2d(C, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(20, K),
    ).train()


def exact_attribution(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-pixel contribution sum_c w_{y,c,p} x_{c,p} of the linear model: f(x)[y] = b_y + sum_p a_p."""
    weight = model[1].weight.detach()[targets].view(-1, C, H, W)
    return (weight * images).sum(1)


@pytest.fixture
def data():
    images = torch.rand(5, C, H, W)
    targets = torch.tensor([0, 1, 2, 3, 1])
    return images, targets


def test_linear_model_curves_match_closed_form(data):
    images, targets = data
    model = linear_model()
    a = exact_attribution(model, images, targets)
    steps, n = 9, H * W
    sizes = [k * n // steps for k in range(steps + 1)]
    deletion = deletion_curve(model, images, targets, a, steps=steps)
    insertion = insertion_curve(model, images, targets, a, steps=steps)
    bias = model[1].bias.detach()[targets]
    for i in range(len(images)):
        top = np.concatenate([[0.0], np.cumsum(np.sort(a[i].flatten().numpy())[::-1])])
        total = top[-1]
        expected_deletion = [bias[i].item() + total - top[s] for s in sizes]
        expected_insertion = [bias[i].item() + top[s] for s in sizes]
        np.testing.assert_allclose(deletion[i].numpy(), expected_deletion, atol=1e-4)
        np.testing.assert_allclose(insertion[i].numpy(), expected_insertion, atol=1e-4)


def test_exact_map_beats_random_map_at_every_stage(data):
    images, targets = data
    model = linear_model()
    best = exact_attribution(model, images, targets)
    best_deletion = deletion_curve(model, images, targets, best)
    best_insertion = insertion_curve(model, images, targets, best)
    for _ in range(3):
        other = torch.randn_like(best)
        assert (best_deletion <= deletion_curve(model, images, targets, other) + 1e-5).all()
        assert (best_insertion >= insertion_curve(model, images, targets, other) - 1e-5).all()
    metric_best, metric_random = Deletion(), Deletion()
    metric_best.update(model=model, images=images, targets=targets, maps=best)
    metric_random.update(model=model, images=images, targets=targets, maps=torch.randn_like(best))
    assert metric_best.compute() < metric_random.compute()


def xplique_causal_curve(model, images, targets, maps, steps, baseline, insertion):
    """The xplique loop: argsort()[::-1] order, np.linspace(0, N, steps + 1, int) stages, f(x)[y] per stage."""
    model = model.eval()
    x = images.numpy()
    base = np.broadcast_to(np.asarray(baseline, dtype=np.float32), x.shape)
    start, end = (base, x) if insertion else (x, base)
    n = H * W
    start, end = start.reshape(len(x), C, n), end.reshape(len(x), C, n)
    order = np.argsort(maps.reshape(len(x), -1).numpy(), axis=-1)[:, ::-1]
    curves = np.zeros((len(x), steps + 1))
    for k, step in enumerate(np.linspace(0, n, steps + 1, dtype=np.int32)):
        batch = start.copy()
        for i in range(len(x)):
            batch[i][:, order[i, :step]] = end[i][:, order[i, :step]]
        with torch.no_grad():
            out = model(torch.from_numpy(batch.reshape(x.shape)).float())
        curves[:, k] = out[torch.arange(len(x)), targets].numpy()
    return curves


@pytest.mark.parametrize("insertion", [False, True])
@pytest.mark.parametrize("baseline", [0.3, torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1)])
def test_curves_match_xplique_loop_on_a_nonlinear_model(data, insertion, baseline):
    images, targets = data
    model = conv_model()
    maps = torch.randn(len(images), H, W)
    fn = insertion_curve if insertion else deletion_curve
    curves = fn(model, images, targets, maps, steps=7, baseline=baseline, batch_size=4)
    assert model.training  # restored
    reference = xplique_causal_curve(model, images, targets, maps, 7, np.asarray(baseline), insertion)
    np.testing.assert_allclose(curves.numpy(), reference, atol=1e-5)
    # AUC: xplique's trapezoid mean equals numpy's trapezoid rule on x in [0, 1]
    np.testing.assert_allclose(auc(curves).numpy(), np.trapezoid(reference, dx=1 / 7, axis=1), atol=1e-5)


def test_curves_do_not_depend_on_batch_size_and_work_in_inference_mode(data):
    images, targets = data
    model = conv_model()
    maps = torch.randn(len(images), H, W)
    reference = deletion_curve(model, images, targets, maps, batch_size=1000)
    with torch.inference_mode():
        inside = deletion_curve(model, images.clone(), targets, maps, batch_size=3)
    torch.testing.assert_close(inside, reference)
    assert all(p.grad is None for p in model.parameters())


def test_bad_inputs_name_the_problem(data):
    images, targets = data
    model = linear_model()
    with pytest.raises(ValueError, match=r"maps must be \[B, H, W\]"):
        deletion_curve(model, images, targets, torch.rand(5, 3, H, W))
    with pytest.raises(ValueError, match="steps"):
        insertion_curve(model, images, targets, torch.rand(5, H, W), steps=0)
    with pytest.raises(ValueError, match="does not broadcast"):
        deletion_curve(model, images, targets, torch.rand(5, H, W), baseline=torch.zeros(2, 1, 1))


def test_mufidelity_of_exact_linear_attribution_is_one_and_random_is_zero():
    images, targets = torch.rand(16, C, H, W), torch.randint(0, K, (16,))
    model = linear_model()
    exact = mufidelity(model, images, targets, exact_attribution(model, images, targets), grid_size=3)
    assert (exact > 0.99).all()
    random = mufidelity(model, images, targets, torch.randn(16, H, W), grid_size=3)
    assert random.mean().abs() < 0.1


def test_mufidelity_matches_scipy_loop(data):
    images, targets = data
    model = conv_model()
    maps = torch.randn(len(images), H, W)
    rho = mufidelity(model, images, targets, maps, grid_size=4, nb_samples=30, baseline=0.2, batch_size=7, seed=3)
    assert model.training
    with torch.inference_mode():
        inside = mufidelity(model, images, targets, maps, grid_size=4, nb_samples=30, baseline=0.2, seed=3)
    torch.testing.assert_close(inside, rho)
    keep = random_cell_masks(30, 4, (H, W), 0.2, seed=3)
    model.eval()
    with torch.no_grad():
        for i in range(len(images)):
            clean = model(images[i : i + 1])[0, targets[i]]
            perturbed = model(images[i] * keep[:, None] + (1 - keep[:, None]) * 0.2)[:, targets[i]]
            attribution = (maps[i] * (1 - keep)).sum((1, 2))
            expected = spearmanr((clean - perturbed).numpy(), attribution.numpy())[0]
            assert rho[i].item() == pytest.approx(expected, abs=1e-5)


def test_random_cell_masks_remove_whole_cells_at_the_requested_rate():
    keep = random_cell_masks(400, 4, (8, 8), subset_percent=0.25, seed=0)
    cells = keep.view(400, 4, 2, 4, 2)
    assert (cells == cells[:, :, :1, :, :1]).all()  # constant on each 2x2 cell
    assert 1 - keep.mean().item() == pytest.approx(0.25, abs=0.03)


@pytest.mark.parametrize("metric_cls", [Deletion, Insertion, MuFidelity])
def test_metric_of_two_merged_halves_equals_single_instance(data, metric_cls):
    images, targets = data
    model = conv_model()
    maps = torch.randn(len(images), H, W)
    options = {"nb_samples": 20} if metric_cls is MuFidelity else {"steps": 5}
    whole, first, second = (metric_cls(batch_size=8, **options) for _ in range(3))
    whole.update(model=model, images=images, targets=targets, maps=maps)
    first.update(model=model, images=images[:2], targets=targets[:2], maps=maps[:2])
    second.update(model=model, images=images[2:], targets=targets[2:], maps=maps[2:])
    first.merge_state(second)
    assert first.compute().item() == pytest.approx(whole.compute().item(), abs=1e-6)
    if metric_cls is MuFidelity:
        expected = mufidelity(model, images, targets, maps, nb_samples=20).mean()
    else:
        fn = insertion_curve if metric_cls is Insertion else deletion_curve
        curves = fn(model, images, targets, maps, steps=5)
        expected = auc(curves).mean()
        torch.testing.assert_close(whole.compute_curve(), curves.mean(0))
    assert whole.compute().item() == pytest.approx(expected.item(), abs=1e-6)
    assert set(metric_cls.requires) == {"model", "images", "targets", "maps"}


def test_mufidelity_metric_options_are_xplique_defaults_checked_when_built():
    metric = MuFidelity()
    assert (metric.grid_size, metric.subset_percent, metric.nb_samples, metric.baseline, metric.batch_size,
            metric.seed) == (9, 0.2, 200, 0.0, 64, 0)  # xplique's MuFidelity defaults, then ours
    assert MuFidelity(nb_samples=5, seed=None).nb_samples == 5
    for bad in ({"nb_samples": 1}, {"grid_size": True}, {"subset_percent": 1.0}, {"batch_size": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MuFidelity(**bad)
    with pytest.raises(ValueError, match="gridsize"):  # a misspelt option reaches torchmetrics, which refuses it
        MuFidelity(gridsize=3)


def test_causal_curve_modes_are_the_deletion_and_insertion_curves():
    from explain.metrics.functional import causal_curve

    torch.manual_seed(0)
    model, images, targets, maps = linear_model(), torch.rand(3, C, H, W), torch.tensor([0, 1, 2]), torch.rand(3, H, W)
    deletion = causal_curve(model, images, targets, maps, mode="deletion", steps=4)
    insertion = causal_curve(model, images, targets, maps, mode="insertion", steps=4)
    assert torch.equal(deletion, deletion_curve(model, images, targets, maps, steps=4))
    assert torch.equal(insertion, insertion_curve(model, images, targets, maps, steps=4))
    scores = model(images).gather(1, targets[:, None])[:, 0]
    baseline_scores = model(torch.zeros_like(images)).gather(1, targets[:, None])[:, 0]
    # the two curves run between the same end points in opposite directions
    torch.testing.assert_close(deletion[:, 0], scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(insertion[:, -1], scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(deletion[:, -1], baseline_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(insertion[:, 0], baseline_scores, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        causal_curve(model, images, targets, maps, mode="both")
    with pytest.raises(TypeError):  # the options are keyword-only, as mufidelity's
        deletion_curve(model, images, targets, maps, 4)
