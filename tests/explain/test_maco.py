"""MACO feature visualization: parameterisation, spectrum, objectives, optimisation loop, figure.

Independent checks: numpy's FFT and closed forms for the spectra, the magnitude of the returned image recovered by
inverting the colour map, direct computations through the model for the objectives, random phases as the
baseline the optimisation must beat.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from explain.featureviz import (
    Objective,
    channel,
    concept_direction,
    concept_directions,
    load_spectrum,
    logit,
    maco,
    maco_batch,
    maco_image,
    maco_overlay,
    magnitude_spectrum,
    neuron,
    plot_maco,
    power_law_spectrum,
    resize_spectrum,
    save_spectrum,
    spectrum_to_image,
)
from explain.featureviz.maco import random_crops
from explain.featureviz.objectives import layer_output
from explain.featureviz.parameterization import (
    COLOR_CORRELATION,
    decorrelate_colors,
    recorrelate_colors,
    standardize,
    symmetrize_magnitude,
)


def small_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def smooth_images(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=generator)
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def self_conjugate(height: int, width: int) -> torch.Tensor:
    """Mask [H, W//2+1] of the real-valued coefficients of a real image's half spectrum."""
    mask = torch.zeros(height, width // 2 + 1, dtype=torch.bool)
    for row in {0, height // 2} if height % 2 == 0 else {0}:
        for column in {0, width // 2} if width % 2 == 0 else {0}:
            mask[row, column] = True
    return mask


# ----------------------------------------------------------------------------------------------- parameterisation


@pytest.mark.parametrize("height, width", [(32, 32), (31, 33), (32, 31), (33, 30)])
def test_decorrelated_image_has_exactly_the_given_magnitude(height, width):
    generator = torch.Generator().manual_seed(height + width)
    magnitude = symmetrize_magnitude(torch.rand(3, height, width // 2 + 1, generator=generator) + 0.1, width)
    phase = torch.randn(3, height, width // 2 + 1, generator=generator)
    image = spectrum_to_image(magnitude, phase, width).double()
    assert image.shape == (3, height, width)
    found = torch.from_numpy(np.abs(np.fft.rfft2(image.numpy())))  # independent FFT

    # real coefficients keep magnitude * |cos(phase)| (their phase is a sign); the DC also loses the mean
    expected = magnitude.double().clone()
    real = self_conjugate(height, width)
    expected[:, real] *= standardize(phase)[:, real].cos().abs().double()
    scale = (found[:, 1:, 1:] / expected[:, 1:, 1:]).median()  # one global constant: the standardisation
    not_dc = torch.ones_like(expected, dtype=torch.bool)
    not_dc[:, 0, 0] = False
    torch.testing.assert_close(found[not_dc], scale * expected[not_dc], rtol=2e-5, atol=1e-6)


def test_colour_recorrelation_is_lucids_matrix_product():
    pixels = torch.randn(3, 5, 7)
    out = recorrelate_colors(pixels)
    # RGB pixel (row) = decorrelated pixel (row) @ M, as Lucid/Horama's flat_image @ matrix
    manual = (pixels.permute(1, 2, 0).reshape(-1, 3) @ COLOR_CORRELATION).reshape(5, 7, 3).permute(2, 0, 1)
    torch.testing.assert_close(out, manual)
    torch.testing.assert_close(decorrelate_colors(out), pixels, rtol=1e-5, atol=1e-5)


def test_maco_returned_image_has_the_magnitude_before_colour_map_and_sigmoid():
    size, low, high = 24, -1.0, 2.0
    magnitude = magnitude_spectrum(smooth_images(size=size))
    image, _ = maco(
        logit(small_cnn(), 1), size, steps=3, magnitude=magnitude, crops_per_step=2, value_range=(low, high)
    )
    # undo the value range, the sigmoid and the colour recorrelation
    unit = ((image.double() - low) / (high - low)).clamp(1e-12, 1 - 1e-12)
    before = decorrelate_colors(torch.logit(unit))
    found = torch.from_numpy(np.abs(np.fft.rfft2(before.numpy())))
    generic = ~self_conjugate(size, size).expand(3, -1, -1)
    ratio = found[generic] / magnitude.double()[generic]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio.median().item()), rtol=1e-3, atol=0)


# ------------------------------------------------------------------------------------------------------- spectrum


def test_spectrum_is_the_mean_rfft2_magnitude():
    images = smooth_images(3, 16)
    expected = np.abs(np.fft.rfft2(images.double().numpy())).mean(0)
    torch.testing.assert_close(magnitude_spectrum(images, decorrelate=False), torch.from_numpy(expected).float())
    decorrelated = decorrelate_colors(images.double()).numpy()
    expected = np.abs(np.fft.rfft2(decorrelated)).mean(0)
    torch.testing.assert_close(magnitude_spectrum(images), torch.from_numpy(expected).float())


def test_spectrum_from_a_dataloader_equals_the_stacked_tensor():
    images = smooth_images(10, 16)
    expected = magnitude_spectrum(images)
    dicts = [{"image": image, "label": torch.tensor(0)} for image in images]
    tuples = [(image, 0) for image in images]
    torch.testing.assert_close(magnitude_spectrum(DataLoader(dicts, batch_size=4)), expected)
    torch.testing.assert_close(magnitude_spectrum(DataLoader(tuples, batch_size=3)), expected)
    torch.testing.assert_close(magnitude_spectrum(list(images.split(4))), expected)
    loader = DataLoader(dicts, batch_size=4)
    torch.testing.assert_close(magnitude_spectrum(loader, max_batches=1), magnitude_spectrum(images[:4]))
    resized = F.interpolate(images, size=(12, 20), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(magnitude_spectrum(loader, image_size=(12, 20)), magnitude_spectrum(resized))


def test_power_law_fallback_is_one_over_f():
    magnitude = power_law_spectrum((16, 20))
    assert magnitude.shape == (3, 16, 11)
    assert torch.equal(magnitude[0], magnitude[2])
    fy, fx = np.meshgrid(np.fft.fftfreq(16), np.fft.rfftfreq(20), indexing="ij")
    expected = 1.0 / np.maximum(np.hypot(fy, fx), 1 / 20)
    torch.testing.assert_close(magnitude[1], torch.from_numpy(expected).float())


def test_resize_spectrum_matches_coefficients_by_relative_frequency():
    small = power_law_spectrum(32)  # 1/f depends on the relative frequency only
    large = resize_spectrum(small, 64)
    assert large.shape == (3, 64, 33)
    exact = power_law_spectrum(64)
    # even rows/columns of the 64 grid are exactly the frequencies of the 32 grid (the DC is clamped)
    torch.testing.assert_close(large[:, 2::2, 2::2], exact[:, 2::2, 2::2], rtol=1e-5, atol=1e-6)
    assert resize_spectrum(small, 32) is small


def test_spectrum_cache_is_reused_without_reading_the_data(tmp_path):
    class Untouchable:
        def __iter__(self):
            raise AssertionError("the cached spectrum should have been used")

    images = smooth_images(4, 16)
    first = magnitude_spectrum(images, cache=tmp_path / "cache.pt")
    assert (tmp_path / "cache.pt").is_file()
    assert torch.equal(magnitude_spectrum(Untouchable(), cache=tmp_path / "cache.pt"), first)
    assert torch.equal(magnitude_spectrum(Untouchable(), image_size=16, cache=tmp_path / "cache.pt"), first)
    # another size: recomputed (and the cache updated)
    resized = magnitude_spectrum(images, image_size=8, cache=tmp_path / "cache.pt")
    assert resized.shape == (3, 8, 5) and torch.equal(load_spectrum(tmp_path / "cache.pt"), resized)


def test_save_and_load_spectrum(tmp_path):
    magnitude = magnitude_spectrum(smooth_images(4, 16))
    save_spectrum(magnitude, tmp_path / "spectrum.pt")
    assert torch.equal(load_spectrum(tmp_path / "spectrum.pt"), magnitude)
    np.save(tmp_path / "spectrum.npy", magnitude.numpy())
    assert torch.equal(load_spectrum(tmp_path / "spectrum.npy"), magnitude)
    # a path works as maco's magnitude
    first, _ = maco(logit(small_cnn(), 0), 16, steps=2, magnitude=tmp_path / "spectrum.pt", crops_per_step=2)
    second, _ = maco(logit(small_cnn(), 0), 16, steps=2, magnitude=magnitude, crops_per_step=2)
    assert torch.equal(first, second)


# ----------------------------------------------------------------------------------------------------- objectives


def test_objectives_equal_direct_computations():
    model = small_cnn()
    crops = smooth_images(4, 32)
    with torch.no_grad():
        features = model[:4](crops)  # output of model[3], the second conv: [4, 16, 16, 16]
        torch.testing.assert_close(logit(model, 3)(crops), model(crops)[:, 3])
        torch.testing.assert_close(channel(model, "3", 5)(crops), features[:, 5].mean((1, 2)))
        torch.testing.assert_close(channel(model, model[3], 5)(crops), features[:, 5].mean((1, 2)))
        torch.testing.assert_close(neuron(model, "3", 5)(crops), features[:, 5, 8, 8])
        torch.testing.assert_close(neuron(model, "3", 5, position=(2, 9))(crops), features[:, 5, 2, 9])
        torch.testing.assert_close(neuron(model, "7", 2)(crops), model(crops)[:, 2])
        combined = logit(model, 1) - 0.5 * logit(model, 2)
        torch.testing.assert_close(combined(crops), model(crops)[:, 1] - 0.5 * model(crops)[:, 2])
    assert not model[3]._forward_hooks, "the capture hook must be removed"


def test_layer_capture_stops_the_forward_pass_and_cleans_up():
    class Boom(nn.Module):
        def forward(self, x):
            raise AssertionError("ran past the captured layer")

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Boom())
    out = layer_output(model, model[1], torch.rand(2, 3, 8, 8))
    assert out.shape == (2, 4, 6, 6)
    assert not model[1]._forward_hooks
    with pytest.raises(ValueError, match="out of range"):
        channel(model, "1", 9)(torch.rand(2, 3, 8, 8))
    assert not model[1]._forward_hooks


@pytest.mark.parametrize("similarity", ["dot", "cosine", "dot_cossim"])
def test_concept_direction_closed_form(similarity):
    model = small_cnn()
    feature_fn = model[:5]  # activations >= 0 before the global pooling, as CRAFT's input_to_latent
    direction = torch.rand(16)
    crops = smooth_images(4, 32)
    with torch.no_grad():
        pooled = feature_fn(crops).mean((2, 3)).double()
        dot = pooled @ direction.double()
        cosine = dot / (pooled.norm(dim=1) * direction.double().norm())
        expected = {"dot": dot, "cosine": cosine, "dot_cossim": dot * cosine.clamp_min(0.1) ** 2}[similarity]
        found = concept_direction(feature_fn, direction, similarity=similarity)(crops)
    torch.testing.assert_close(found.double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="direction has 7 entries"):
        concept_direction(feature_fn, torch.rand(7))(crops)


# --------------------------------------------------------------------------------------------------- optimisation


def test_objective_rises_well_above_random_phases():
    model = small_cnn()
    magnitude = power_law_spectrum(32)
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        phases = torch.randn(64, *magnitude.shape, generator=generator)
        random_images = torch.stack([maco_image(magnitude, phase) for phase in phases])
        baseline = model(random_images)[:, 2]
    image, alpha = maco(logit(model, 2), 32, steps=30, magnitude=magnitude, crops_per_step=8, box_size=1.0)
    with torch.no_grad():
        score = model(image[None])[0, 2]
    assert score > baseline.max()
    assert (score - baseline.mean()) / baseline.std() > 5


def test_same_seed_same_result_and_other_seed_differs():
    magnitude, objective = power_law_spectrum(16), logit(small_cnn(), 0)

    def run(seed):
        torch.rand(10)  # the global RNG moves between runs: only `seed` may decide the result
        return maco(objective, 16, steps=3, magnitude=magnitude, crops_per_step=2, seed=seed)

    (image_a, alpha_a), (image_b, alpha_b), (image_c, _) = run(7), run(7), run(8)
    assert torch.equal(image_a, image_b) and torch.equal(alpha_a, alpha_b)
    assert not torch.equal(image_a, image_c)


def test_model_parameters_grads_and_modes_untouched():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    model.train()
    model[1].eval()  # a mixed state must come back as it was
    model[0].weight.grad = torch.full_like(model[0].weight, 3.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    with torch.inference_mode():  # callers inside inference mode work too
        image, alpha = maco(logit(model, 1), 16, steps=3, magnitude=power_law_spectrum(16), crops_per_step=2)
    assert image.shape == (3, 16, 16) and alpha.shape == (16, 16)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 3.0))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "0.weight")


def test_value_range_size_and_transparency():
    with pytest.warns(UserWarning, match="FALLBACK"):
        image, alpha = maco(
            logit(small_cnn(), 0), (20, 28), steps=4, crops_per_step=3, value_range=(-2.0, 3.0), input_size=16
        )
    assert image.shape == (3, 20, 28) and alpha.shape == (20, 28)
    assert image.min() >= -2.0 and image.max() <= 3.0 and image.std() > 0
    assert (alpha >= 0).all() and alpha.sum() > 0


def test_random_crops_shape_range_and_noise():
    image = torch.rand(3, 24, 24)
    generator = torch.Generator().manual_seed(0)
    crops = random_crops(image, 5, 0.5, (16, 12), noise=0.0, generator=generator)
    assert crops.shape == (5, 3, 16, 12)
    assert crops.min() >= 0 and crops.max() <= 1  # bilinear: convex combinations of pixels (0 outside)
    noisy = random_crops(image, 5, 0.5, (16, 12), noise=0.1, generator=torch.Generator().manual_seed(0))
    residual = noisy - random_crops(image, 5, 0.5, (16, 12), noise=0.0, generator=torch.Generator().manual_seed(0))
    # N(0, 0.1) + U(-0.05, 0.05): std sqrt(0.01 + 0.01 / 12)
    assert abs(residual.std().item() - (0.01 + 0.01 / 12) ** 0.5) < 0.01


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"steps": 0}, ValueError, "steps"),
        ({"crops_per_step": 0}, ValueError, "crops_per_step"),
        ({"value_range": (1.0, 0.0)}, ValueError, "value_range"),
        ({"box_size": 1.5}, ValueError, "box_size"),
        ({"box_size": (0.5, 0.0)}, ValueError, "box_size"),
        ({"image_size": 0}, ValueError, "image_size"),
        ({"magnitude": torch.rand(16, 9)}, ValueError, r"\[3, H, W//2\+1\]"),
        ({"magnitude": -torch.rand(3, 16, 9)}, ValueError, ">= 0"),
        ({"magnitude": "missing.pt"}, FileNotFoundError, "magnitude_spectrum"),
        ({"noise": -1.0}, ValueError, "noise"),
    ],
)
def test_bad_maco_arguments(kwargs, error, match):
    arguments = {"image_size": 16, "steps": 1, "crops_per_step": 1, "magnitude": power_law_spectrum(16)} | kwargs
    with pytest.raises(error, match=match):
        maco(logit(small_cnn(), 0), **arguments)


