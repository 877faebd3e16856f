"""NMF and NNLS in torch, checked against scikit-learn, scipy and planted factorizations."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.optimize import nnls as scipy_nnls
from sklearn.decomposition import NMF as SklearnNMF

from explain.concepts.nmf import NMF, nmf, nndsvd_init, reconstruction_error, top_singular_triplets
from explain.concepts.nnls import nnls


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems (conftest.py)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between the rows of a [k, m] and b [k, m] (matrix [k, k])."""
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    return a @ b.T


def _planted(n=300, c=40, rank=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # sparse nonnegative factors: each crop uses a few concepts, each concept a few channels (identifiable)
    u = torch.rand(n, rank, generator=generator, dtype=torch.float64) * (
        torch.rand(n, rank, generator=generator) < 0.4
    )
    w = torch.rand(rank, c, generator=generator, dtype=torch.float64) * (
        torch.rand(rank, c, generator=generator) < 0.3
    )
    return u, w


def real_activations(n=400, channels=96, seed=0):
    """Spatially averaged ReLU activations of a random CNN on structured images (stripes, blobs, colours)."""
    generator = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, channels, 3, stride=2, padding=1), torch.nn.ReLU(),
    )
    for p in net.parameters():
        p.data = torch.randn(p.shape, generator=generator) * 0.3
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    freq = torch.rand(n, 1, 1, 1, generator=generator) * 2
    angle = torch.rand(n, 1, 1, 1, generator=generator) * 3.1416
    stripes = torch.sin(freq * (xs * angle.cos() + ys * angle.sin()))
    centre = torch.rand(n, 2, 1, 1, generator=generator) * 16
    blob = torch.exp(-((xs - centre[:, :1]) ** 2 + (ys - centre[:, 1:]) ** 2) / 10)
    colour = torch.rand(n, 3, 1, 1, generator=generator)
    images = colour * (stripes > 0) + (1 - colour) * blob
    with torch.no_grad():
        return net(images).mean(dim=(2, 3))


def test_planted_factorization_is_recovered():
    u_true, w_true = _planted()
    x = u_true @ w_true
    u, w = nmf(x, 5, max_iter=3000, tol=1e-12)
    assert reconstruction_error(x, u, w) / x.norm() < 1e-3
    # match components by cosine of the concept vectors (permutation), compare up to scale
    similarity = _cosine(w_true, w)
    rows, cols = linear_sum_assignment(-similarity.numpy())
    assert similarity[rows, cols].min() > 0.99
    assert _cosine(u_true.T[rows], u.T[cols]).diagonal().min() > 0.99


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_reconstruction_error_within_5_percent_of_sklearn_on_real_activations():
    x = real_activations()
    reference = SklearnNMF(10, solver="cd", init="nndsvda", max_iter=200)
    reference.fit(x.numpy())
    factorizer = NMF(10).fit(x)  # defaults: nndsvda, at most 200 iterations
    ours = float(reconstruction_error(x, factorizer.fit_transform(x), factorizer.W))
    assert ours <= 1.05 * reference.reconstruction_err_
    assert factorizer.error == pytest.approx(ours, rel=1e-3)  # the error tracked without forming U W


def test_nndsvda_init_matches_sklearn():
    from sklearn.decomposition._nmf import _initialize_nmf

    x = real_activations(n=200, channels=48).double()
    u_ref, w_ref = _initialize_nmf(x.numpy(), 6, init="nndsvda")
    u, w = nndsvd_init(x, 6, fill="mean")
    # both use a randomized SVD; scikit-learn's default power iterations leave ~1e-4 errors on the trailing
    # singular vectors (ours match the exact SVD to 1e-6, see below), hence the absolute tolerance
    np.testing.assert_allclose(u.numpy(), u_ref, rtol=0, atol=1e-3 * u_ref.max())
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=0, atol=1e-3 * w_ref.max())
    assert ((u == x.mean()) == torch.from_numpy(u_ref == x.mean().item())).float().mean() > 0.99


