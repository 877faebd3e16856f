"""The Explainer base class and its helpers, and the call contract of every attribution explainer:
safe under no_grad/inference_mode, train/eval flags and .grad untouched, batch == one image at a time,
deterministic given a seed, clear errors."""

import pytest
import torch
from captum.attr import Saliency as CaptumSaliency
from torch import nn

from explain import EVA, Explainer, GradientInput, Saliency, SmoothGrad, Sobol, from_captum
from explain.base import batched, check_images_targets, eval_mode, grad_enabled, model_device

# ---------------------------------------------------------------- helpers


def test_model_device():
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    buffers_only = nn.BatchNorm1d(2, affine=False)
    assert model_device(buffers_only) == torch.device("cpu")
    assert model_device(nn.ReLU(), default=torch.device("meta")) == torch.device("meta")
    assert model_device(nn.ReLU()) == torch.device("cpu")


def test_eval_mode_restores_every_flag_even_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.Sequential(nn.BatchNorm1d(2), nn.Dropout()))
    model.train()
    model[2][0].eval()  # a mixed state must come back exactly
    before = [m.training for m in model.modules()]
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == before


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_grad_enabled_leaves_no_grad_and_inference_mode(context):
    with context():
        with grad_enabled():
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            x = torch.ones(2, requires_grad=True)
            (grad,) = torch.autograd.grad((x * 3).sum(), x)
            assert torch.equal(grad, torch.full((2,), 3.0))
        assert not torch.is_grad_enabled()


def test_check_images_targets():
    images = torch.zeros(3, 1, 4, 4)
    _, targets = check_images_targets(images, 2)
    assert targets.dtype == torch.int64 and targets.tolist() == [2, 2, 2]
    _, targets = check_images_targets(images, [0, 1, 2])
    assert targets.dtype == torch.int64 and targets.tolist() == [0, 1, 2]
    _, targets = check_images_targets(images, torch.tensor([[0], [1], [2]], dtype=torch.int32))
    assert targets.dtype == torch.int64 and targets.shape == (3,)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\], got \(1, 4, 4\)"):
        check_images_targets(images[0], 0)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\], got list"):
        check_images_targets([[0.0]], 0)
    with pytest.raises(TypeError, match="floating point"):
        check_images_targets(images.long(), 0)
    with pytest.raises(ValueError, match="one entry per image: 3 images"):
        check_images_targets(images, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer class indices"):
        check_images_targets(images, torch.tensor([0.0, 1.0, 2.0]))


def test_batched_splits_and_concatenates():
    calls = []

    def fn(x):
        calls.append(len(x))
        return x * 2

    inputs = torch.arange(10.0)
    assert torch.equal(batched(fn, inputs, 4), inputs * 2)
    assert calls == [4, 4, 2]
    calls.clear()
    assert torch.equal(batched(fn, inputs, 10), inputs * 2)
    assert calls == [10]


class _Mean(Explainer):
    """Minimal explainer: channel mean, optionally of the wrong shape, recording what explain() saw."""

    def __init__(self, model, wrong_shape=False, **kwargs):
        super().__init__(model, **kwargs)
        self.wrong_shape = wrong_shape
        self.seen = {}

    def explain(self, images, targets):
        self.seen = {
            "grad": torch.is_grad_enabled(),
            "inference": torch.is_inference_mode_enabled(),
            "training": self.model.training,
            "inference_tensor": images.is_inference(),
        }
        return images.mean(1)[..., :1] if self.wrong_shape else images.mean(1)


def test_explainer_base_call():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).train()
    explainer = _Mean(model)
    with torch.inference_mode():
        images = torch.rand(2, 3, 2, 2)
        maps = explainer(images, 0)
    assert explainer.seen == {"grad": True, "inference": False, "training": False, "inference_tensor": False}
    assert model.training
    torch.testing.assert_close(maps, images.mean(1))
    assert explainer.name == "_mean"
    assert "batch_size=64" in repr(explainer)
    with pytest.raises(RuntimeError, match=r"_Mean.explain returned shape \(2, 2, 1\), expected \(2, 2, 4\)"):
        _Mean(model, wrong_shape=True)(torch.rand(2, 3, 2, 4), 0)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        _Mean(lambda x: x)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        _Mean(model, batch_size=0)


