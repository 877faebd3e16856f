"""Where the time of a harmonized training step goes: PyTorch profiler, top operators by self time.

The step is ``bench_throughput.py``'s (forward, task + harmonization loss, backward, SGD), built the same way, on
``--device`` (CPU or CUDA), after ``--warmup`` steps; ``--steps`` steps are profiled. Prints the top ``--top``
operators by self time (CUDA kernels' time on a GPU, CPU time otherwise), the plain step's table with ``--plain``
beside it, and the share of a few operator families (convolution, batch norm, matmul, elementwise, pyramid).

    python benchmarks/profile_harmonized.py --backbone resnet18 --device cpu --image-size 64 --batch-size 64
    python benchmarks/profile_harmonized.py --backbone resnet50 --precision bf16-mixed --channels-last     # GPU
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile

from bench_throughput import CONFIGS, build, make_step

FAMILIES = {
    "convolution": ("conv", "cudnn", "mkldnn_convolution", "winograd", "implicit_gemm", "sm90_xmma", "nchw", "nhwc"),
    "batch norm": ("batch_norm", "batchnorm", "bn_"),
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm", "gemm", "cutlass"),
    "pyramid / pooling": ("avg_pool", "max_pool", "pad", "constant_pad"),
}


def family(name: str) -> str:
    lowered = name.lower()
    for label, needles in FAMILIES.items():
        if any(needle in lowered for needle in needles):
            return label
    return "other"


def profile_step(args, harmonized: bool) -> None:
    device = torch.device(args.device)
    b, size = args.batch_size, args.image_size
    annotated = torch.zeros(b, dtype=torch.bool, device=device)
    annotated[: max(1, round(args.annotated * b))] = True
    torch.manual_seed(0)
    batch = {
        "image": torch.rand(b, 3, size, size, device=device),
        "label": torch.randint(0, 1000, (b,), device=device),
        "heatmap": torch.rand(b, size, size, device=device) * annotated[:, None, None],
        "has_heatmap": annotated,
    }
    module = build(args.backbone, harmonized, args.channels_last, device, size, args.batch_statistics)

    def autocast():
        if args.precision == "bf16-mixed":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    step = make_step(module, harmonized, autocast)
    for _ in range(args.warmup):
        step(batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(args.steps):
            step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = profiler.key_averages()
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(event, attribute) for event in averages)
    side = "harmonized" if harmonized else "plain"
    print(f"\n{side} step: {args.backbone}, {size} px, batch {b}, {int(annotated.sum())} annotated, {args.precision}, "
          f"channels_last={args.channels_last}, batch_statistics={args.batch_statistics}, "
          f"{args.device}; {total / 1e3 / args.steps:.1f} ms of self time per step")
    shares: dict[str, float] = {}
    for event in averages:
        shares[family(event.key)] = shares.get(family(event.key), 0.0) + getattr(event, attribute)
    print("  families: " + ", ".join(f"{name} {value / total:.0%}" for name, value in
                                      sorted(shares.items(), key=lambda item: -item[1])))
    print(averages.table(sort_by=sort, row_limit=args.top, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=tuple(CONFIGS), default="resnet50")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--annotated", type=float, default=0.2)
    parser.add_argument("--batch-statistics", choices=("full", "frozen", "ghost"), default="full")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--plain", action="store_true", help="profile the plain step too")
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.plain:
        profile_step(args, harmonized=False)
    profile_step(args, harmonized=True)


if __name__ == "__main__":
    main()