def test_top_singular_triplets_match_full_svd():
    x = real_activations(n=200, channels=48).double()
    left, s, right = top_singular_triplets(x, 5)
    u_ref, s_ref, vh_ref = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(s, s_ref[:5], rtol=1e-6, atol=0)
    ones = torch.ones(5, dtype=torch.float64)
    torch.testing.assert_close(_cosine(right.T, vh_ref[:5]).diagonal().abs(), ones, rtol=0, atol=1e-6)
    torch.testing.assert_close(_cosine(left.T, u_ref.T[:5]).diagonal().abs(), ones, rtol=0, atol=1e-6)


def test_error_never_increases_and_fit_is_deterministic():
    x = real_activations(n=200, channels=48)
    errors = []
    u1, w1 = nmf(x, 6, max_iter=50, tol=0, callback=lambda _, error: errors.append(error))
    assert len(errors) == 50
    assert all(b <= a * (1 + 1e-5) for a, b in zip(errors, errors[1:]))
    u2, w2 = nmf(x, 6, max_iter=50, tol=0)
    assert torch.equal(u1, u2) and torch.equal(w1, w2)
    # random init: same seed, same factors; another seed, other factors
    ua, _ = nmf(x, 6, init="random", seed=3, max_iter=5)
    ub, _ = nmf(x, 6, init="random", seed=3, max_iter=5)
    uc, _ = nmf(x, 6, init="random", seed=4, max_iter=5)
    assert torch.equal(ua, ub) and not torch.equal(ua, uc)


def test_callback_can_stop_the_fit():
    x = real_activations(n=100, channels=32)
    calls = []
    nmf(x, 4, max_iter=100, tol=0, callback=lambda i, _: calls.append(i) or i == 4)
    assert calls == [0, 1, 2, 3, 4]


def test_nnls_matches_scipy():
    generator = torch.Generator().manual_seed(1)
    w = torch.rand(6, 20, generator=generator, dtype=torch.float64)
    a = torch.randn(40, 20, generator=generator, dtype=torch.float64)  # signed rows: many inactive concepts
    a[:20] = a[:20].abs()
    u = nnls(a, w)
    expected = np.stack([scipy_nnls(w.numpy().T, row)[0] for row in a.numpy()])
    np.testing.assert_allclose(u.numpy(), expected, atol=1e-10)
    assert (u == 0).any() and (u > 0).any()


def test_transform_is_nnls_with_the_fitted_components():
    x = real_activations(n=200, channels=48)
    factorizer = NMF(5).fit(x)
    new = real_activations(n=30, channels=48, seed=1)
    u = factorizer.transform(new)
    expected = np.stack([scipy_nnls(factorizer.W.double().numpy().T, row)[0] for row in new.double().numpy()])
    np.testing.assert_allclose(u.numpy(), expected, rtol=1e-3, atol=1e-5 * expected.max())


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="nonnegative"):
        nmf(torch.randn(20, 8), 3)
    with pytest.raises(ValueError, match="rank"):
        nmf(torch.rand(20, 8), 9)
    with pytest.raises(ValueError, match=r"\[n, c\]"):
        nmf(torch.rand(2, 20, 8), 3)
    with pytest.raises(RuntimeError, match="before fit"):
        NMF(3).transform(torch.rand(5, 8))
    with pytest.raises(ValueError, match="init"):
        nmf(torch.rand(20, 8), 3, init="svd")


def test_nmf_function_is_the_class_fitted_once_and_refuses_unknown_options():
    x = torch.rand(30, 4) @ torch.rand(4, 12)
    u, w = nmf(x, 4, max_iter=30, tol=0, seed=2, init="random")
    factorizer = NMF(4, max_iter=30, tol=0, seed=2, init="random")
    assert torch.equal(u, factorizer.fit_transform(x)) and torch.equal(w, factorizer.W)
    assert factorizer.n_iter == 30
    # the tracked error comes from ||X||^2 - 2 <U^T X, W> + <U^T U, W W^T> on float32 products: a small error is
    # known to a few percent only (cancellation), against the direct float32 norm of X - U W
    assert factorizer.error == pytest.approx(float(reconstruction_error(x, u, w)), rel=0.1)
    with pytest.raises(TypeError, match="max_iters"):
        nmf(x, 4, max_iters=10)
    with pytest.raises(ValueError, match="warmup"):
        nmf(x, 4, warmup=-1)