@pytest.mark.parametrize("batch_size", [True, False, 2.0, "8"])
def test_batch_size_must_be_an_int_not_a_bool(batch_size):
    # True is an int to Python, never a batch size to a user (explain.validation refuses it everywhere)
    with pytest.raises(ValueError, match=r"batch_size must be a positive int, got "):
        _Mean(nn.Linear(2, 2), batch_size=batch_size)
    for cls in (Saliency, Sobol):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            cls(nn.Linear(2, 2), batch_size=batch_size)


def test_explainer_generator_and_forward():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    explainer = _Mean(model, seed=5, batch_size=2)
    a = torch.rand(3, generator=explainer.generator(torch.device("cpu")))
    b = torch.rand(3, generator=explainer.generator(torch.device("cpu")))
    assert torch.equal(a, b)
    assert _Mean(model, seed=None).generator(torch.device("cpu")) is None
    inputs = torch.rand(5, 1, 2, 2)
    logits = explainer.forward(inputs)
    assert not logits.requires_grad
    torch.testing.assert_close(logits, model(inputs))


# ---------------------------------------------------------------- contract of every attribution explainer


def contract_model() -> nn.Module:
    """A CNN with BatchNorm and Dropout, left in TRAIN mode: explainers must use eval mode and restore it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    )
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    model.train()
    model[1].eval()  # mixed flags
    return model


EXPLAINERS = {
    "saliency": lambda m: Saliency(m, batch_size=3),
    "gradient_input": lambda m: GradientInput(m, batch_size=3),
    "smoothgrad": lambda m: SmoothGrad(m, nb_samples=5, batch_size=4, seed=0),
    "sobol": lambda m: Sobol(m, grid_size=4, nb_design=8, batch_size=50, seed=0),
    "sobol_blur": lambda m: Sobol(m, grid_size=2, nb_design=8, perturbation="blur", estimator="janon"),
    "captum_saliency": lambda m: from_captum(CaptumSaliency)(m, batch_size=2),
    "eva": lambda m: EVA(m, eps=0.05, grid_size=4, batch_size=2),
    "eva_per_box": lambda m: EVA(m, eps=0.05, grid_size=4, bound="ibp", relaxation="per_box", batch_size=7),
}


@pytest.fixture
def batch():
    torch.manual_seed(3)
    return torch.rand(3, 3, 8, 8), torch.tensor([0, 2, 1])


def _reference(name, batch):
    model = contract_model()
    return EXPLAINERS[name](model)(*batch)


@pytest.mark.parametrize("name", list(EXPLAINERS))
def test_contract_model_state_and_grads(name, batch):
    model = contract_model()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    maps = EXPLAINERS[name](model)(*batch)
    assert maps.shape == (3, 8, 8) and maps.dtype == torch.float32 and not maps.requires_grad
    assert torch.isfinite(maps).all() and maps.abs().sum() > 0
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")
    for key, value in model.state_dict().items():  # BatchNorm statistics not updated
        assert torch.equal(value, state[key]), key
    # eval mode inside: Dropout off, so a second call gives the same maps
    torch.testing.assert_close(EXPLAINERS[name](model)(*batch), maps, rtol=0, atol=0)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("name", list(EXPLAINERS))
def test_contract_under_no_grad_and_inference_mode(name, context, batch):
    expected = _reference(name, batch)
    model = contract_model()
    with context():
        images = batch[0].clone()  # an inference tensor under inference_mode
        maps = EXPLAINERS[name](model)(images, batch[1])
    torch.testing.assert_close(maps, expected)
    maps.add_(1)  # usable as a normal tensor afterwards


@pytest.mark.parametrize("name", list(EXPLAINERS))
def test_contract_batch_equals_one_image_at_a_time(name, batch):
    images, targets = batch
    model = contract_model()
    explainer = EXPLAINERS[name](model)
    single = torch.cat([explainer(images[i : i + 1], targets[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(explainer(images, targets), single, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", list(EXPLAINERS))
def test_contract_bad_inputs(name, batch):
    images, targets = batch
    explainer = EXPLAINERS[name](contract_model())
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        explainer(images[0], targets[0])
    with pytest.raises(ValueError, match="one entry per image"):
        explainer(images, targets[:2])
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        explainer(images, torch.tensor([0, 3, 1]))
    with pytest.raises(TypeError, match="integer class indices"):
        explainer(images, targets.float())


@pytest.mark.parametrize("name", ["smoothgrad", "sobol"])
def test_contract_seeded(name, batch):
    model = contract_model()
    explainer = EXPLAINERS[name](model)
    first = explainer(*batch)
    torch.testing.assert_close(explainer(*batch), first, rtol=0, atol=0)
    explainer.seed = 1
    assert not torch.allclose(explainer(*batch), first)
