"""CRAFT: implicit differentiation, importance, recursion, model split, and the Craft class end to end."""

from collections import OrderedDict

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from deel.torchlip import GroupSort2  # noqa: E402
from torch import nn  # noqa: E402

from explain import Craft  # noqa: E402
from explain.concepts import concept_importance, implicit_concept_maps, nnls_jacobian, split_model  # noqa: E402
from explain.concepts.crops import default_patch_size, default_stride, extract_crops  # noqa: E402
from explain.concepts.nnls import nnls  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems (conftest.py)


# ---------------------------------------------------------------------------------------------- helpers
def projected_gradient_nnls(a: torch.Tensor, w: torch.Tensor, steps: int) -> torch.Tensor:
    """Differentiable NNLS by unrolled projected gradient: ``u <- relu(u - (u G - a W^T) / L)``."""
    gram = w @ w.T
    step = 1 / torch.linalg.eigvalsh(gram)[-1]
    u = torch.zeros(a.shape[0], w.shape[0], dtype=a.dtype)
    for _ in range(steps):
        u = torch.relu(u - step * (u @ gram - a @ w.T))
    return u


def _steps_for(w: torch.Tensor) -> int:
    """Iterations for projected gradient to converge to ~1e-14: the rate is 1 - 1 / cond(W W^T)."""
    eigenvalues = torch.linalg.eigvalsh(w @ w.T)
    return int(35 * eigenvalues[-1] / eigenvalues[0]) + 100


def _dictionary(rank=4, channels=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.eye(rank, channels, dtype=torch.float64) + 0.5 * torch.rand(rank, channels, generator=generator,
                                                                               dtype=torch.float64)


def tiny_cnn(classes=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                               nn.ReLU()),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        head=nn.Linear(16, classes),
    ))