def test_bad_objectives_and_data():
    model = small_cnn()
    with pytest.raises(TypeError, match="callable"):
        maco("logit", 16)
    with pytest.raises(ValueError, match="one score per crop"):
        maco(Objective(lambda x: model(x), model), 16, steps=1, magnitude=power_law_spectrum(16))
    with pytest.raises(RuntimeError, match="no gradient"):
        maco(Objective(lambda x: model(x)[:, 0].detach(), model), 16, steps=1, magnitude=power_law_spectrum(16))
    with pytest.raises(ValueError, match="class_id 9 out of range"):
        maco(logit(model, 9), 16, steps=1, magnitude=power_law_spectrum(16))
    with pytest.raises(ValueError, match="no layer named 'conv9'"):
        channel(model, "conv9", 0)
    with pytest.raises(ValueError, match="not a submodule"):
        neuron(model, nn.ReLU(), 0)
    with pytest.raises(ValueError, match="direction must be a vector"):
        concept_direction(model[:5], torch.rand(2, 16))
    with pytest.raises(KeyError, match="'image'"):
        magnitude_spectrum([{"img": torch.rand(2, 3, 8, 8)}])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        magnitude_spectrum(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="image_size"):
        magnitude_spectrum([torch.rand(2, 3, 8, 8), torch.rand(2, 3, 10, 10)])
    with pytest.raises(ValueError, match="empty"):
        magnitude_spectrum([])


