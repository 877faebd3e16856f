"""The project's NMF against scikit-learn's (the reference CRAFT factorizer) on the same activation matrix.

Matrix: spatially averaged ReLU activations (512 channels) of a random CNN on 4000 structured 32x32 crops
(stripes, blobs, colours), float32, rank 10. scikit-learn: ``NMF(solver="cd", init="nndsvda", max_iter=200)``.
Measured: scikit-learn's fit time and final reconstruction error ``e``; the number of iterations our
:func:`explain.concepts.nmf.nmf` needs to reach ``||X - U W||_F <= e`` (checked on the product, not on the
tracked error), then the time of a fit of exactly that many iterations (init included). Warm-up, then the median
of ``--repeats`` runs of each side. Target: ratio (ours / scikit-learn) <= 1.0.

    python benchmarks/bench_nmf.py [--rows 4000] [--rank 10] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from sklearn.decomposition import NMF as SklearnNMF
from sklearn.exceptions import ConvergenceWarning

from explain.concepts.nmf import NMF, nmf, reconstruction_error


def activations(rows: int, channels: int = 512, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 128, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(128, channels, 3, padding=1), torch.nn.ReLU(),
    )
    for parameter in net.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator) / parameter[0].numel() ** 0.5
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    angle = torch.rand(rows, 1, 1, 1, generator=generator) * torch.pi
    frequency = torch.rand(rows, 1, 1, 1, generator=generator)
    stripes = (torch.sin(frequency * (xs * angle.cos() + ys * angle.sin())) > 0).float()
    centre = torch.rand(rows, 2, 1, 1, generator=generator) * 32
    blob = torch.exp(-((xs - centre[:, :1]) ** 2 + (ys - centre[:, 1:]) ** 2) / 40)
    colour = torch.rand(rows, 3, 1, 1, generator=generator)
    images = colour * stripes + (1 - colour) * blob
    with torch.no_grad():
        return torch.cat([net(chunk).mean(dim=(2, 3)) for chunk in images.split(500)])


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="threads for both sides (default: library defaults)")
    args = parser.parse_args()
    warnings.simplefilter("ignore", ConvergenceWarning)

    limits = None
    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        limits = threadpool_limits(args.threads)
    x = activations(args.rows)
    x_numpy = x.numpy()
    print(f"matrix {tuple(x.shape)} float32, rank {args.rank}, torch threads {torch.get_num_threads()}")

    def sklearn_fit():
        model = SklearnNMF(args.rank, solver="cd", init="nndsvda", max_iter=200, random_state=0)
        model.fit_transform(x_numpy)
        return model

    reference = sklearn_fit()
    target = float(reference.reconstruction_err_)
    sklearn_time = median_time(sklearn_fit, args.repeats)

    # iterations our solver needs to reach scikit-learn's final error (on the product U W itself)
    tracked = []
    nmf(x, args.rank, max_iter=1000, tol=0, callback=lambda _, error: tracked.append(error) or error <= target)
    iterations = len(tracked)
    while True:
        u, w = nmf(x, args.rank, max_iter=iterations, tol=0)
        reached = float(reconstruction_error(x, u, w))
        if reached <= target or iterations >= 1000:
            break
        iterations += 1
    ours_time = median_time(lambda: nmf(x, args.rank, max_iter=iterations, tol=0), args.repeats)

    default = NMF(args.rank)
    default_time = median_time(lambda: default.fit(x), args.repeats)
    default_error = float(reconstruction_error(x, default.fit_transform(x), default.W))

    print(f"scikit-learn NMF(cd, nndsvda, max_iter=200): {sklearn_time * 1e3:8.1f} ms, "
          f"{reference.n_iter_} iterations, error {target:.5f}")
    print(f"ours, to reach that error:                   {ours_time * 1e3:8.1f} ms, "
          f"{iterations} iterations, error {reached:.5f}")
    print(f"ours, default stopping (tol=1e-4):           {default_time * 1e3:8.1f} ms, "
          f"{default.n_iter} iterations, error {default_error:.5f} ({default_error / target:.4f} x scikit-learn)")
    print(f"ratio (time to reach scikit-learn's error, ours / scikit-learn): {ours_time / sklearn_time:.3f}")
    if limits is not None:
        limits.restore_original_limits()


if __name__ == "__main__":
    main()