def structured_images(n=6, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    angle = torch.rand(n, 1, 1, 1, generator=generator) * torch.pi
    stripes = (torch.sin(0.7 * (xs * angle.cos() + ys * angle.sin())) > 0).float()
    centre = torch.rand(n, 2, 1, 1, generator=generator) * size
    blob = torch.exp(-((xs - centre[:, :1]) ** 2 + (ys - centre[:, 1:]) ** 2) / 30)
    colour = torch.rand(n, 3, 1, 1, generator=generator)
    return colour * stripes + (1 - colour) * blob


# ---------------------------------------------------------------------------------------------- implicit diff
def test_nnls_jacobian_equals_autograd_through_unrolled_solver_and_finite_differences():
    w = _dictionary()
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(6, 8, generator=generator, dtype=torch.float64) + 0.3  # signed: some concepts inactive
    u = nnls(a, w)
    unrolled = projected_gradient_nnls(a, w, _steps_for(w))
    torch.testing.assert_close(unrolled, u, rtol=0, atol=1e-10)
    assert (u == 0).any() and (u > 0).any()  # both active and inactive coordinates are checked
    jacobian = nnls_jacobian(u, w)  # [n, r, c]
    # autograd through the unrolled solver: rows are independent, so d(sum_rows u[:, k]) / da = J[:, k, :]
    leaf = a.clone().requires_grad_(True)
    unrolled = projected_gradient_nnls(leaf, w, _steps_for(w))
    autograd = torch.stack(
        [torch.autograd.grad(unrolled[:, k].sum(), leaf, retain_graph=True)[0] for k in range(w.shape[0])], dim=1
    )
    torch.testing.assert_close(jacobian, autograd, rtol=0, atol=1e-8)
    # central finite differences of the exact solver
    eps = 1e-6
    for c in range(a.shape[1]):
        delta = torch.zeros_like(a)
        delta[:, c] = eps
        column = (nnls(a + delta, w) - nnls(a - delta, w)) / (2 * eps)
        torch.testing.assert_close(jacobian[:, :, c], column, rtol=0, atol=1e-6)


def test_implicit_maps_equal_grad_cam_through_unrolled_solver():
    w = _dictionary(rank=3, channels=6, seed=2)
    generator = torch.Generator().manual_seed(3)
    activations = torch.rand(3, 6, 4, 5, generator=generator, dtype=torch.float64)
    activations[0, 1:] *= 0.1  # image 0 dominated by channel 0 -> not every concept is present
    maps = implicit_concept_maps(activations, w)
    assert maps.shape == (3, 3, 4, 5)
    steps = _steps_for(w)
    leaf = activations.clone().requires_grad_(True)
    u = projected_gradient_nnls(leaf.mean(dim=(2, 3)), w, steps)
    assert (u == 0).any()  # an absent concept: its map must be zero
    for image in range(3):
        for concept in range(3):
            (gradient,) = torch.autograd.grad(u[image, concept], leaf, retain_graph=True)
            weights = gradient[image].mean(dim=(1, 2))  # mean_spatial(du_k / dA_c)
            expected = torch.relu((activations[image] * weights[:, None, None]).sum(0))
            torch.testing.assert_close(maps[image, concept], expected, rtol=1e-7, atol=1e-12)


def test_location_contributions_sum_to_the_coefficient():
    w = _dictionary(rank=3, channels=6, seed=4)
    activations = torch.rand(2, 6, 3, 3, dtype=torch.float64)
    u = nnls(activations.mean(dim=(2, 3)), w)
    contributions = nnls_jacobian(u, w) @ activations.flatten(2) / 9  # before the ReLU
    torch.testing.assert_close(contributions.sum(-1), u)


# ---------------------------------------------------------------------------------------------- importance
def _total_indices_closed_form(c: list[float], d: float) -> torch.Tensor:
    """Total Sobol indices of ``f = sum_k c_k m_k + d m_0 m_1``, ``m ~ U[0, 1]^r`` independent."""
    r = len(c)
    mean = sum(ck / 2 for ck in c) + d / 4
    second_moment = (
        sum(ck**2 / 3 for ck in c)
        + sum(c[i] * c[j] / 2 for i in range(r) for j in range(i + 1, r))
        + d**2 / 9 + (c[0] + c[1]) * d / 3 + sum(c[k] * d / 4 for k in range(2, r))
    )
    variance = second_moment - mean**2
    # E[Var(f | m_~k)] = E[(df/dm_k)^2] / 12 for f affine in m_k
    expected = [ck**2 / 12 for ck in c]
    expected[0] = (c[0] ** 2 + c[0] * d + d**2 / 3) / 12
    expected[1] = (c[1] ** 2 + c[1] * d + d**2 / 3) / 12
    return torch.tensor(expected, dtype=torch.float64) / variance


def test_importance_matches_closed_form_on_a_planted_head():
    w = _dictionary(rank=4, channels=12, seed=5)
    u = torch.tensor([[1.0, 2.0, 0.5, 1.0]], dtype=torch.float64)
    c, d = [2.0, 1.0, 0.5, 0.25], 1.5
    slopes = torch.tensor(c, dtype=torch.float64) / u[0]
    recover = torch.linalg.pinv(w)  # latent (U * M) W -> coefficients U * M
    calls = []

    def latent_to_logit(latent):
        calls.append(latent.shape[0])
        coefficients = latent @ recover
        f = coefficients @ slopes + d * coefficients[:, 0] * coefficients[:, 1] / (u[0, 0] * u[0, 1])
        return torch.stack([-f, f], dim=1)

    expected = _total_indices_closed_form(c, d)  # [0.697, 0.292, 0.023, 0.006]
    estimate = concept_importance(u, w, latent_to_logit, class_id=1, nb_design=1024, batch_size=1000)[0]
    # QMC error decreases as ~1/N here; the largest error over seeds 0..19 is 0.006 at N = 1024 (0.023 at 256)
    torch.testing.assert_close(estimate, expected, rtol=0, atol=0.015)
    assert sum(calls) == 1024 * (4 + 1)  # N (r + 1) passes: the B rows of the design are never evaluated
    # at the default nb_design = 32 the values are rough, the ranking is right
    for seed in range(3):
        rough = concept_importance(u, w, latent_to_logit, class_id=1, seed=seed)[0]
        assert rough.argsort(descending=True).tolist() == [0, 1, 2, 3]


def test_craft_importance_on_a_linear_head_matches_closed_form():
    model = tiny_cnn()
    craft = Craft(*split_model(model), n_concepts=4, batch_size=256).fit(structured_images())
    images = structured_images(n=2, seed=1)
    per_image = craft.importance(images, class_id=2, nb_design=512, per_image=True)
    # the head after the latent is linear: logit = sum_k m_k a_k + const with a_k = mean_hw(U_k) (W h_2)_k, so
    # the total indices are a_k^2 / sum_j a_j^2
    u = craft.transform(images).double()
    direction = craft.W.double() @ model.head.weight[2].detach().double()
    a = u.mean(dim=(1, 2)) * direction
    expected = a.square() / a.square().sum(dim=1, keepdim=True)
    torch.testing.assert_close(per_image.double(), expected, rtol=0, atol=0.03)
    torch.testing.assert_close(craft.importances, per_image.mean(0))


# ---------------------------------------------------------------------------------------------- recursion
def _conv1x1(weight: torch.Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], 1, bias=False)
    conv.weight.data = weight[:, :, None, None].clone()
    return conv


