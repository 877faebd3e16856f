"""The harmonized ViT step with the double-backward attention (fused forward) against the math kernel.

Three sides, each a full training step (forward, task + harmonization loss, backward, Adam) of timm's
``vit_tiny_patch16_224`` at 224 px, batch 10 of which 2 annotated (the split step: the double backprop on the
annotated images only, a plain pass on the others):

* ``plain``: the step without the harmonization term (fused attention);
* ``fused``: the harmonized step as the library runs it: attention keeps its fused forward, with the backward of
  :class:`align.models.attention.DoubleBackwardAttention` in the double-backprop pass;
* ``math``: the harmonized step as the library ran it before, the double-backprop pass on PyTorch's math attention
  kernel (the plain pass fused);
* ``explicit``: timm's own written-out attention in both passes (``fused_attn = False``), as the benchmarks ran the
  harmonized ViT before.

Time: median of ``--repeats`` steps, the sides alternating step by step; ratios to ``plain`` and ``fused / math``.
Memory, each side in a fresh subprocess (the plain step too: the floor of any harmonized one): the tensors the
autograd graph holds when ``loss.backward()`` starts (unique storages saved for backward, counted by
``saved_tensors_hooks``: deterministic, and on the CPU the bulk of the step's peak), and the step's peak above its
start (CUDA: ``max_memory_allocated``; CPU: the peak resident set size, approximate because of the allocator's
caching).

With ``--profile``, the PyTorch profiler also splits one ``plain`` and one ``fused`` step (CPU) into the matrix
products (``mm``, ``addmm``, ``bmm``, the fused attention kernels) and the rest, and prints the ratio the harmonized
step would have if everything but its extra products were free: the floor of any eager implementation of the split
double backprop on this machine.

    python benchmarks/bench_attention.py [--repeats 10] [--device cpu|cuda] [--batch-size 10 --annotated 2] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import gc
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import align.losses.harmonization
from align import HarmonizedClassifier


def build(device: torch.device, image_size: int, batch_size: int, annotated: int, side: str = "fused"):
    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=1000, img_size=image_size)
    for block in backbone.blocks:
        block.attn.fused_attn = side != "explicit"
    module = HarmonizedClassifier(backbone).to(device).train()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)
    has_heatmap = torch.arange(batch_size, device=device) < annotated
    batch = {
        "image": torch.rand(batch_size, 3, image_size, image_size, device=device),
        "label": torch.randint(0, 1000, (batch_size,), device=device),
        "heatmap": torch.rand(batch_size, image_size, image_size, device=device) * has_heatmap[:, None, None],
        "has_heatmap": has_heatmap,
    }
    return module, optimizer, batch


@contextlib.contextmanager
def attention(side: str):
    """``math``: the double-backprop pass on the math kernel (what ``input_gradient`` did before)."""
    if side != "math":
        yield
        return
    original = align.losses.harmonization.double_backward_attention
    align.losses.harmonization.double_backward_attention = lambda: sdpa_kernel(SDPBackend.MATH)
    try:
        yield
    finally:
        align.losses.harmonization.double_backward_attention = original


def make_step(module, optimizer, side: str):
    def step(batch: dict, backward: bool = True) -> None:
        optimizer.zero_grad(set_to_none=True)
        images, labels = batch["image"], batch["label"]
        if side == "plain":
            loss = module.task_loss(module.backbone(images), labels)
        else:
            with attention(side):
                logits, harmonization = module.harmonized_forward(images, labels, batch["heatmap"],
                                                                  batch["has_heatmap"])
            loss = module.task_loss(logits, labels) + harmonization
        if backward:
            loss.backward()
            optimizer.step()

    return step


#: operators that are matrix products (the attention kernels hold the attention's products)
PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product")


def product_split(step, batch, steps: int = 2) -> tuple[float, float]:
    """(ms of matrix products, ms of everything else) per step, self CPU time under the PyTorch profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step(batch)
    events = profiler.key_averages()
    products = sum(event.self_cpu_time_total for event in events if event.key.startswith(PRODUCTS))
    total = sum(event.self_cpu_time_total for event in events)
    return products / steps / 1e3, (total - products) / steps / 1e3


