"""Saliency family and the captum adapter, checked against captum and closed forms."""

import sys

import pytest
import torch
from captum.attr import InputXGradient, IntegratedGradients, LayerAttribution, LayerGradCam, NoiseTunnel
from captum.attr import Saliency as CaptumSaliency
from torch import nn

from explain import GradientInput, Saliency, SmoothGrad, from_captum
from explain.attributions.captum import CaptumExplainer
from explain.attributions.saliency import REDUCTIONS, input_gradients, reduce_channels


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    ).eval()


@pytest.fixture
def data():
    torch.manual_seed(1)
    return torch.rand(4, 3, 8, 8), torch.tensor([0, 3, 1, 4])


@pytest.mark.parametrize("reduce", ["absmax", "sum"])
def test_saliency_equals_captum(data, reduce):
    images, targets = data
    model = small_cnn()
    expected = CaptumSaliency(model).attribute(images.clone(), target=targets, abs=False)
    maps = Saliency(model, reduce=reduce)(images, targets)
    torch.testing.assert_close(maps, reduce_channels(expected, reduce))
    if reduce == "absmax":  # captum's default abs=True, then max over channels
        absolute = CaptumSaliency(model).attribute(images.clone(), target=targets)
        torch.testing.assert_close(maps, absolute.amax(1))


@pytest.mark.parametrize("reduce", ["absmax", "sum"])
def test_gradient_input_equals_captum(data, reduce):
    images, targets = data
    model = small_cnn()
    expected = InputXGradient(model).attribute(images.clone(), target=targets)
    torch.testing.assert_close(GradientInput(model, reduce=reduce)(images, targets), reduce_channels(expected, reduce))


def test_saliency_of_linear_model_is_its_weights(data):
    images, targets = data
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    weights = model[1].weight.detach().view(5, 3, 8, 8)
    torch.testing.assert_close(Saliency(model)(images, targets), weights[targets].abs().amax(1))
    torch.testing.assert_close(
        GradientInput(model, reduce="sum")(images, targets), (weights[targets] * images).sum(1)
    )


def test_smoothgrad_equals_captum_noise_tunnel_with_the_same_noise(data):
    # captum draws the noise of one image as torch.normal(0, stdev) [S, C, H, W] from the global RNG;
    # SmoothGrad with seed=None draws the same normals from the same RNG.
    images, targets = data
    model = small_cnn()
    tunnel = NoiseTunnel(CaptumSaliency(model))
    for image, target in zip(images, targets):
        torch.manual_seed(7)
        expected = tunnel.attribute(image[None], nt_samples=12, stdevs=0.2, abs=False, target=target[None])
        torch.manual_seed(7)
        maps = SmoothGrad(model, nb_samples=12, noise=0.2, seed=None, batch_size=5)(image[None], target[None])
        torch.testing.assert_close(maps, expected.abs().amax(1))


def test_smoothgrad_properties(data):
    images, targets = data
    model = small_cnn()
    # no noise: every sample is the image itself
    saliency = Saliency(model)(images, targets)
    torch.testing.assert_close(SmoothGrad(model, nb_samples=3, noise=0.0)(images, targets), saliency)
    # a linear model has the same gradient everywhere: noise changes nothing
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    torch.testing.assert_close(SmoothGrad(linear, nb_samples=8)(images, targets), Saliency(linear)(images, targets))
    # noise does change the map of a non-linear model, and the seed decides how
    smooth = SmoothGrad(model, nb_samples=8, seed=0)(images, targets)
    assert not torch.allclose(smooth, saliency)
    torch.testing.assert_close(smooth, SmoothGrad(model, nb_samples=8, seed=0)(images, targets), rtol=0, atol=0)
    assert not torch.allclose(smooth, SmoothGrad(model, nb_samples=8, seed=1)(images, targets))


def test_chunking_does_not_change_results(data):
    images, targets = data
    model = small_cnn()
    torch.testing.assert_close(Saliency(model, batch_size=1)(images, targets), Saliency(model)(images, targets))
    torch.testing.assert_close(
        SmoothGrad(model, nb_samples=6, batch_size=4)(images, targets),  # chunks cut across images
        SmoothGrad(model, nb_samples=6, batch_size=64)(images, targets),
    )
    grads = input_gradients(model, images, targets, batch_size=3)
    assert grads.shape == images.shape