def test_sub_concepts_reconstruct_the_parent_concept():
    # planted hierarchy: three "parts" (one colour channel each) seen by an earlier layer on disjoint channels;
    # the deep layer sees "object A" = parts 0 + 1 and "object B" = part 2, each on its own channels
    generator = torch.Generator().manual_seed(0)
    present = torch.rand(24, 3, 4, 4, generator=generator) < 0.4
    cells = (0.5 + 0.5 * torch.rand(24, 3, 4, 4, generator=generator)) * present
    images = cells.repeat_interleave(8, 2).repeat_interleave(8, 3)  # sparse piecewise-constant colours
    parts = torch.zeros(6, 3)
    for j in range(3):
        parts[2 * j, j], parts[2 * j + 1, j] = 1.0, 0.5
    objects = torch.tensor([[1, 1, 0.5, 0.5, 0, 0], [0.5, 0.5, 0.25, 0.25, 0, 0], [0, 0, 0, 0, 1, 1],
                            [0, 0, 0, 0, 0.7, 0.7]])
    earlier = nn.Sequential(_conv1x1(parts), nn.ReLU())
    deep = nn.Sequential(earlier, _conv1x1(objects), nn.ReLU())

    parent = Craft(deep, n_concepts=2, patch_size=8).fit(images)
    object_a = int(parent.W[:, 0].argmax())
    child = parent.decompose(object_a, earlier, n_concepts=3, top_fraction=0.5)

    assert child.parent is parent and child.parent_concept == object_a
    assert child.crops.shape[0] == len(child.parent_crops) == 300  # top half of the 24 x 25 crops
    assert torch.equal(child.crops, parent.crops[child.parent_crops])
    # Everything is linear and both planted factorizations are exact, so object A's coefficient is exactly a
    # nonnegative combination of the sub-concepts of parts 0 and 1; what is left is the NMF residual
    # (relative ~1e-3 at each level). Bound: 1e-2.
    assert child.parent_error < 1e-2
    part_2 = int(child.W[:, 4].argmax())
    assert child.parent_weights.min() >= 0
    assert child.parent_weights[part_2] < 0.01 * child.parent_weights.max()
    # the combination reconstructs the parent concept's activations u_A W_A just as well
    parent_u = parent.crops_u[child.parent_crops, object_a]
    rebuilt = (child.crops_u @ child.parent_weights)[:, None] * parent.W[object_a]
    target = parent_u[:, None] * parent.W[object_a]
    assert float((rebuilt - target).norm() / target.norm()) < 1e-2


