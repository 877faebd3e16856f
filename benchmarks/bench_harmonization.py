"""Cost of the harmonization term: one training step WITH it over one WITHOUT it, in one process, CPU.

A step is forward, loss, backward and an optimizer step, exactly as ``HarmonizedClassifier.training_step`` computes
its loss (``harmonized_forward`` + task loss; without Lightning's loop around it). Warm-up, then the median of
repeated steps, the two sides alternating step by step (machine drift hits both alike). Cases:

* ``all``: ``lip_vgg``, 32 px, batch 64, every image annotated (target <= 2.5: the double backprop costs ~2x);
* ``mix``: ``lip_vgg``, 32 px, batch 64, 20% annotated (13 of 64, the reference mix): the double backprop runs on
  the annotated images only (target <= 1.35); ``--no-split`` measures the full-batch computation instead;
* ``resnet18``: torchvision ResNet-18 (BatchNorm), 64 px, batch 16, all annotated (target <= 2.5);
* ``resnet18_mix``: ResNet-18, 64 px, batch 64, 20% annotated, the exact step (BatchNorm in training mode: the
  full-batch double backprop); ``resnet18_frozen``: the same with ``batch_statistics="frozen"`` (a plain pass of
  the whole batch, the double backprop on the 13 annotated images with its statistics held constant; target <= 1.5),
  with the exact step as a third side alternating with the two (``exact ratio``); ``resnet18_ghost``: the same
  with ``batch_statistics="ghost"`` (two ghost batches: the double backprop on the 13 annotated images with their
  own statistics, a plain pass on the 51 others);
* ``vit``: ``timm`` ``vit_tiny_patch16_224`` at 32 px, patch 4, 20% annotated (LayerNorm: the split is exact).

``--floor`` adds a third side, alternating with the two: the bare PyTorch double backprop of the same network on
the whole batch (task loss + the mean squared input gradient of the label logits, no pyramid, no split), i.e. what
autograd's own double backward costs; ``floor ratio`` = its step / the plain step.

    python benchmarks/bench_harmonization.py [--case all|mix|resnet18|vit|every] [--repeats 30] [--floor]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import timm
import torch

from align import HarmonizedClassifier
from align.models import lip_vgg, resnet18


@dataclass
class Case:
    model: str
    image_size: int
    batch_size: int
    annotated: float
    task_loss: str
    target: float
    batch_statistics: str = "full"  # HarmonizedClassifier(batch_statistics=...) for BatchNorm networks


CASES = {
    "all": Case("lip_vgg", 32, 64, 1.0, "tau_ce", 2.5),
    "mix": Case("lip_vgg", 32, 64, 0.2, "tau_ce", 1.35),
    "resnet18": Case("resnet18", 64, 16, 1.0, "ce", 2.5),
    "resnet18_mix": Case("resnet18", 64, 64, 0.2, "ce", 2.5),
    "resnet18_frozen": Case("resnet18", 64, 64, 0.2, "ce", 1.5, batch_statistics="frozen"),
    "resnet18_ghost": Case("resnet18", 64, 64, 0.2, "ce", 1.5, batch_statistics="ghost"),
    "vit": Case("vit", 32, 64, 0.2, "ce", 1.35),
}


def backbone(name: str, num_classes: int = 4) -> torch.nn.Module:
    if name == "lip_vgg":
        return lip_vgg(num_classes)
    if name == "resnet18":
        return resnet18(num_classes)
    # timm's fused attention: the double-backprop pass swaps in align.models.attention's double backward
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=num_classes)


def make_step(module: HarmonizedClassifier, optimizer: torch.optim.Optimizer, harmonize: bool):
    def step(batch: dict) -> None:
        optimizer.zero_grad(set_to_none=True)
        images, labels = batch["image"], batch["label"]
        if harmonize:
            logits, harmonization = module.harmonized_forward(images, labels, batch["heatmap"], batch["has_heatmap"])
            loss = module.task_loss(logits, labels) + module.harmonization_weight * harmonization
        else:
            loss = module.task_loss(module.backbone(images), labels)
        loss.backward()
        optimizer.step()

    return step


def make_floor_step(module: HarmonizedClassifier, optimizer: torch.optim.Optimizer):
    """The bare double backprop: ``task + mean((d sum_i f_{y_i}(x_i) / dx)^2)``, whole batch, nothing else."""

    def step(batch: dict) -> None:
        optimizer.zero_grad(set_to_none=True)
        images = batch["image"].clone().requires_grad_(True)
        logits = module.backbone(images)
        (gradient,) = torch.autograd.grad(logits.gather(1, batch["label"][:, None]).sum(), images, create_graph=True)
        loss = module.task_loss(logits, batch["label"]) + gradient.square().mean()
        loss.backward()
        optimizer.step()

    return step


def interleaved_medians(steps: dict, batch, warmup: int, repeats: int) -> dict[str, float]:
    """Median step time of each side, the sides alternating step by step."""
    for step in steps.values():
        for _ in range(warmup):
            step(batch)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step(batch)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def run(name: str, case: Case, repeats: int, warmup: int, split: bool, floor: bool = False) -> float:
    torch.manual_seed(0)
    b, size = case.batch_size, case.image_size
    annotated = torch.zeros(b, dtype=torch.bool)
    annotated[: round(case.annotated * b)] = True
    batch = {
        "image": torch.rand(b, 3, size, size),
        "label": torch.randint(0, 4, (b,)),
        "heatmap": torch.rand(b, size, size) * annotated[:, None, None],
        "has_heatmap": annotated,
    }
    steps = {}
    sides = ["without", "with"] + (["floor"] if floor else []) + (["exact"] if case.batch_statistics != "full" else [])
    for side in sides:
        torch.manual_seed(0)
        module = HarmonizedClassifier(backbone(case.model), task_loss=case.task_loss, split_annotated=split,
                                      batch_statistics="full" if side == "exact" else case.batch_statistics)
        module.train()
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
        steps[side] = make_floor_step(module, optimizer) if side == "floor" else make_step(module, optimizer,
                                                                                           side != "without")
    times = interleaved_medians(steps, batch, warmup, repeats)
    ratio = times["with"] / times["without"]
    coupled = case.model == "resnet18" and case.batch_statistics == "full"
    how = "full batch" if not split or coupled or case.annotated == 1 else "annotated only"
    how += f", {case.batch_statistics} BN" if case.batch_statistics != "full" else ""
    extra = f" | floor {times['floor'] * 1e3:7.1f} ms, floor ratio {times['floor'] / times['without']:.2f}" if floor else ""
    if "exact" in times:  # the same step without the option (full batch), alternating with the two others
        extra += f" | exact {times['exact'] * 1e3:7.1f} ms, exact ratio {times['exact'] / times['without']:.2f}"
    print(
        f"{name:15s} {case.model:8s} {size:3d} px batch {b:3d} annotated {int(annotated.sum()):3d} ({how:25s}) | "
        f"without {times['without'] * 1e3:7.1f} ms | with {times['with'] * 1e3:7.1f} ms | "
        f"ratio {ratio:.2f} (target <= {case.target}){extra}"
    )
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=(*CASES, "every"), default="every")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-split", action="store_true", help="always the full-batch double backprop")
    parser.add_argument("--floor", action="store_true", help="also time the bare PyTorch double backprop")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} alternating steps")
    for name in CASES if args.case == "every" else [args.case]:
        run(name, CASES[name], args.repeats, args.warmup, not args.no_split, args.floor)


if __name__ == "__main__":
    main()
