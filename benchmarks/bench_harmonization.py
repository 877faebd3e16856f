"""Cost of the harmonization term: one training step WITH it over one WITHOUT it.

Same model (the default 1-Lipschitz CNN, ``align.models.lip_vgg``), same batch (64 images 32x32 with human maps),
CPU, one process. A step is forward, loss, backward and an optimizer step, exactly as ``HarmonizedClassifier``
does it (without Lightning's loop around it). Warm-up, then the median of repeated steps, the two sides
alternating step by step. Target: ratio <= 2.5
(the double backprop costs about 2x).

    python benchmarks/bench_harmonization.py [--repeats 30] [--batch-size 64] [--model lip_vgg|small_cnn]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from align.losses import HarmonizationLoss, TaskLoss, input_saliency
from align.models import lip_vgg, small_cnn


def make_step(model, optimizer, task_loss, harmonization, weight: float):
    def step(images, labels, human, has_heatmap):
        optimizer.zero_grad(set_to_none=True)
        if weight > 0:
            logits, saliency = input_saliency(model, images, labels, reduce="mean", create_graph=True)
            loss = task_loss(logits, labels) + weight * harmonization(saliency, human, has_heatmap)
        else:
            loss = task_loss(model(images), labels)
        loss.backward()
        optimizer.step()

    return step


def interleaved_medians(steps: dict, batch, warmup: int, repeats: int) -> dict[str, float]:
    """Median step time of each side, the sides alternating step by step (machine drift hits both alike)."""
    for step in steps.values():
        for _ in range(warmup):
            step(*batch)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step(*batch)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--model", choices=("lip_vgg", "small_cnn"), default="lip_vgg")
    parser.add_argument("--task-loss", default="tau_ce")
    args = parser.parse_args()

    torch.manual_seed(0)
    size = args.image_size
    images = torch.rand(args.batch_size, 3, size, size)
    labels = torch.randint(0, 4, (args.batch_size,))
    human = torch.rand(args.batch_size, size, size)
    has_heatmap = torch.ones(args.batch_size, dtype=torch.bool)
    batch = (images, labels, human, has_heatmap)

    steps = {}
    for name, weight in (("without", 0.0), ("with", 1.0)):
        torch.manual_seed(0)
        model = (lip_vgg if args.model == "lip_vgg" else small_cnn)(num_classes=4).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        steps[name] = make_step(model, optimizer, TaskLoss(args.task_loss), HarmonizationLoss(5), weight)
    times = interleaved_medians(steps, batch, args.warmup, args.repeats)

    ratio = times["with"] / times["without"]
    print(f"model={args.model} batch={args.batch_size} image={size}x{size} threads={torch.get_num_threads()}")
    print(f"training step without harmonization: {times['without'] * 1e3:8.1f} ms (median of {args.repeats})")
    print(f"training step with harmonization:    {times['with'] * 1e3:8.1f} ms (median of {args.repeats})")
    print(f"ratio with / without: {ratio:.2f} (target <= 2.5)")


if __name__ == "__main__":
    main()