def test_decompose_on_a_cnn_and_its_errors():
    model = tiny_cnn()
    craft = Craft(*split_model(model), n_concepts=3).fit(structured_images())
    earlier = model.features[:2]
    child = craft.decompose(0, earlier, n_concepts=2, top_fraction=0.5)
    assert child.W.shape == (2, 8) and child.parent_weights.shape == (2,)
    assert 0 <= child.parent_error < 1
    with pytest.raises(ValueError, match="too few"):
        craft.decompose(0, earlier, n_concepts=90, top_fraction=0.5)
    with pytest.raises(ValueError, match="concept must be"):
        craft.decompose(7, earlier)


# ---------------------------------------------------------------------------------------------- split
def test_split_sequential_model_is_exact():
    model = tiny_cnn().eval()
    images = structured_images(n=3)
    g, h = split_model(model)
    assert list(dict(g.named_children())) == ["features"]
    latent = g(images)
    assert latent.shape == (3, 16, 16, 16) and latent.min() >= 0
    torch.testing.assert_close(h(latent), model(images), rtol=0, atol=0)


def test_split_torchvision_resnet_is_exact():
    from torchvision.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5).eval()  # a small torchvision ResNet
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        for at in (None, "layer3"):
            g, h = split_model(model, at=at)
            latent = g(images)
            assert latent.ndim == 4 and latent.min() >= 0
            torch.testing.assert_close(h(latent), expected, rtol=1e-5, atol=1e-5)
    assert list(dict(split_model(model)[0].named_children()))[-1] == "layer4"


def test_sign_split_makes_groupsort_networks_usable_and_stays_exact():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), GroupSort2(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                               GroupSort2()),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        head=nn.Linear(8, 3),
    )).eval()
    images = structured_images(n=4)
    with pytest.raises(ValueError, match="sign_split=True"):
        Craft(*split_model(model), n_concepts=3).fit(images)
    g, h = split_model(model, sign_split=True)
    latent = g(images)
    assert latent.shape[1] == 16 and latent.min() >= 0
    torch.testing.assert_close(h(latent), model(images), rtol=0, atol=0)
    craft = Craft(g, h, n_concepts=3).fit(images)
    assert craft.W.shape == (3, 16)


def test_split_errors_name_the_fix():
    model = tiny_cnn()
    with pytest.raises(ValueError, match="children are"):
        split_model(model, at="conv9")
    with pytest.raises(ValueError, match="pass at="):
        split_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(TypeError, match="write the two parts yourself"):
        split_model(nn.Conv2d(3, 4, 3))


# ---------------------------------------------------------------------------------------------- Craft
def test_crop_geometry_follows_the_reference_and_scales():
    assert default_patch_size(224) == 64 and default_stride(64) == 51  # the reference's numbers
    assert default_patch_size((32, 40)) == 9 and default_stride(9) == 7
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    crops = extract_crops(images, 9, 7)
    assert crops.shape == (2 * 16, 3, 9, 9)
    torch.testing.assert_close(crops[1], images[0, :, 0:9, 7:16])  # image-major, row-major grid
    torch.testing.assert_close(crops[16 + 5], images[1, :, 7:16, 7:16])


def test_craft_fit_transform_and_maps():
    model = tiny_cnn()
    images = structured_images()
    craft = Craft(*split_model(model), n_concepts=5).fit(images, class_id=1)
    assert craft.W.shape == (5, 16) and craft.W.min() >= 0
    assert craft.crops.shape == (6 * 16, 3, 9, 9) and craft.crops_u.shape == (96, 5)
    assert craft.crops_image.tolist() == [i for i in range(6) for _ in range(16)]

    u = craft.transform(images)
    assert u.shape == (6, 16, 16, 5) and u.min() >= 0
    latent = model.features(images).detach()
    torch.testing.assert_close(u, nnls(latent.permute(0, 2, 3, 1).reshape(-1, 16), craft.W).reshape(6, 16, 16, 5))

    implicit = craft.concept_maps(images)
    assert implicit.shape == (6, 5, 32, 32) and implicit.min() >= 0
    raw = craft.concept_maps(images, method="activation", percentile=None)
    torch.testing.assert_close(raw, F.interpolate(u.permute(0, 3, 1, 2), size=(32, 32), mode="bilinear"))
    thresholded = craft.concept_maps(images, method="activation", percentile=90)
    # the reference: zero below the 90th percentile of the concept over all images and locations, then resize
    coarse = u.permute(0, 3, 1, 2)
    sigma = torch.from_numpy(np.percentile(coarse.transpose(0, 1).flatten(1).numpy(), 90, axis=1)).float()
    expected = F.interpolate(coarse * (coarse > sigma[None, :, None, None]), size=(32, 32), mode="bilinear")
    torch.testing.assert_close(thresholded, expected)

    importance = craft.importance(images)  # class_id from fit
    assert importance.shape == (5,) and torch.isfinite(importance).all()
    figure = craft.gallery(top_k=4)
    assert len(figure.axes) == 5 * 4
    first_row = figure.axes[0].get_ylabel()
    assert first_row.startswith(f"concept {int(importance.argmax())}\n")
    matplotlib.pyplot.close(figure)