def print_product_floor(steps: dict, batch: dict) -> None:
    plain_products, plain_rest = product_split(steps["plain"], batch)
    fused_products, fused_rest = product_split(steps["fused"], batch)
    plain = plain_products + plain_rest
    print(f"  profiled (self CPU ms per step): plain {plain_products:.0f} products + {plain_rest:.0f} other; "
          f"fused {fused_products:.0f} products + {fused_rest:.0f} other")
    print(f"  floor with every non-product operator of the extra work free: "
          f"{(plain + fused_products - plain_products) / plain:.2f}; measured in the profile {(fused_products + fused_rest) / plain:.2f}")


def peak_memory(side: str, args) -> tuple[float, float]:
    """(MiB of the tensors the autograd graph holds when the step's ``loss.backward()`` starts, MiB of peak memory
    of the step above its start) for one step of ``side`` in this process (call it in a fresh one). The peak is
    ``torch.cuda.max_memory_allocated`` on CUDA, the peak resident set size (Linux ``VmHWM``, reset through
    ``/proc/self/clear_refs``) on the CPU, where the allocator's caching makes it approximate."""
    device = torch.device(args.device)
    module, optimizer, batch = build(device, args.image_size, args.batch_size, args.annotated, side)
    step = make_step(module, optimizer, side)
    step(batch)  # optimizer state allocated once
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(batch, backward=False)
    graph = sum(storages.values()) / 2**20
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step(batch)
        torch.cuda.synchronize()
        return graph, (torch.cuda.max_memory_allocated() - start) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set size (VmHWM) to the current one
    start = resident_kib("VmRSS")
    step(batch)
    return graph, (resident_kib("VmHWM") - start) / 1024


def resident_kib(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak since the last reset) of this process, KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--annotated", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--profile", action="store_true", help="split plain and fused steps into products and the rest")
    # the subprocess's job
    parser.add_argument("--memory-of", choices=("plain", "fused", "math", "explicit"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(peak_memory(args.memory_of, args)))
        return

    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, vit_tiny_patch16_224 "
          f"{args.image_size} px, batch {args.batch_size}, {args.annotated} annotated")
    steps = {}
    batch = None
    for side in ("plain", "fused", "math", "explicit"):
        module, optimizer, batch = build(device, args.image_size, args.batch_size, args.annotated, side)
        steps[side] = make_step(module, optimizer, side)
    for step in steps.values():
        for _ in range(args.warmup):
            step(batch)
    times: dict[str, list[float]] = {side: [] for side in steps}
    for _ in range(args.repeats):
        for side, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[side].append(time.perf_counter() - start)
    median = {side: statistics.median(values) for side, values in times.items()}
    listed = ", ".join(f"{side} {seconds * 1e3:.1f} ms" for side, seconds in median.items())
    print(f"median of {args.repeats} alternating steps: {listed}")
    print(f"  harmonized / plain: fused attention {median['fused'] / median['plain']:.2f} (target <= 1.3), "
          f"math kernel {median['math'] / median['plain']:.2f}, explicit {median['explicit'] / median['plain']:.2f}; "
          f"fused / math {median['fused'] / median['math']:.2f}")
    if args.profile and device.type == "cuda":
        print("  --profile splits CPU operators' self time; on CUDA that is launch time, not kernel time: skipped")
    elif args.profile:
        print_product_floor(steps, batch)
    if args.skip_memory:
        return
    memory = {}
    for side in ("plain", "fused", "math", "explicit"):
        command = [sys.executable, __file__, "--memory-of", side, "--device", args.device,
                   "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                   "--annotated", str(args.annotated)]
        memory[side] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    for index, what in enumerate(("autograd graph at loss.backward()", "peak of the step above its start")):
        mib = {side: values[index] for side, values in memory.items()}
        print(f"  {what}: " + ", ".join(f"{side} {value:.0f} MiB" for side, value in mib.items())
              + f"; fused / math {mib['fused'] / mib['math']:.2f}, "
              + f"fused / explicit {mib['fused'] / mib['explicit']:.2f}"
              + (" (target <= 0.7)" if index == 0 else ""))
        print(f"    the plain step alone (no harmonization): {mib['plain'] / mib['math']:.2f} of math, the floor of "
              f"any harmonized step that does not recompute its plain pass; what the harmonization adds, fused / "
              f"math: {(mib['fused'] - mib['plain']) / (mib['math'] - mib['plain']):.2f}")


if __name__ == "__main__":
    main()