def test_reduce_channels_options():
    x = torch.randn(2, 3, 4, 5)
    expected = {
        "absmax": x.abs().max(1).values,
        "max": x.max(1).values,
        "sum": x[:, 0] + x[:, 1] + x[:, 2],
        "abssum": x.abs()[:, 0] + x.abs()[:, 1] + x.abs()[:, 2],
        "mean": (x[:, 0] + x[:, 1] + x[:, 2]) / 3,
        "absmean": (x.abs()[:, 0] + x.abs()[:, 1] + x.abs()[:, 2]) / 3,
    }
    assert set(expected) == set(REDUCTIONS)
    for name, value in expected.items():
        torch.testing.assert_close(reduce_channels(x, name), value)
    torch.testing.assert_close(reduce_channels(x, lambda a: a[:, 1]), x[:, 1])
    with pytest.raises(ValueError, match="reduce must be one of"):
        reduce_channels(x, "median")
    with pytest.raises(ValueError, match="reduce must be one of"):
        Saliency(small_cnn(), reduce="median")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        reduce_channels(x[0], "sum")


def test_smoothgrad_bad_options():
    with pytest.raises(ValueError, match="nb_samples"):
        SmoothGrad(small_cnn(), nb_samples=0)
    with pytest.raises(ValueError, match="noise"):
        SmoothGrad(small_cnn(), noise=-1.0)


# ---------------------------------------------------------------- captum adapter


def test_from_captum_saliency_equals_builtin(data):
    images, targets = data
    model = small_cnn()
    explainer = from_captum(CaptumSaliency)(model, batch_size=3)
    assert isinstance(explainer, CaptumExplainer) and explainer.name == "saliency"
    torch.testing.assert_close(explainer(images, targets), Saliency(model)(images, targets))


def test_from_captum_by_name_passes_attribute_kwargs(data):
    images, targets = data
    model = small_cnn()
    explainer = from_captum("IntegratedGradients")(model, n_steps=16, reduce="sum")
    expected = IntegratedGradients(model).attribute(images.clone(), target=targets, n_steps=16).sum(1)
    torch.testing.assert_close(explainer(images, targets), expected)


def test_from_captum_layer_method_is_resized_to_the_image(data):
    images, targets = data
    model = small_cnn()
    explainer = from_captum(LayerGradCam, layer=model[4])(model, relu_attributions=True)
    maps = explainer(images, targets)
    assert maps.shape == (4, 8, 8)
    cam = LayerGradCam(model, model[4]).attribute(images.clone(), target=targets, relu_attributions=True)
    assert cam.shape == (4, 1, 4, 4)
    torch.testing.assert_close(maps, LayerAttribution.interpolate(cam, (8, 8), "bilinear")[:, 0])


def test_from_captum_is_seeded_and_leaves_the_global_rng_alone(data):
    images, targets = data
    model = small_cnn()
    factory = from_captum(lambda m: NoiseTunnel(CaptumSaliency(m)))
    first = factory(model, nt_samples=4, stdevs=0.3, seed=3)
    state = torch.get_rng_state()
    maps = first(images, targets)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(maps, factory(model, nt_samples=4, stdevs=0.3, seed=3)(images, targets), rtol=0, atol=0)
    assert not torch.allclose(maps, factory(model, nt_samples=4, stdevs=0.3, seed=4)(images, targets))


def test_from_captum_errors(monkeypatch):
    model = small_cnn()
    with pytest.raises(ValueError, match="no attribution method named 'Nope'"):
        from_captum("Nope")
    with pytest.raises(ValueError, match="'target' is set by the explainer"):
        from_captum(CaptumSaliency)(model, target=0)
    with pytest.raises(TypeError, match="did not build a captum attribution"):
        from_captum(lambda m: m)(model)
    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(ImportError, match=r"pip install 'aligned-vision\[dev\]'"):
        from_captum("Saliency")
