"""The explainers on a GPU: each one on CUDA against the same call on CPU (time, and the largest difference of
the maps), on the default 1-Lipschitz CNN (exported) and torchvision's resnet18 (random weights, 224 px).

Checks that every explainer runs on the model's device and gives the CPU's answer there (up to float
reassociation), and how much faster it is. Without a GPU it says so and does nothing.

    python benchmarks/bench_gpu.py [--images 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.models import resnet18

from align.models import export_plain, lip_vgg
from explain import EVA, Craft, GradientInput, Saliency, SmoothGrad, Sobol, maco
from explain.concepts import NMF, split_model
from explain.featureviz.objectives import logit
from explain.metrics import Deletion


def timed(fn: Callable[[], Tensor], device: torch.device, repeats: int) -> tuple[float, Tensor]:
    out = fn()  # warm-up (cuDNN autotuning, allocator)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


FAILURES: list[str] = []


def compare(
    name: str, make: Callable[[torch.device], Callable[[], Tensor]], repeats: int, same_draws: bool = True
) -> None:
    """Time ``make(device)()`` on CPU and CUDA; print the speed-up and the largest difference of the results
    (``same_draws=False``: the method draws random numbers, which differ between the CPU and CUDA generators)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    try:
        cpu_time, cpu_out = timed(make(cpu), cpu, repeats)
        gpu_time, gpu_out = timed(make(cuda), cuda, repeats)
    except Exception as error:  # report and go on: one broken explainer should not hide the others
        FAILURES.append(f"{name}: {type(error).__name__}: {error}")
        print(f"  {name:<34} FAILED: {type(error).__name__}: {error}")
        return
    if gpu_out.device.type != "cuda":
        FAILURES.append(f"{name}: result on {gpu_out.device}, expected the model's device")
    difference = (gpu_out.cpu().double() - cpu_out.double()).abs().max().item()
    scale = cpu_out.double().abs().max().item()
    note = "" if same_draws else " (random draws differ by device)"
    print(
        f"  {name:<34} cpu {cpu_time * 1e3:9.1f} ms | cuda {gpu_time * 1e3:8.1f} ms | speed-up {cpu_time / gpu_time:6.1f}x"
        f" | max |cuda - cpu| {difference:.2e} (max |cpu| {scale:.2e}){note}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu.py: skipped, no CUDA GPU (torch.cuda.is_available() is False)")
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False  # compare in true float32
    torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, CPU threads {torch.get_num_threads()}")

    torch.manual_seed(0)
    small = export_plain(lip_vgg(num_classes=10)).eval()
    x32 = torch.rand(args.images, 3, 32, 32)
    y32 = torch.randint(0, 10, (args.images,))

    def on(model: nn.Module, device: torch.device) -> nn.Module:
        return model.to(device)

    def bind(explainer_cls, model: nn.Module, images: Tensor, targets: Tensor, **options):
        return lambda device: (
            lambda e=explainer_cls(on(model, device), **options), x=images.to(device), y=targets.to(device): e(x, y)
        )

    print(f"lip_vgg(10) exported, {args.images} images 32x32")
    compare("Saliency", bind(Saliency, small, x32, y32), args.repeats)
    compare("SmoothGrad (50 samples)", bind(SmoothGrad, small, x32, y32), args.repeats, same_draws=False)
    compare("GradientInput", bind(GradientInput, small, x32, y32), args.repeats)
    compare("Sobol (grid 8, N 32)", bind(Sobol, small, x32, y32, batch_size=4096), args.repeats)
    compare("EVA (crown, shared)", bind(EVA, small, x32, y32), args.repeats)
    compare("EVA (ibp, per box)", bind(EVA, small, x32, y32, bound="ibp", relaxation="per_box", batch_size=256),
            args.repeats)

    def deletion(device: torch.device) -> Callable[[], Tensor]:
        model, x, y = on(small, device), x32.to(device), y32.to(device)
        maps = Saliency(model)(x, y)

        def run() -> Tensor:
            metric = Deletion().to(device)
            metric.update(model, x, y, maps)
            return metric.compute()

        return run

    compare("Deletion metric (Saliency maps)", deletion, args.repeats)

    big = resnet18(num_classes=10).eval()
    x224 = torch.rand(args.images, 3, 224, 224)
    y224 = torch.randint(0, 10, (args.images,))
    print(f"resnet18(10), random weights, {args.images} images 224x224")
    compare("Saliency", bind(Saliency, big, x224, y224), args.repeats)
    compare("Sobol (grid 8, N 32), 2 images", bind(Sobol, big, x224[:2], y224[:2], batch_size=512), 1)

    def craft(device: torch.device) -> Callable[[], Tensor]:
        to_latent, to_logit = split_model(on(big, device))
        images = x224.to(device)

        def run() -> Tensor:
            concepts = Craft(to_latent, to_logit, n_concepts=5, batch_size=64).fit(images, class_id=0)
            importance = concepts.importance(images, 0, nb_design=8)
            maps = concepts.concept_maps(images[:2])
            return torch.cat([importance.flatten(), maps.flatten()[:1000]])

        return run

    compare("CRAFT fit + importance + maps", craft, 1)

    def nmf(device: torch.device) -> Callable[[], Tensor]:
        matrix = torch.rand(20000, 512, generator=torch.Generator().manual_seed(0)).square().to(device)
        return lambda: torch.tensor([NMF(10, max_iter=100, tol=0).fit(matrix).error], device=device)

    compare("NMF error (20000 x 512, rank 10, 100 it)", nmf, 1)

    def featureviz(device: torch.device) -> Callable[[], Tensor]:
        model = on(big, device)
        return lambda: maco(logit(model, 3), 224, steps=16, crops_per_step=8, device=device)[0]

    compare("MACO (16 steps, 8 crops, 224 px)", featureviz, 1, same_draws=False)
    if FAILURES:
        raise SystemExit("failed:\n" + "\n".join(FAILURES))


if __name__ == "__main__":
    main()
