"""Sobol attribution: perturbations against their plain definitions, the forward count, closed-form indices
of a linear model, and where the mass goes for models that look at one region only."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import uniform_filter
from torch import nn

from explain import Sobol
from explain.attributions.perturbations import apply_masks, box_blur, perturb, perturbation_terms, upsample_nearest
from explain.attributions.sobol import evaluate_masks, sobol_attribution, sobol_indices
from explain.sensitivity import ESTIMATORS

# ---------------------------------------------------------------- perturbations


@pytest.mark.parametrize("size", [(16, 16), (12, 20), (18, 13)])
def test_inpainting_equals_its_definition(size):
    image, masks = torch.rand(3, *size), torch.rand(7, 4, 4)
    up = F.interpolate(masks[:, None], size=size, mode="nearest-exact")  # [7, 1, H, W]
    for baseline in (0.0, 0.5, torch.rand(3, 1, 1)):
        expected = image * up + (1 - up) * baseline
        torch.testing.assert_close(perturb(image, masks, "inpainting", baseline=baseline), expected)


def test_nearest_upsampling_is_blockwise_when_the_grid_divides_the_image():
    masks = torch.rand(5, 4, 4)
    block = masks.repeat_interleave(3, dim=1).repeat_interleave(2, dim=2)  # [5, 12, 8]
    assert torch.equal(upsample_nearest(masks, (12, 8)), block)
    assert torch.equal(F.interpolate(masks[:, None], size=(12, 8), mode="nearest")[:, 0], block)


def test_box_blur_equals_cv2_semantics_via_scipy():
    # cv2.blur(x, (k, k)) = mean over the window [i - k//2, i + k - 1 - k//2] with reflect-101 borders,
    # which is scipy's uniform_filter(mode="mirror") with its default origin.
    images = torch.rand(2, 3, 17, 23, dtype=torch.float64)
    for k in (10, 3, 4):
        expected = uniform_filter(images.numpy(), size=(1, 1, k, k), mode="mirror")
        np.testing.assert_allclose(box_blur(images, k).numpy(), expected, atol=1e-12)
    assert torch.equal(box_blur(images, 1), images)
    assert box_blur(torch.rand(1, 1, 3, 3), 10).shape == (1, 1, 3, 3)  # too small to reflect: replicate


def test_blur_and_amplitude_equal_their_definitions():
    image, masks = torch.rand(3, 16, 16), torch.rand(6, 8, 8)
    up = masks.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None]
    blurred = box_blur(image[None], 10)[0]
    torch.testing.assert_close(perturb(image, masks, "blur"), image * up + (1 - up) * blurred)
    torch.testing.assert_close(perturb(image, masks, "amplitude", amplitude_sigma=2.0), image * (up - 0.5) * 2.0)


def test_apply_masks_writes_into_out():
    base, delta = torch.rand(3, 8, 8), torch.rand(3, 8, 8)
    masks = torch.rand(4, 2, 2)
    out = torch.empty(6, 3, 8, 8)[1:5]  # a slice of a bigger buffer, as in the batched evaluation
    result = apply_masks(base, delta, masks, out=out)
    assert result.data_ptr() == out.data_ptr()
    up = masks.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]
    torch.testing.assert_close(result, base + delta * up)
    with pytest.raises(ValueError, match="perturbation must be one of"):
        perturbation_terms(torch.rand(1, 3, 8, 8), "noise")


# ---------------------------------------------------------------- batched evaluation


class Counting(nn.Module):
    """Records the number of rows of every forward call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows: list[int] = []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return self.model(x)


def tiny_cnn(in_size: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)
    )


@pytest.mark.parametrize("batch_size", [50, 136, 1000])
def test_forward_count_is_exactly_n_times_d_plus_one_per_image(batch_size):
    model = Counting(tiny_cnn())
    explainer = Sobol(model, grid_size=4, nb_design=8, batch_size=batch_size)
    maps = explainer(torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 2]))
    assert maps.shape == (3, 8, 8)
    per_image = 8 * (16 + 1)
    assert explainer.nb_forwards == per_image
    assert sum(model.rows) == 3 * per_image
    assert max(model.rows) <= batch_size
    assert len(model.rows) == math.ceil(3 * per_image / batch_size)  # rows of several images share a pass


@pytest.mark.parametrize("size", [8, 10])
@pytest.mark.parametrize("perturbation", ["inpainting", "blur", "amplitude"])
def test_batched_evaluation_equals_one_mask_at_a_time(perturbation, size):
    model = tiny_cnn().eval()
    images, targets = torch.rand(2, 3, size, size), torch.tensor([2, 0])
    masks = torch.rand(9, 4, 4)
    base, delta, offset = perturbation_terms(images, perturbation, baseline=0.3)
    scores = evaluate_masks(model, base, delta, masks - offset, targets, batch_size=4)
    assert scores.shape == (2, 9) and not scores.is_inference()
    with torch.no_grad():
        for b in range(2):
            for r in range(9):
                x = perturb(images[b], masks[r : r + 1], perturbation, baseline=0.3)
                torch.testing.assert_close(scores[b, r], model(x)[0, targets[b]])