# ---------------------------------------------------------------------------------------------------- maco_batch


@pytest.mark.parametrize("images_per_pass", [None, 2])
def test_maco_batch_equals_maco_run_image_by_image(images_per_pass):
    # each image's own generator draws what maco(seed=...) draws: the batched run is the sequential one
    features = small_cnn()[:5]
    directions = torch.rand(3, 16, generator=torch.Generator().manual_seed(1)) + 0.1
    seeds = [5, 6, 5]  # two images with the same seed but different directions
    magnitude = power_law_spectrum(24)
    kwargs = dict(steps=6, crops_per_step=3, magnitude=magnitude, input_size=16)
    images, alphas = maco_batch(concept_directions(features, directions), 3, 24, seeds=seeds,
                                images_per_pass=images_per_pass, **kwargs)
    for j in range(3):
        alone, alpha = maco(concept_direction(features, directions[j]), 24, seed=seeds[j], **kwargs)
        torch.testing.assert_close(images[j], alone, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(alphas[j], alpha, rtol=1e-4, atol=1e-6)
    # the optimisation did something per image: the two images of seed 5 start alike and end apart
    assert (images[0] - images[2]).abs().max() > 1e-3
    assert all(p.grad is None for p in features.parameters())  # gradients w.r.t. the images only


def test_concept_directions_scores_each_image_with_its_own_direction():
    features = small_cnn()[:5]
    directions = torch.rand(3, 16, generator=torch.Generator().manual_seed(2))
    crops = torch.rand(2, 4, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    scores = concept_directions(features, directions)(crops, torch.tensor([2, 0]))
    torch.testing.assert_close(scores[0], concept_direction(features, directions[2])(crops[0]))
    torch.testing.assert_close(scores[1], concept_direction(features, directions[0])(crops[1]))


def test_maco_batch_bad_input():
    features = small_cnn()[:5]
    objective = concept_directions(features, torch.rand(2, 16) + 0.1)
    magnitude = power_law_spectrum(16)
    with pytest.raises(ValueError, match="one per image"):
        maco_batch(objective, 2, 16, steps=1, magnitude=magnitude, seeds=[0, 1, 2])
    with pytest.raises(ValueError, match="images_per_pass"):
        maco_batch(objective, 2, 16, steps=1, magnitude=magnitude, images_per_pass=0)
    with pytest.raises(ValueError, match=r"scores \[images, crops\]"):
        maco_batch(lambda crops, images: crops.sum((2, 3, 4)).flatten(), 2, 16, steps=1, magnitude=magnitude)
    with pytest.raises(ValueError, match="no zero row"):
        concept_directions(features, torch.zeros(2, 16))
    with pytest.raises(ValueError, match="directions have 7 entries"):
        concept_directions(features, torch.rand(2, 7))(torch.rand(1, 2, 3, 8, 8), torch.tensor([0]))


# --------------------------------------------------------------------------------------------------------- figure


def test_overlay_closed_form_and_figure():
    image = torch.rand(3, 8, 10)
    alpha = torch.rand(8, 10)
    overlay = maco_overlay(image, alpha, percentile_image=0.0, percentile_alpha=100.0, background=(0.0, 0.5, 1.0))
    unit = (image - image.min()) / (image.max() - image.min())
    weight = alpha / alpha.max()
    background = torch.tensor([0.0, 0.5, 1.0])[:, None, None]
    torch.testing.assert_close(overlay, unit * weight + background * (1 - weight))
    # alpha clipped at its 80th percentile: the top 20% of pixels are fully opaque
    clipped = maco_overlay(image, alpha, percentile_image=0.0)
    top = alpha >= torch.quantile(alpha.flatten(), 0.8)
    torch.testing.assert_close(clipped[:, top], unit[:, top])
    figure = plot_maco(image, alpha, title="class 3")
    assert figure.axes and figure.axes[0].get_title() == "class 3"
    import matplotlib.pyplot as plt

    plt.close(figure)
    with pytest.raises(ValueError, match="alpha must be"):
        maco_overlay(image, torch.rand(4, 4))
