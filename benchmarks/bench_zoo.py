"""The 1-Lipschitz zoo, deel-torchlip vs orthogonium convolutions: gradient norm at initialisation, the Lipschitz
property checked three ways, and the training step time, for each network in one process.

* ``grad norm``: mean over random inputs of ``||d logit_y / dx||`` at init (y random); a gradient-norm-preserving
  network keeps it near 1, DESIGN 9 asks >= 0.5.
* Lipschitz checks of every logit (each must be <= 1): ``max grad`` (largest per-image input-gradient norm of any
  logit), ``pairs`` (largest ``|f_i(x) - f_i(x')| / ||x - x'||`` over random and nearby pairs) and ``certificate``
  (the layer-wise bound of :func:`align.certification.lipschitz_upper_bound` on the exported plain network).
* ``ms/step``: one training step (forward, cross-entropy, backward, Adam) on a batch, median of ``--repeats``,
  variants alternating so that the load of the machine hits them alike; ``ratio`` = step time / the AOC variant's.

    python benchmarks/bench_zoo.py                               # CPU: 32 px, and 224 px on small batches
    python benchmarks/bench_zoo.py --device cuda --batch 64 --batch-224 64 --repeats 20   # a GPU, real sizes
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from align.certification import lipschitz_upper_bound
from align.models import export_plain, lip_resnet, lip_vgg

CLICKME_RESNET = dict(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), stem_downsample=2)


def variants() -> dict[str, tuple[Callable[[], nn.Module], int, int]]:
    """name -> (factory, image size, number of classes)."""
    table: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
        "lip_vgg, main before (torchlip, 1x1, no stem)": (
            lambda: lip_vgg(4, conv="spectral", kernel_size=1, stem_downsample=0), 32, 4),
    }
    for conv in ("spectral", "aoc", "soc"):
        widths = (16, 32, 64) if conv == "soc" else (16, 32, 64, 128)  # SOC's 7x7 kernel cannot wrap a 2x2 map
        table[f"lip_vgg {conv}"] = (lambda conv=conv, widths=widths: lip_vgg(4, conv=conv, widths=widths), 32, 4)
    table["lip_resnet, main before (torchlip, l2 pool, no stem)"] = (
        lambda: lip_resnet(4, conv="spectral", pooling="l2", stem_downsample=0, residual_init=0.5), 32, 4)
    for conv in ("spectral", "aoc", "soc"):
        table[f"lip_resnet {conv}"] = (lambda conv=conv: lip_resnet(4, conv=conv), 32, 4)
    table["lip_resnet aoc, zero padding"] = (lambda: lip_resnet(4, padding_mode="zeros"), 32, 4)
    table["lip_resnet aoc, residual_init 0.5"] = (lambda: lip_resnet(4, residual_init=0.5), 32, 4)
    table["ClickMe lip_resnet, main before (torchlip)"] = (
        lambda: lip_resnet(1000, conv="spectral", residual_init=0.5, **CLICKME_RESNET), 224, 1000)
    for conv in ("spectral", "aoc"):
        table[f"ClickMe lip_resnet {conv}"] = (lambda conv=conv: lip_resnet(1000, conv=conv, **CLICKME_RESNET), 224, 1000)
    table["orthogonium LipResNet (its factory)"] = (_orthogonium_lipresnet, 224, 1000)
    return table


def _orthogonium_lipresnet() -> nn.Module:
    from orthogonium.model_factory.models_factory import LipResNet

    return LipResNet(img_shape=(3, 224, 224), n_classes=1000)


def _family(name: str) -> str:
    """The network a variant belongs to, whose AOC variant is the time reference."""
    if name.startswith(("ClickMe", "orthogonium")):
        return "ClickMe lip_resnet"
    return name.split()[0].rstrip(",")


def logit_gradient_norms(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``||d f_y(x) / dx||`` per image [B]."""
    images = images.clone().requires_grad_(True)
    logits = model(images)
    (gradient,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), images)
    return gradient.flatten(1).norm(dim=1)


def lipschitz_checks(model: nn.Module, size: int, classes: int, count: int, device: torch.device) -> dict[str, str]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(count, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, classes, (count,), generator=generator).to(device)
    model.eval()
    result = {"grad norm": f"{logit_gradient_norms(model, images, labels).mean().item():.3f}"}
    checked = min(classes, 4)  # the largest gradient norm over a few logits per image
    worst = max(
        logit_gradient_norms(model, images, torch.full_like(labels, k)).max().item() for k in range(checked)
    )
    result["max grad"] = f"{worst:.4f}"
    with torch.no_grad():
        far = torch.rand(count, 3, size, size, generator=generator).to(device)
        near = images + 1e-2 * torch.randn(images.shape, generator=generator).to(device)
        ratios = [
            ((model(images) - model(other)).abs().amax(1) / (images - other).flatten(1).norm(dim=1)).max().item()
            for other in (far, near)
        ]
    result["pairs"] = f"{max(ratios):.4f}"
    try:
        certificate = lipschitz_upper_bound(export_plain(model), images[:1])[1]
        result["certificate"] = f"{certificate:.4f}"
    except ValueError as error:
        result["certificate"] = f"n/a ({str(error)[:40]})"
    return result


def step_time(model: nn.Module, optimizer, images, labels) -> float:
    if images.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if images.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32, help="batch of the 32 px step timings")
    parser.add_argument("--batch-224", type=int, default=4, help="batch of the 224 px step timings")
    parser.add_argument("--count", type=int, default=16, help="random inputs for the gradient and pair checks")
    parser.add_argument("--count-224", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="run the variants whose name contains this text")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224], help="image sizes to run")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows, models, timings = {}, {}, {}
    for name, (factory, size, classes) in variants().items():
        if args.only not in name or size not in args.sizes:
            continue
        try:
            model = factory().to(device)
            count = args.count if size == 32 else args.count_224
            rows[name] = {"size": str(size), **lipschitz_checks(model, size, classes, count, device)}
            batch = args.batch if size == 32 else args.batch_224
            images = torch.rand(batch, 3, size, size, device=device)
            labels = torch.randint(0, classes, (batch,), device=device)
            model.train()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            step_time(model, optimizer, images, labels)  # warm-up
            models[name] = (model, optimizer, images, labels)
            timings[name] = []
        except (RuntimeError, ValueError) as error:
            rows[name] = {"size": str(size), "grad norm": f"fails: {str(error).splitlines()[0][:60]}"}
    for _ in range(args.repeats):  # alternate the variants
        for name, (model, optimizer, images, labels) in models.items():
            timings[name].append(step_time(model, optimizer, images, labels))
    columns = ["size", "grad norm", "max grad", "pairs", "certificate", "ms/step", "ratio"]
    print(f"device {device}, batch {args.batch} (32 px) / {args.batch_224} (224 px), median of {args.repeats}")
    print("| network | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        if name in timings:
            ms = statistics.median(timings[name]) * 1e3
            row["ms/step"] = f"{ms:.1f}"
            base = timings.get(f"{_family(name)} aoc")
            row["ratio"] = f"{ms / (statistics.median(base) * 1e3):.2f}" if base else "–"
        print(f"| {name} | " + " | ".join(row.get(column, "–") for column in columns) + " |")


if __name__ == "__main__":
    main()