def test_map_is_the_bicubic_resize_of_the_index_grid():
    model = tiny_cnn().eval()
    images, targets = torch.rand(2, 3, 16, 16), torch.tensor([1, 2])
    indices = sobol_indices(model, images, targets, grid_size=4, nb_design=8)
    maps = sobol_attribution(model, images, targets, grid_size=4, nb_design=8)
    assert indices.shape == (2, 4, 4)
    torch.testing.assert_close(maps, F.interpolate(indices[:, None], size=(16, 16), mode="bicubic")[:, 0])
    torch.testing.assert_close(Sobol(model, grid_size=4, nb_design=8)(images, targets), maps)


# ---------------------------------------------------------------- where the mass goes


class CellWeights(nn.Module):
    """Logit 0 = sum of pixels weighted by a per-cell weight (a linear model of the cells)."""

    def __init__(self, weights: torch.Tensor, size: int) -> None:
        super().__init__()
        scale = size // weights.shape[0]
        self.register_buffer("w", weights.repeat_interleave(scale, 0).repeat_interleave(scale, 1))

    def forward(self, x):
        score = (x * self.w).sum((1, 2, 3))
        return torch.stack([score, -score], 1)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_linear_model_indices_match_closed_form(estimator):
    # inpainting towards 0 with independent uniform masks: f = sum_i w_i s_i M_i with s_i the pixel sum of
    # cell i, so ST_i = (w_i s_i)^2 / sum_j (w_j s_j)^2
    weights = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    model = CellWeights(weights, 8)
    images = torch.rand(2, 3, 8, 8)
    indices = sobol_indices(model, images, torch.tensor([0, 1]), grid_size=2, nb_design=2**11, estimator=estimator)
    cell_sums = images.sum(1).view(2, 2, 4, 2, 4).sum((2, 4))
    contribution = (weights * cell_sums).square()
    torch.testing.assert_close(indices, contribution / contribution.sum((1, 2), keepdim=True), atol=0.02, rtol=0)
    assert indices[:, 1, 1].abs().max() < 1e-9  # the cell of weight 0


class OneRegion(nn.Module):
    """A non-linear model of one rectangle of the image only."""

    def __init__(self, rows: slice, cols: slice) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.net = tiny_cnn()

    def forward(self, x):
        region = torch.zeros_like(x)
        region[:, :, self.rows, self.cols] = x[:, :, self.rows, self.cols]
        return self.net(region) + 5 * torch.tanh(region.sum((1, 2, 3)))[:, None] ** 2


def test_model_of_one_region_gets_all_the_mass_there():
    model = OneRegion(slice(4, 8), slice(8, 12))  # cell (1, 2) of a 4x4 grid on 16x16 images
    images, targets = torch.rand(3, 3, 16, 16) + 0.1, torch.tensor([0, 1, 2])
    indices = sobol_indices(model, images, targets, grid_size=4, nb_design=32)
    assert (indices[:, 1, 2] > 0.5).all()
    outside = indices.clone()
    outside[:, 1, 2] = 0
    assert outside.abs().max() < 1e-6
    maps = Sobol(model, grid_size=4, nb_design=32)(images, targets)
    peak = maps.flatten(1).argmax(1)
    rows, cols = peak // 16, peak % 16
    assert ((rows >= 4) & (rows < 8) & (cols >= 8) & (cols < 12)).all()


def test_model_ignoring_half_the_image_gives_zero_there():
    class LeftHalf(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_cnn()

        def forward(self, x):
            return self.net(torch.cat([x[..., :8], torch.zeros_like(x[..., 8:])], -1))

    model = LeftHalf()
    images, targets = torch.rand(2, 3, 16, 16), torch.tensor([0, 2])
    for perturbation in ("inpainting", "blur", "amplitude"):
        indices = sobol_indices(model, images, targets, grid_size=4, nb_design=16, perturbation=perturbation)
        assert indices[..., 2:].abs().max() < 1e-6, perturbation
        assert (indices[..., :2].sum((1, 2)) > 0.5).all(), perturbation
        maps = Sobol(model, grid_size=4, nb_design=16, perturbation=perturbation)(images, targets)
        # bicubic weights reach 2 cells away: columns 14, 15 have no used cell in reach and are exactly 0
        assert maps[..., 14:].abs().max() < 1e-6, perturbation


# ---------------------------------------------------------------- options


def test_seed_none_draws_a_new_scrambling():
    model = tiny_cnn()
    images, targets = torch.rand(1, 3, 8, 8), torch.tensor([0])
    explainer = Sobol(model, grid_size=2, nb_design=8, seed=None)
    assert not torch.allclose(explainer(images, targets), explainer(images, targets))


def test_bad_options_raise():
    model = tiny_cnn()
    with pytest.raises(ValueError, match="power of two"):
        Sobol(model, nb_design=24)
    with pytest.raises(ValueError, match="perturbation must be one of"):
        Sobol(model, perturbation="blurring")
    with pytest.raises(ValueError, match="estimator must be one of"):
        Sobol(model, estimator="sobol")
    with pytest.raises(ValueError, match="grid_size"):
        Sobol(model, grid_size=0)
    with pytest.raises(ValueError, match="blur_size"):
        Sobol(model, blur_size=0)
    with pytest.raises(ValueError, match="grid_size=8 is larger than the images"):
        Sobol(model)(torch.rand(1, 3, 4, 4), 0)
    assert "grid_size=8" in repr(Sobol(model))