def test_craft_respects_callers_mode_and_inference_mode():
    model = tiny_cnn().train()
    images = structured_images(n=4)
    g, h = split_model(model)
    with torch.inference_mode():
        craft = Craft(g, h, n_concepts=3).fit(images)
        maps = craft.concept_maps(images)
    assert model.training and all(m.training for m in model.modules())
    u = craft.transform(images)  # outside inference mode, with W fitted inside it
    assert u.shape == (4, 16, 16, 3) and maps.shape == (4, 3, 32, 32)
    assert all(p.grad is None for p in model.parameters())


def test_flat_latent_and_errors():
    model = tiny_cnn()
    flat = nn.Sequential(model.features, model.pool, model.flatten)
    craft = Craft(flat, model.head, n_concepts=3)
    with pytest.raises(RuntimeError, match="fit"):
        craft.transform(structured_images(n=2))
    craft.fit(structured_images())
    assert craft.transform(structured_images(n=2)).shape == (2, 3)
    assert craft.importance(structured_images(n=2), class_id=0).shape == (3,)
    with pytest.raises(ValueError, match="spatial activations"):
        craft.concept_maps(structured_images(n=2))
    with pytest.raises(ValueError, match="latent_to_logit"):
        Craft(flat, n_concepts=3).fit(structured_images()).importance(structured_images(n=2), class_id=0)
    with pytest.raises(ValueError, match="class_id"):
        craft.importance(structured_images(n=2))
    with pytest.raises(ValueError, match="too few"):
        Craft(flat, n_concepts=50).fit(structured_images(n=2))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        craft.fit(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="rank"):
        from explain.concepts import NMF

        Craft(flat, n_concepts=3, nmf=NMF(4))


def test_fitted_attributes_exist_from_init_and_the_old_names_are_read_only_aliases():
    g = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    h = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    craft = Craft(g, h, n_concepts=2, patch_size=4, stride=2)
    fitted = ["W_", "crops_", "crops_u_", "crops_image_", "image_size_", "patch_size_", "stride_", "class_id_",
              "factorizer_", "importances_", "parent_", "parent_concept_", "parent_crops_", "parent_weights_",
              "parent_error_"]
    assert all(getattr(craft, name) is None for name in fitted)  # declared in __init__, not on first fit
    assert craft.W is None and craft.crops_u is None and craft.importances is None
    craft.fit(torch.rand(3, 3, 8, 8), class_id=1)
    assert craft.W is craft.W_ and craft.crops_u is craft.crops_u_ and craft.crops is craft.crops_
    assert craft.W_.shape == (2, 4) and craft.crops_u_.shape == (27, 2) and craft.class_id == craft.class_id_ == 1
    assert craft.crops_image_.tolist() == [i for i in range(3) for _ in range(9)]
    craft.importance(torch.rand(2, 3, 8, 8), nb_design=4)
    assert craft.importances is craft.importances_
    with pytest.raises(AttributeError):
        craft.W = torch.zeros(2, 4)  # an alias is read-only: the fitted attribute is W_
